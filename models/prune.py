"""`tagstream prune`: iterative APoZ pruning with fine-tuning, and its Table-II-style report.

Each round: accuracy before, APoZ on the validation split, channels removed for
real (models/apoz.py), accuracy right after pruning, fine-tuning (optionally
distilled from the unpruned model), accuracy after it, and the round's
parameters, MACs, channel sparsity and ONNX Runtime throughput, measured in the
same run. The pruned checkpoint carries its layer widths so it can be rebuilt.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.apoz import count_flops, count_params, prune_round, pruned_widths
from models.args import prune_parser
from models.checkpoint import load_trained
from models.export import export_onnx
from models.plots import line_chart_png
from models.train import evaluate, train_one_epoch


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return prune_parser(add_help=add_help)


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What `prune` takes: the flags of `tagstream prune` (models/args.py), same defaults."""

    checkpoint: Path
    data: Path | None = None
    output_dir: Path = Path("runs/prune")
    rounds: int = 1
    prune_rule: Literal["mean+std", "top-fraction"] = "mean+std"
    prune_k: float = 1.0
    prune_fraction: float = 0.1
    finetune_epochs: int = 1
    finetune_lr: float | None = None  # None: lr
    distill: bool = False
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bench_input_size: int = 224

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PruneConfig:
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        return cls(
            **{
                **values,
                "checkpoint": Path(args.checkpoint),
                "data": Path(args.data) if args.data else None,
                "output_dir": Path(args.output_dir),
            }
        )


