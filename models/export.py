"""ONNX export with a dynamic batch axis, checked against PyTorch."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    import onnx

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
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {INPUT_NAME: batch.astype(np.float32)})
    with torch.no_grad():
        torch_logits = model.eval()(torch.from_numpy(batch.astype(np.float32))).numpy()
    agreement = float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean())
    diff = float(np.abs(onnx_logits - torch_logits).max())
    return ExportCheck(agreement, diff, len(batch))


def main(args) -> dict:
    """`tagstream export`: a checkpoint to ONNX (fp32, fp16 or int8) with its manifest.

    The checkpoint's own arguments give the data, input size and classes; thresholds
    are calibrated on the validation split and INT8 on training images, both through
    the serving preset.
    """
    import dataclasses
    import json
    import shutil
    import time
    from pathlib import Path

    from infra.exceptions import ConfigurationError
    from models.checkpoint import load_trained
    from models.manifest import Manifest, file_sha256
    from models.quantize import make_variant
    from models.thresholds import calibrate_thresholds
    from models.train import predict

    if not args.checkpoint:
        raise ConfigurationError("--checkpoint is required")
    loaded = load_trained(args.checkpoint, data=args.data)
    checkpoint, trained, classes = loaded.checkpoint, loaded.args, loaded.classes
    model, serving, splits = loaded.model, loaded.serving, loaded.splits
    input_size = trained["input_size"]
    val_loader = torch.utils.data.DataLoader(splits.val, batch_size=64)
    probabilities, labels = predict(model, val_loader)

    out = Path(args.output_dir or "runs/export")
    fp32_dir = out if args.precision == "fp32" else out.with_name(out.name + "-fp32")
    fp32_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, fp32_dir / "model.onnx", input_size=input_size)
    batch = np.stack([splits.val[i][0].numpy() for i in range(min(64, len(splits.val)))])
    check = check_against_pytorch(model, onnx_path, batch)
    print(check, flush=True)
    parent = Path(args.checkpoint).resolve()
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
    if args.precision != "fp32":
        calibration = []
        if args.precision == "int8":
            count = min(args.calibration_images, len(splits.calibration))
            images = np.stack([splits.calibration[i][0].numpy() for i in range(count)])
            calibration = list(np.array_split(images, max(1, count // 32)))
        if out.exists():
            shutil.rmtree(out)
        manifest = make_variant(fp32_dir, out, args.precision, calibration=calibration)
    summary = {"output": str(out), "manifest": dataclasses.asdict(manifest), "check": str(check)}
    print(json.dumps({"output": str(out), "precision": manifest.precision}), flush=True)
    return summary
