"""ONNX export with a dynamic batch axis, checked against PyTorch, and `tagstream export`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.args import export_parser
from models.checkpoint import load_trained
from models.manifest import Manifest, file_sha256
from models.quantize import make_variant
from models.thresholds import calibrate_thresholds
from models.train import predict

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(model: torch.nn.Module, path: Path, *, input_size: int) -> Path:
    """Export `model` (eval mode) to `path` with a dynamic batch axis."""
    model = model.eval()
    example = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            verbose=False,
        )

    onnx.checker.check_model(str(path))
    return path


@dataclass
class ExportCheck:
    argmax_agreement: float
    max_abs_diff: float
    batch: int

    def __str__(self) -> str:
        return (
            f"ONNX vs PyTorch on {self.batch} images: argmax agreement "
            f"{self.argmax_agreement:.4f}, max |logit diff| {self.max_abs_diff:.2e}"
        )


def check_against_pytorch(model: torch.nn.Module, path: Path, batch: np.ndarray) -> ExportCheck:
    """Run the same batch through PyTorch and ONNX Runtime (CPU) and compare."""

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {INPUT_NAME: batch.astype(np.float32)})
    with torch.no_grad():
        torch_logits = model.eval()(torch.from_numpy(batch.astype(np.float32))).numpy()
    agreement = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
    diff = float(np.abs(onnx_logits - torch_logits).max())
    return ExportCheck(agreement, diff, len(batch))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return export_parser(add_help=add_help)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """What `export` takes: the flags of `tagstream export` (models/args.py), same defaults."""

    checkpoint: Path
    data: Path | None = None
    output_dir: Path = Path("runs/export")
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    calibration_images: int = 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportConfig:
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        return cls(
            **{
                **values,
                "checkpoint": Path(args.checkpoint),
                "data": Path(args.data) if args.data else None,
                "output_dir": Path(args.output_dir),
            }
        )


def main(args: argparse.Namespace) -> dict:
    return export(ExportConfig.from_args(args))


def export(config: ExportConfig) -> dict:
    """`tagstream export`: a checkpoint to ONNX (fp32, fp16 or int8) with its manifest.

    The checkpoint's own arguments give the data, input size and classes; thresholds
    are calibrated on the validation split and INT8 on training images, both through
    the serving preset. Returns the output folder, its manifest (as a dict), the ONNX check,
    and ``fp32_output``, the FP32 parent's folder (the output itself for fp32).
    """

    loaded = load_trained(config.checkpoint, data=config.data)
    checkpoint, trained, classes = loaded.checkpoint, loaded.args, loaded.classes
    model, serving, splits = loaded.model, loaded.serving, loaded.splits
    input_size = trained["input_size"]
    val_loader = torch.utils.data.DataLoader(splits.val, batch_size=64)
    probabilities, labels = predict(model, val_loader)

    out = Path(config.output_dir)
    fp32_dir = out if config.precision == "fp32" else out.with_name(out.name + "-fp32")
    fp32_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, fp32_dir / "model.onnx", input_size=input_size)
    batch = np.stack([splits.val[i][0].numpy() for i in range(min(64, len(splits.val)))])
    check = check_against_pytorch(model, onnx_path, batch)
    print(check, flush=True)
    parent = Path(config.checkpoint).resolve()
    manifest = Manifest(
        model_id=trained.get("model_id", "resnet50"),
        version=f"{parent.parent.name}-e{checkpoint['epoch']}",
        classes=classes,
        thresholds=calibrate_thresholds(probabilities, labels, classes),
        input_size=input_size,
        resize_size=serving.resize_size,
        mean=serving.mean.ravel().tolist(),
        std=serving.std.ravel().tolist(),
        file="model.onnx",
        sha256=file_sha256(onnx_path),
        precision="fp32",
        parent=str(parent),
        no_hashtag_classes=[c for c in classes if c == "others"],
        metrics={
            "val_accuracy": float((probabilities.argmax(1) == labels).mean()),
            "onnx_argmax_agreement": check.argmax_agreement,
            "onnx_max_abs_diff": check.max_abs_diff,
        },
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    manifest.save(fp32_dir)
    if config.precision != "fp32":
        calibration = []
        if config.precision == "int8":
            count = min(config.calibration_images, len(splits.calibration))
            images = np.stack([splits.calibration[i][0].numpy() for i in range(count)])
            calibration = list(np.array_split(images, max(1, count // 32)))
        if out.exists():
            shutil.rmtree(out)
        manifest = make_variant(fp32_dir, out, config.precision, calibration=calibration)
    summary = {
        "output": str(out),
        "fp32_output": str(fp32_dir),
        "manifest": dataclasses.asdict(manifest),
        "check": str(check),
    }
    print(json.dumps({"output": str(out), "precision": manifest.precision}), flush=True)
    return summary
