"""`tagstream prune`: iterative APoZ pruning with fine-tuning, and its Table-II-style report.

Each round: accuracy before, APoZ on the validation split, channels removed for
real (models/apoz.py), accuracy right after pruning, fine-tuning (optionally
distilled from the unpruned model), accuracy after it, and the round's
parameters, MACs, channel sparsity and ONNX Runtime throughput, measured in the
same run. The pruned checkpoint carries its layer widths so it can be rebuilt.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from infra.exceptions import ConfigurationError


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
    import onnxruntime as ort

    from models.export import export_onnx

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


def main(args) -> dict:
    from models.apoz import (
        count_flops,
        count_params,
        prune_round,
        pruned_widths,
    )
    from models.checkpoint import load_trained
    from models.train import evaluate, train_one_epoch

    if not args.checkpoint:
        raise ConfigurationError("--checkpoint is required")
    loaded = load_trained(args.checkpoint, data=args.data, augment=True)
    checkpoint, trained = loaded.checkpoint, loaded.args
    model, splits = loaded.model, loaded.splits
    teacher = copy.deepcopy(model).eval() if args.distill else None
    loader = torch.utils.data.DataLoader
    generator = torch.Generator().manual_seed(trained["seed"])
    train_loader = loader(
        splits.train, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator
    )
    val_loader = loader(splits.val, batch_size=64)
    test_loader = loader(splits.test, batch_size=64)
    bench_size = args.bench_input_size
    out = Path(args.output_dir or "runs/prune")
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
    rows = [base]
    print(f"round 0: test acc {base['acc_after_finetune']:.4f}, {rate:.1f} img/s", flush=True)
    for round_index in range(1, args.rounds + 1):
        report = prune_round(
            model,
            val_loader,
            rule=args.prune_rule,
            k=args.prune_k,
            fraction=args.prune_fraction,
            input_size=bench_size,
        )
        after_pruning = evaluate(model, test_loader)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=args.finetune_lr or args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
        )
        criterion = DistillationLoss(teacher) if teacher is not None else nn.CrossEntropyLoss()
        for _ in range(args.finetune_epochs):
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
        torch.save(
            {
                **checkpoint,
                "model": model.state_dict(),
                "widths": pruned_widths(model),
                "prune_round": round_index,
            },
            out / f"pruned_round{round_index}.pt",
        )
    (out / "prune_report.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"# APoZ pruning of {args.checkpoint}",
        "",
        f"rule {args.prune_rule} (k={args.prune_k}, fraction={args.prune_fraction}), "
        f"{args.finetune_epochs} fine-tune epoch(s) per round, distillation "
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
    _plot(rows, out / "prune_report.png", args)
    print("\n".join(lines[-len(rows) - 4 : -2]))
    return {"rows": rows, "report": str(out / "prune_report.md")}


def _plot(rows: list[dict], path: Path, args) -> Path:
    """Accuracy after pruning and after fine-tuning against channel sparsity, each round
    labelled with its ONNX Runtime speed-up."""
    from models.plots import line_chart_png

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
        title=f"APoZ pruning ({args.prune_rule}): test accuracy and ONNX Runtime speed-up",
        x_label="channel sparsity of the prunable convolutions",
        y_label="test accuracy (%)",
        notes=notes,
    )
