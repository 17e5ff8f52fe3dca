"""The demo model: trained by our pipeline, exported to ONNX, good enough to mean something."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from infra.demo_images import render_demo_jpeg
from models.demo import TEST_SEEDS_START, DemoRecipe
from models.export import check_against_pytorch
from models.manifest import Manifest
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier

pytestmark = pytest.mark.slow

HELD_OUT_PER_CLASS = 30


def held_out(classifier: OnnxClassifier):
    """JPEG bytes of seeds never used in training or validation, as the image server sends them."""
    arrays, labels = [], []
    for label, name in enumerate(classifier.classes):
        for n in range(HELD_OUT_PER_CLASS):
            data = render_demo_jpeg(name, TEST_SEEDS_START + n, size=DemoRecipe().render_size)
            array, _ = classifier.preset.from_bytes(data)
            arrays.append(array)
            labels.append(label)
    return np.stack(arrays), np.array(labels)


def test_demo_model_classifies_held_out_images(demo_model_dir) -> None:
    classifier = OnnxClassifier(demo_model_dir)
    batch, labels = held_out(classifier)
    predicted = classifier.probabilities(batch).argmax(1)
    accuracy = float((predicted == labels).mean())
    per_class = {
        name: float((predicted[labels == i] == i).mean())
        for i, name in enumerate(classifier.classes)
    }
    print(
        f"\ndemo model held-out accuracy {accuracy:.4f} on {len(labels)} images;"
        f" per class {per_class}"
    )
    assert accuracy >= 0.9, per_class


def test_onnx_agrees_with_pytorch(demo_model_dir) -> None:
    manifest = Manifest.load(demo_model_dir)
    checkpoint = torch.load(demo_model_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = build_resnet50(len(manifest.classes))
    model.load_state_dict(checkpoint["model"])
    classifier = OnnxClassifier(demo_model_dir)
    batch, _ = held_out(classifier)
    check = check_against_pytorch(model, demo_model_dir / manifest.file, batch[::3])
    print(f"\n{check}")
    assert check.argmax_agreement == 1.0
    assert check.max_abs_diff < 1e-2


def test_manifest_drives_the_classifier(demo_model_dir) -> None:
    manifest = Manifest.load(demo_model_dir)
    assert manifest.classes == sorted(manifest.classes) and len(manifest.classes) == 13
    assert set(manifest.thresholds) == set(manifest.classes)
    assert all(0.0 < t < 1.0 for t in manifest.thresholds.values())
    # A one-pixel image still goes through the serving preset at the manifest's input size.
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(buffer, format="PNG")
    array, _ = OnnxClassifier(demo_model_dir).preset.from_bytes(buffer.getvalue())
    assert array.shape == (3, manifest.input_size, manifest.input_size)


def test_tampered_model_file_is_refused(demo_model_dir, tmp_path) -> None:
    import shutil

    from infra.exceptions import ModelError

    copy = tmp_path / "model"
    shutil.copytree(demo_model_dir, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="does not match its manifest"):
        OnnxClassifier(copy)
