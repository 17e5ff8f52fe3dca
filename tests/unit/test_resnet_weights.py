"""`--weights PATH`: a checkpoint's head comes along only for the same classes."""

from __future__ import annotations

import pytest
import torch

from infra.exceptions import ModelError
from models.resnet import build_resnet50

CLASSES = ["cat", "cow", "dog"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_resnet50(len(CLASSES))
    path = tmp_path_factory.mktemp("ckpt") / "model_best.pt"
    # As `tagstream train` saves it: plain values beside the state dict.
    torch.save({"model": model.state_dict(), "classes": CLASSES, "args": {"lr": 0.1}}, path)
    return model, path


def test_same_classes_keep_the_head_and_the_backbone(checkpoint) -> None:
    source, path = checkpoint
    loaded = build_resnet50(3, weights=path, classes=list(CLASSES))
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


@pytest.mark.parametrize("classes", [["dog", "cow", "cat"], None])
def test_other_classes_get_a_fresh_head(checkpoint, classes) -> None:
    source, path = checkpoint
    loaded = build_resnet50(3, weights=path, classes=classes)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    assert not torch.equal(loaded.fc.weight, source.fc.weight)


def test_a_different_number_of_classes_gets_a_fresh_head(checkpoint) -> None:
    _, path = checkpoint
    assert build_resnet50(5, weights=path, classes=["a", "b", "c", "d", "e"]).fc.out_features == 5


def test_missing_weights_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_resnet50(3, weights=tmp_path / "nope.pt")
