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
