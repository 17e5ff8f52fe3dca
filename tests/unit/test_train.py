"""`tagstream train` on real images that a package ships: scikit-learn's digits."""

from __future__ import annotations

import json

import pytest

from models.data import write_digits_folder
from models.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


def train_config(data, out, **changes) -> TrainConfig:
    return TrainConfig(
        data=data,
        output_dir=out,
        input_size=32,
        batch_size=32,
        opt="adamw",
        lr=0.002,
        no_progress=True,
        **changes,
    )


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train(train_config(digits, out, epochs=3))
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
    assert metrics["best_checkpoint"] == str(out / "model_best.pt")


def test_checkpoints_keep_the_config_as_plain_values(trained, digits) -> None:
    import torch

    out, _ = trained
    for name in ("checkpoint.pt", "model_best.pt"):
        saved = torch.load(out / name, map_location="cpu", weights_only=True)
        assert saved["args"] == train_config(digits, out, epochs=3).to_dict()
        assert saved["args"]["data"] == str(digits) and saved["args"]["resume"] is None


def test_resume_continues_from_the_checkpoint(trained, digits) -> None:
    out, _ = trained
    metrics = train(train_config(digits, out, epochs=4, resume=out / "checkpoint.pt"))
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2, 3]


def test_missing_imagenet_weights_is_a_clear_error(digits, tmp_path, monkeypatch) -> None:
    from infra.exceptions import ModelError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(ModelError, match="cannot be downloaded here"):
        train(train_config(digits, tmp_path / "run", epochs=1, weights="imagenet"))


def export_config(checkpoint, out, precision: str):
    from models.export import ExportConfig

    return ExportConfig(
        checkpoint=checkpoint, output_dir=out, precision=precision, calibration_images=128
    )


def test_export_fp32_and_int8_agree(trained, digits, tmp_path) -> None:
    import numpy as np
    import torch

    from models.data import load_splits
    from models.export import export
    from models.manifest import Manifest
    from models.runtime import OnnxClassifier

    out, _ = trained
    best = out / "model_best.pt"
    fp32 = export(export_config(best, tmp_path / "fp32", "fp32"))
    assert "argmax agreement 1.0000" in fp32["check"]
    assert fp32["output"] == fp32["fp32_output"] == str(tmp_path / "fp32")
    int8 = export(export_config(best, tmp_path / "int8", "int8"))
    assert int8["fp32_output"] == str(tmp_path / "int8-fp32")
    manifest = Manifest.load(tmp_path / "int8")
    assert manifest.precision == "int8" and manifest.classes == [f"digit{i}" for i in range(10)]
    assert set(manifest.thresholds) == set(manifest.classes)
    dense, quantized = OnnxClassifier(tmp_path / "fp32"), OnnxClassifier(tmp_path / "int8")
    splits = load_splits(
        digits,
        train_transform=None,
        eval_transform=lambda image: torch.from_numpy(dense.preset(image)),
        val_split=0.15,
        test_split=0.15,
        seed=0,
    )
    test = np.stack([splits.test[i][0].numpy() for i in range(len(splits.test))])
    labels = np.array([splits.test[i][1] for i in range(len(splits.test))])
    p32 = dense.probabilities(test).argmax(1)
    p8 = quantized.probabilities(test).argmax(1)
    agreement = float((p32 == p8).mean())
    print(
        f"\ndigits INT8 vs FP32 agreement {agreement:.4f};"
        f" accuracy fp32 {(p32 == labels).mean():.4f}"
        f" int8 {(p8 == labels).mean():.4f}"
    )
    assert agreement >= 0.97


def test_prune_rounds_shrink_and_report(trained, tmp_path) -> None:
    from models.apoz import build_pruned_resnet50
    from models.prune import PruneConfig, prune

    out, _ = trained
    result = prune(
        PruneConfig(
            checkpoint=out / "model_best.pt",
            output_dir=tmp_path,
            rounds=1,
            prune_rule="top-fraction",
            prune_fraction=0.3,
            finetune_epochs=1,
            distill=True,
            batch_size=32,
            lr=0.005,
        )
    )
    base, pruned = result["rows"]
    assert pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert pruned["onnx_bytes"] < base["onnx_bytes"] and 0.25 < pruned["sparsity"] < 0.35
    assert pruned["acc_after_finetune"] >= 0.5  # fine-tuning keeps it far above chance
    report = (tmp_path / "prune_report.md").read_text()
    assert "| 1 |" in report and "acc. after fine-tune" in report
    png = (tmp_path / "prune_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    import torch

    assert result["checkpoints"] == [str(tmp_path / "pruned_round1.pt")]
    saved = torch.load(tmp_path / "pruned_round1.pt", map_location="cpu", weights_only=True)
    rebuilt = build_pruned_resnet50(10, saved["widths"])
    rebuilt.load_state_dict(saved["model"])
    print("\n" + report)