class DistillationLoss(nn.Module):
    """Cross-entropy on labels blended with KL to a teacher's softened outputs (Hinton et al.)."""

    def __init__(self, teacher: nn.Module, *, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        self.alpha = alpha
        self.temperature = temperature
        self.images: torch.Tensor | None = None

    def forward(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hard = nn.functional.cross_entropy(output, targets)
        if self.images is None:
            return hard
        with torch.no_grad():
            teacher = self.teacher(self.images)
        t = self.temperature
        soft = nn.functional.kl_div(
            nn.functional.log_softmax(output / t, dim=1),
            nn.functional.softmax(teacher / t, dim=1),
            reduction="batchmean",
        ) * (t * t)
        return self.alpha * soft + (1 - self.alpha) * hard


def _remember_images(loader, criterion):
    # train_one_epoch hands the criterion only outputs and targets; the teacher needs the images.
    for images, targets in loader:
        if isinstance(criterion, DistillationLoss):
            criterion.images = images
        yield images, targets


def onnx_throughput(
    model: nn.Module, input_size: int, *, batch: int = 8, repeats: int = 3
) -> tuple[float, int]:

    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(
            copy.deepcopy(model).eval(), Path(scratch) / "m.onnx", input_size=input_size
        )
        size = path.stat().st_size
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).standard_normal(
            (batch, 3, input_size, input_size), dtype=np.float32
        )
        session.run(None, {name: x})
        started = time.perf_counter()
        for _ in range(repeats):
            session.run(None, {name: x})
        return batch * repeats / (time.perf_counter() - started), size


def main(args: argparse.Namespace) -> dict:
    return prune(PruneConfig.from_args(args))


def prune(config: PruneConfig) -> dict:
    """Prune `config.checkpoint` round by round. Returns the report's rows, the report's path
    (``report``) and the pruned checkpoints, one per round (``checkpoints``)."""

    loaded = load_trained(config.checkpoint, data=config.data, augment=True)
    checkpoint, trained = loaded.checkpoint, loaded.args
    model, splits = loaded.model, loaded.splits
    teacher = copy.deepcopy(model).eval() if config.distill else None
    loader = torch.utils.data.DataLoader
    generator = torch.Generator().manual_seed(trained["seed"])
    train_loader = loader(
        splits.train,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
    )
    val_loader = loader(splits.val, batch_size=64)
    test_loader = loader(splits.test, batch_size=64)
    bench_size = config.bench_input_size
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    rate, onnx_bytes = onnx_throughput(model, bench_size)
    base = {
        "round": 0,
        "acc_after_pruning": None,
        "acc_after_finetune": evaluate(model, test_loader),
        "sparsity": 0.0,
        "params": count_params(model),
        "macs": count_flops(model, bench_size),
        "onnx_bytes": onnx_bytes,
        "images_per_s": rate,
    }
    rows, checkpoints = [base], []
    print(f"round 0: test acc {base['acc_after_finetune']:.4f}, {rate:.1f} img/s", flush=True)
    for round_index in range(1, config.rounds + 1):
        report = prune_round(
            model,
            val_loader,
            rule=config.prune_rule,
            k=config.prune_k,
            fraction=config.prune_fraction,
            input_size=bench_size,
        )
        after_pruning = evaluate(model, test_loader)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.finetune_lr or config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        criterion = DistillationLoss(teacher) if teacher is not None else nn.CrossEntropyLoss()
        for _ in range(config.finetune_epochs):
            train_one_epoch(model, criterion, optimizer, _remember_images(train_loader, criterion))
        after_finetune = evaluate(model, test_loader)
        rate, onnx_bytes = onnx_throughput(model, bench_size)
        row = {
            "round": round_index,
            "acc_after_pruning": after_pruning,
            "acc_after_finetune": after_finetune,
            # Fine-tuning changes no layer's shape: the round's counts still hold.
            "sparsity": report.sparsity,
            "params": report.params_after,
            "macs": report.flops_after,
            "onnx_bytes": onnx_bytes,
            "images_per_s": rate,
            "removed": report.removed,
        }
        rows.append(row)
        print(
            f"round {round_index}: removed {report.removed} channels, acc after pruning "
            f"{after_pruning:.4f}, after fine-tune {after_finetune:.4f}, sparsity "
            f"{row['sparsity']:.4f}, {rate:.1f} img/s",
            flush=True,
        )
        checkpoints.append(out / f"pruned_round{round_index}.pt")
        torch.save(
            {
                **checkpoint,
                "model": model.state_dict(),
                "widths": pruned_widths(model),
                "prune_round": round_index,
            },
            checkpoints[-1],
        )
    (out / "prune_report.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"# APoZ pruning of {config.checkpoint}",
        "",
        f"rule {config.prune_rule} (k={config.prune_k}, fraction={config.prune_fraction}), "
        f"{config.finetune_epochs} fine-tune epoch(s) per round, distillation "
        f"{'on' if teacher is not None else 'off'}; throughput: ONNX Runtime CPU, batch 8, "
        f"{bench_size}x{bench_size}, measured in this run.",
        "",
        "| round | acc. after pruning | acc. after fine-tune | sparsity | params | MMACs "
        "| ONNX MB | img/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pruned = (
            "—" if row["acc_after_pruning"] is None else f"{100 * row['acc_after_pruning']:.2f}"
        )
        lines.append(
            f"| {row['round']} | {pruned} | {100 * row['acc_after_finetune']:.2f} "
            f"| {row['sparsity']:.4f} | {row['params'] / 1e6:.2f}M | {row['macs'] / 1e6:.1f} "
            f"| {row['onnx_bytes'] / 1e6:.1f} "
            f"| {row['images_per_s']:.1f} | {row['images_per_s'] / rows[0]['images_per_s']:.2f} |"
        )
    lines += ["", "![accuracy and speed-up per round](prune_report.png)"]
    (out / "prune_report.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "prune_report.png", rule=config.prune_rule)
    print("\n".join(lines[-len(rows) - 4 : -2]))
    return {
        "rows": rows,
        "report": str(out / "prune_report.md"),
        "checkpoints": [str(path) for path in checkpoints],
    }


def _plot(rows: list[dict], path: Path, *, rule: str) -> Path:
    """Accuracy after pruning and after fine-tuning against channel sparsity, each round
    labelled with its ONNX Runtime speed-up."""

    base = rows[0]
    after_finetune = [(r["sparsity"], 100 * r["acc_after_finetune"]) for r in rows]
    after_pruning = [(r["sparsity"], 100 * r["acc_after_pruning"]) for r in rows[1:]]
    series = {"after fine-tune": after_finetune}
    if after_pruning:
        series["right after pruning"] = [after_finetune[0], *after_pruning]
    notes = [
        (
            r["sparsity"],
            100 * r["acc_after_finetune"],
            f"{r['images_per_s'] / base['images_per_s']:.2f}x",
        )
        for r in rows
    ]
    return line_chart_png(
        series,
        path,
        title=f"APoZ pruning ({rule}): test accuracy and ONNX Runtime speed-up",
        x_label="channel sparsity of the prunable convolutions",
        y_label="test accuracy (%)",
        notes=notes,
    )
