"""Model throughput at serving size and accuracy on a real task: dense vs APoZ-pruned,
FP32 vs INT8, all measured in one run.

Accuracy (`digits_accuracy`): a ResNet50 is trained from scratch on scikit-learn's
bundled digits (1,797 real images) at 32x32, pruned by one APoZ round (`top-fraction`,
to the chosen channel sparsity) and fine-tuned distilled from the dense model; each is
exported to ONNX in FP32 and static QDQ INT8 (calibrated on training images), and each
of the four is scored on the same held-out test split through ONNX Runtime.

Throughput: the same two networks (the digits-trained dense and pruned ones; the
pruned widths do not depend on the input size) are exported at 224x224, INT8
calibrated on generated demo images, and timed with ONNX Runtime on the CPU. Without
the accuracy task (`accuracy=False`, for a quick look or tests) the networks are a
random-weight ResNet50 and its APoZ-pruned copy.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infra.demo_images import DEMO_CLASSES, render_demo_image
from models.apoz import count_flops, count_params, prune_round
from models.checkpoint import load_trained
from models.data import write_digits_folder
from models.export import ExportConfig, export, export_onnx
from models.manifest import Manifest, file_sha256
from models.presets import IMAGENET_MEAN, IMAGENET_STD, ServingPreset
from models.prune import PruneConfig, prune
from models.quantize import make_variant
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier
from models.train import TrainConfig, train


@dataclass
class ModelRow:
    name: str
    params: int
    macs: int
    onnx_bytes: int
    images_per_s: float
    accuracy: float | None = None  # on the digits test split, at its small input size


def _save_with_manifest(model: torch.nn.Module, folder: Path, input_size: int) -> Path:
    export_onnx(model, folder / "model.onnx", input_size=input_size)
    classes = [f"class{i}" for i in range(model.fc.out_features)]
    Manifest(
        model_id="bench-resnet50",
        version=folder.name,
        classes=classes,
        thresholds=dict.fromkeys(classes, 0.5),
        input_size=input_size,
        resize_size=input_size,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
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


def digits_accuracy(
    workdir: Path,
    *,
    epochs: int = 8,
    finetune_epochs: int = 3,
    fraction: float = 0.5,
    input_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, float], torch.nn.Module, torch.nn.Module]:
    """Train, prune and export on the digits; the test accuracy of the four ONNX variants.

    Returns ({"dense FP32": acc, ...}, the dense network, the pruned network).
    """

    data = write_digits_folder(workdir / "digits", size=input_size)
    print(
        f"accuracy task: training ResNet50 on the digits at {input_size}x{input_size}", flush=True
    )
    trained = train(
        TrainConfig(
            data=data,
            output_dir=workdir / "dense",
            input_size=input_size,
            batch_size=32,
            opt="adamw",
            lr=0.002,
            epochs=epochs,
            no_progress=not progress,
        )
    )
    dense_ckpt = Path(trained["best_checkpoint"])
    print(f"accuracy task: pruning {fraction:.0%} of the prunable channels", flush=True)
    pruned = prune(
        PruneConfig(
            checkpoint=dense_ckpt,
            output_dir=workdir / "pruned",
            rounds=1,
            prune_rule="top-fraction",
            prune_fraction=fraction,
            finetune_epochs=finetune_epochs,
            distill=True,
            batch_size=32,
            lr=0.005,
            bench_input_size=input_size,
        )
    )
    pruned_ckpt = Path(pruned["checkpoints"][-1])
    dense = load_trained(dense_ckpt)
    test = dense.splits.test
    pairs = [test[i] for i in range(len(test))]
    images = np.stack([image.numpy() for image, _ in pairs])
    labels = np.array([label for _, label in pairs])
    accuracy = {}
    for label, checkpoint in (("dense", dense_ckpt), ("pruned", pruned_ckpt)):
        # One export: an INT8 export writes its FP32 parent beside it.
        exported = export(
            ExportConfig(
                checkpoint=checkpoint,
                output_dir=workdir / "onnx" / f"{label}-int8",
                precision="int8",
                calibration_images=256,
            )
        )
        int8, fp32 = Path(exported["output"]), Path(exported["fp32_output"])
        for precision, folder in (("fp32", fp32), ("int8", int8)):
            predicted = OnnxClassifier(folder).probabilities(images).argmax(1)
            name = f"{label} {precision.upper()}"
            accuracy[name] = float((predicted == labels).mean())
            print(f"  {name}: digits test accuracy {accuracy[name]:.4f}", flush=True)
    return accuracy, dense.model, load_trained(pruned_ckpt).model


def model_table(
    *,
    input_size: int = 224,
    batch_size: int = 8,
    repeats: int = 4,
    fraction: float = 0.5,
    accuracy: bool = False,
    epochs: int = 8,
    finetune_epochs: int = 3,
    progress: bool = False,
) -> list[ModelRow]:
    """Dense/pruned x FP32/INT8 rows, timed at `input_size`; with `accuracy`, the networks
    are the digits-trained ones and each row carries its digits test accuracy."""
    torch.manual_seed(0)
    preset = ServingPreset(input_size=input_size)
    images = np.stack(
        [
            preset(render_demo_image(name, seed, size=input_size))
            for name in DEMO_CLASSES
            for seed in range(2)
        ]
    )
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        scores: dict[str, float] = {}
        if accuracy:
            scores, dense, pruned = digits_accuracy(
                root / "digits-task",
                epochs=epochs,
                finetune_epochs=finetune_epochs,
                fraction=fraction,
                progress=progress,
            )
        else:
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
        for label, model in (("dense", dense), ("pruned", pruned)):
            params, macs = count_params(model), count_flops(model, input_size)
            fp32 = _save_with_manifest(model, root / f"{label}-fp32", input_size)
            int8 = root / f"{label}-int8"
            make_variant(fp32, int8, "int8", calibration=calibration)
            for precision, folder in (("FP32", fp32), ("INT8", int8)):
                name = f"{label} {precision}"
                rows.append(
                    ModelRow(
                        name,
                        params,
                        macs,
                        (folder / "model.onnx").stat().st_size,
                        _throughput(folder, batch, repeats),
                        scores.get(name),
                    )
                )
                print(f"  measured {name}: {rows[-1].images_per_s:.1f} img/s", flush=True)
    return rows


def pruned_resnet50_variants(
    root: Path,
    *,
    input_size: int = 224,
    fraction: float = 0.5,
    classes: int = 13,
    precisions: tuple[str, ...] = ("fp32", "int8"),
) -> dict[str, Path]:
    """Served models with the cost of ours at `input_size`: a ResNet50 with random weights
    (speed, not accuracy), one APoZ round removing `fraction` of the prunable channels
    (measured on demo images), exported to ONNX in FP32 and turned into each of
    `precisions` (FP16; static QDQ INT8 calibrated on demo images), each in
    ``root/<precision>`` beside its manifest. Built once; reused after."""
    folders = {precision: root / precision for precision in ("fp32", *precisions)}
    if all((folder / "manifest.json").is_file() for folder in folders.values()):
        return {precision: folders[precision] for precision in precisions}
    torch.manual_seed(0)
    preset = ServingPreset(input_size=input_size)
    images = np.stack(
        [
            preset(render_demo_image(name, seed, size=input_size))
            for name in DEMO_CLASSES
            for seed in range(2)
        ]
    )
    model = build_resnet50(classes, weights=None).eval()
    loader = [(torch.from_numpy(images), torch.zeros(len(images), dtype=torch.long))]
    report = prune_round(
        model, loader, rule="top-fraction", fraction=fraction, input_size=input_size
    )
    print(f"pruned: {report}", flush=True)
    fp32 = _save_with_manifest(model, folders["fp32"], input_size)
    for precision in precisions:
        if precision != "fp32":
            calibration = list(np.array_split(images, 4)) if precision == "int8" else None
            make_variant(fp32, folders[precision], precision, calibration=calibration)
    return {precision: folders[precision] for precision in precisions}


def print_model_table(rows: list[ModelRow]) -> None:
    base = rows[0]
    with_accuracy = base.accuracy is not None
    print(
        "\n| model | params | GMACs | ONNX MB | images/s | ratio to dense FP32 |"
        + (" digits acc. | vs dense FP32 |" if with_accuracy else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if with_accuracy else ""))
    for row in rows:
        line = (
            f"| {row.name} | {row.params / 1e6:.1f}M | {row.macs / 1e9:.2f} | "
            f"{row.onnx_bytes / 1e6:.1f} | {row.images_per_s:.1f} | "
            f"{row.images_per_s / base.images_per_s:.2f} |"
        )
        if with_accuracy and row.accuracy is not None:
            line += f" {100 * row.accuracy:.2f} | {100 * (row.accuracy - base.accuracy):+.2f} |"
        print(line)
