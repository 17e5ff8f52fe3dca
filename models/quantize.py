"""FP16 and INT8 variants of an exported FP32 model, each beside its own manifest.

- FP16 (for GPUs): weights and activations in half precision, inputs and outputs
  kept FP32 so a consumer feeds the same arrays whatever the precision.
- INT8 (for CPUs): static QDQ quantization, per-channel weights, activations
  calibrated on real training images run through the serving preset.

A variant's manifest names its parent, its precision and its own file hash, so
the inference consumer loads any of the three from the manifest alone.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from models.manifest import Manifest, file_sha256

PRECISIONS = ("fp32", "fp16", "int8")


class ArrayCalibration:
    """A CalibrationDataReader over preprocessed NCHW batches."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str) -> None:
        self._batches = batches
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch.astype(np.float32)}


def _variant_manifest(parent: Manifest, out_dir: Path, file: str, precision: str) -> Manifest:
    manifest = dataclasses.replace(
        parent,
        version=f"{parent.version}-{precision}",
        file=file,
        sha256=file_sha256(out_dir / file),
        precision=precision,
        parent=parent.name,
        metrics={},
    )
    manifest.save(out_dir)
    return manifest


def to_fp16(source_dir: Path, out_dir: Path) -> Manifest:
    """Half-precision copy of the model in `source_dir`, FP32 at its inputs and outputs."""

    parent = Manifest.load(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(parent.model_path(source_dir)))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out_dir / "model.onnx"))
    return _variant_manifest(parent, out_dir, "model.onnx", "fp16")


def to_int8(source_dir: Path, out_dir: Path, calibration: list[np.ndarray]) -> Manifest:
    """Static QDQ INT8 copy of the model in `source_dir`, calibrated on `calibration` batches."""

    parent = Manifest.load(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = parent.model_path(source_dir)
    input_name = (
        ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    )
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph folding first, as ONNX Runtime recommends for QDQ.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_dir / "model.onnx"),
            ArrayCalibration(iter(calibration), input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return _variant_manifest(parent, out_dir, "model.onnx", "int8")


def make_variant(
    source_dir: Path, out_dir: Path, precision: str, *, calibration: list[np.ndarray] | None = None
) -> Manifest:
    if precision == "fp32":
        shutil.copytree(source_dir, out_dir, dirs_exist_ok=True)
        return Manifest.load(out_dir)
    if precision == "fp16":
        return to_fp16(source_dir, out_dir)
    if precision == "int8":
        if not calibration:
            raise ValueError("INT8 needs calibration batches of training images")
        return to_int8(source_dir, out_dir, calibration)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
