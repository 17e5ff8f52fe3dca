"""Model throughput at serving size: dense vs APoZ-pruned, FP32 vs INT8, in one run.

Speed needs no trained weights, so this table uses a ResNet50 with random
weights, pruned by APoZ measured on generated demo images (`top-fraction` rule,
to reach a chosen channel sparsity in one round), exported at 224x224 and
quantized to static QDQ INT8. Accuracy per variant comes from the training
pipeline's digits task, reported separately.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.export import export_onnx
from models.manifest import Manifest, file_sha256
from models.presets import ServingPreset
from models.prune import count_flops, count_params, prune_round
from models.quantize import make_variant
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier
from producers.demo_images import DEMO_CLASSES, render_demo_image


@dataclass
class ModelRow:
    name: str
    params: int
    macs: int
    onnx_bytes: int
    images_per_s: float


def _save_with_manifest(model: torch.nn.Module, folder: Path, input_size: int) -> Path:
    export_onnx(model, folder / "model.onnx", input_size=input_size)
    Manifest(
        model_id="bench-resnet50",
        version=folder.name,
        classes=list(DEMO_CLASSES),
        thresholds=dict.fromkeys(DEMO_CLASSES, 0.5),
        input_size=input_size,
        resize_size=input_size,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        file="model.onnx",
        sha256=file_sha256(folder / "model.onnx"),
    ).save(folder)
    return folder


def _throughput(folder: Path, batch: np.ndarray, repeats: int) -> float:
    classifier = OnnxClassifier(folder)
    classifier.probabilities(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        classifier.probabilities(batch)
    return len(batch) * repeats / (time.perf_counter() - started)


def model_table(
    *, input_size: int = 224, batch_size: int = 8, repeats: int = 4, fraction: float = 0.5
) -> list[ModelRow]:
    torch.manual_seed(0)
    preset = ServingPreset(input_size=input_size)
    images = np.stack(
        [
            preset(render_demo_image(name, seed, size=input_size))
            for name in DEMO_CLASSES
            for seed in range(2)
        ]
    )
    dense = build_resnet50(len(DEMO_CLASSES), weights=None).eval()
    pruned = copy.deepcopy(dense)
    loader = [(torch.from_numpy(images), torch.zeros(len(images), dtype=torch.long))]
    report = prune_round(
        pruned, loader, rule="top-fraction", fraction=fraction, input_size=input_size
    )
    print(f"pruned: {report}", flush=True)
    calibration = list(np.array_split(images, 4))
    batch = images[:batch_size]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for label, model in (("dense", dense), ("pruned", pruned)):
            fp32 = _save_with_manifest(model, root / f"{label}-fp32", input_size)
            int8 = root / f"{label}-int8"
            make_variant(fp32, int8, "int8", calibration=calibration)
            for precision, folder in (("FP32", fp32), ("INT8", int8)):
                rows.append(
                    ModelRow(
                        f"{label} {precision}",
                        count_params(model),
                        count_flops(model, input_size),
                        (folder / "model.onnx").stat().st_size,
                        _throughput(folder, batch, repeats),
                    )
                )
                print(f"  measured {rows[-1].name}: {rows[-1].images_per_s:.1f} img/s", flush=True)
    return rows


def print_model_table(rows: list[ModelRow]) -> None:
    base = rows[0].images_per_s
    print("\n| model | params | GMACs | ONNX MB | images/s | ratio to dense FP32 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row.name} | {row.params / 1e6:.1f}M | {row.macs / 1e9:.2f} | "
            f"{row.onnx_bytes / 1e6:.1f} | {row.images_per_s:.1f} | {row.images_per_s / base:.2f} |"
        )
