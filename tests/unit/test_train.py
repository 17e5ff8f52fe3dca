"""`tagstream train` on real images that a package ships: scikit-learn's digits."""

from __future__ import annotations

import json

import pytest

from infra.cli import get_args_parser
from models.train import main as train_main
from tests.helpers_digits import write_digits_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


def train_args(data, out, *extra: str):
    argv = [
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--input-size",
        "32",
        "--batch-size",
        "32",
        "--opt",
        "adamw",
        "--lr",
        "0.002",
        "--no-progress",
        *extra,
    ]
    return get_args_parser().parse_args(argv)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train_main(train_args(digits, out, "--epochs", "3"))
    return out, metrics


def test_training_learns_far_above_chance(trained) -> None:
    out, metrics = trained
    print(
        f"\ndigits test accuracy {metrics['test_acc']:.4f} (chance 0.1), sizes {metrics['sizes']}"
    )
    assert metrics["test_acc"] >= 0.7  # far above chance (0.1); 0.84 measured
    assert metrics["sizes"]["train"] + metrics["sizes"]["val"] + metrics["sizes"]["test"] == 1797
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["classes"] == [f"digit{i}" for i in range(10)]
    assert set(saved["per_class"]["digit3"]) == {"precision", "recall"}
    png = (out / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_resume_continues_from_the_checkpoint(trained, digits) -> None:
    out, _ = trained
    metrics = train_main(
        train_args(digits, out, "--epochs", "4", "--resume", str(out / "checkpoint.pt"))
    )
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2, 3]


def test_missing_imagenet_weights_is_a_clear_error(digits, tmp_path, monkeypatch) -> None:
    from infra.exceptions import ModelError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(ModelError, match="cannot be downloaded here"):
        train_main(train_args(digits, tmp_path / "run", "--epochs", "1", "--weights", "imagenet"))
