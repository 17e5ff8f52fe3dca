"""`tagstream train`, and the training and evaluation loops (in the manner of torchvision's
references/classification)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.args import train_parser
from models.data import load_splits
from models.plots import confusion_matrix, confusion_matrix_png
from models.presets import ServingPreset, TrainPreset
from models.resnet import build_resnet50


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return train_parser(add_help=add_help)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What `train` takes: the flags of `tagstream train` (models/args.py), same defaults."""

    data: Path
    output_dir: Path = Path("runs/train")
    weights: str = "none"
    input_size: int = 224
    resize_size: int | None = None
    epochs: int = 10
    batch_size: int = 32
    opt: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    val_split: float = 0.15
    test_split: float = 0.15
    seed: int = 0
    workers: int = 0
    device: str | None = None
    resume: Path | None = None
    no_progress: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        return cls(
            **{
                **values,
                "data": Path(args.data),
                "output_dir": Path(args.output_dir),
                "resume": Path(args.resume) if args.resume else None,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (paths as strings): what a checkpoint keeps as its ``args``, so
        that ``torch.load(weights_only=True)`` can read the checkpoint back."""
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self).items()
        }


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress=None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over `loader`; the scheduler (if any) steps per batch. Returns loss and accuracy.

    With a CUDA `scaler`: mixed precision, autocast for the forward pass and the scaler for
    the gradients (it skips the steps whose gradients overflow, so a non-finite FP16 loss
    is not an error then).
    """
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0
    for images, targets in loader:
        with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
            output = model(images)
            loss = criterion(output, targets)
        if scaler is None and not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        seen += len(targets)
        correct += int((output.argmax(1) == targets).sum())
        loss_sum += loss.item() * len(targets)
        if progress is not None:
            progress.update(len(targets))
            progress.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels for everything in `loader`, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    probabilities, labels = [], []
    for images, targets in loader:
        probabilities.append(torch.softmax(model(images.to(device)), dim=1).cpu().numpy())
        labels.append(targets.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy over `loader`."""
    probabilities, labels = predict(model, loader)
    return float((probabilities.argmax(1) == labels).mean())


def resolve_device(device: str | None) -> torch.device:
    """`device`, or CUDA when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> dict:
    return train(TrainConfig.from_args(args))


def train(config: TrainConfig) -> dict:
    """Fine-tune ResNet50 on an ImageFolder; checkpoints, metrics, plots.

    Returns the test metrics (also in ``metrics.json``) and ``best_checkpoint``, the path of
    the checkpoint with the best validation accuracy.
    """

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    serving = ServingPreset(input_size=config.input_size, resize_size=config.resize_size)
    splits = load_splits(
        config.data,
        train_transform=TrainPreset(input_size=config.input_size),
        eval_transform=lambda image: torch.from_numpy(serving(image)),
        val_split=config.val_split,
        test_split=config.test_split,
        seed=config.seed,
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader
    train_loader = loader(
        splits.train,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(splits.train) > config.batch_size,
        num_workers=config.workers,
        generator=generator,
    )
    val_loader = loader(splits.val, batch_size=64, num_workers=config.workers)
    test_loader = loader(splits.test, batch_size=64, num_workers=config.workers)

    model = build_resnet50(len(splits.classes), weights=config.weights, classes=splits.classes).to(
        device
    )
    if config.opt == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=max(1, config.epochs * len(train_loader)),
        pct_start=0.25,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: list[dict] = []
    start_epoch, best = 0, -1.0
    if config.resume:
        checkpoint = torch.load(config.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history = checkpoint["epoch"] + 1, checkpoint.get("history", [])
        if checkpoint["args"]["epochs"] == config.epochs:
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
        else:
            # Extending a finished run: its one-cycle schedule has ended, so a new cycle
            # spans the epochs that remain.
            remaining = max(1, (config.epochs - start_epoch) * len(train_loader))
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=config.lr, total_steps=remaining, pct_start=0.25
            )
        best = max((h["val_acc"] for h in history), default=-1.0)

    def on_device(batches):
        for images, targets in batches:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    # Mixed precision on CUDA: one scaler for the run, so its scale carries across epochs.
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    for epoch in range(start_epoch, config.epochs):
        started = time.monotonic()
        with tqdm(
            total=len(train_loader) * config.batch_size,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="img",
            disable=config.no_progress,
        ) as bar:
            stats = train_one_epoch(
                model,
                criterion,
                optimizer,
                on_device(train_loader),
                scheduler=scheduler,
                progress=bar,
                scaler=scaler,
            )
        val_acc = evaluate(model, val_loader)
        history.append(
            {
                "epoch": epoch,
                "train_loss": stats["loss"],
                "train_acc": stats["acc"],
                "val_acc": val_acc,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "args": config.to_dict(),
            "classes": splits.classes,
            "history": history,
        }
        torch.save(checkpoint, out / "checkpoint.pt")
        if val_acc > best:
            best = val_acc
            torch.save(checkpoint, out / "model_best.pt")
        print(
            f"epoch {epoch + 1}: train acc {stats['acc']:.4f} loss {stats['loss']:.4f},"
            f" val acc {val_acc:.4f}",
            flush=True,
        )

    best_checkpoint = torch.load(out / "model_best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(best_checkpoint["model"])
    model.to("cpu")
    probabilities, labels = predict(model, test_loader)
    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predicted, len(splits.classes))
    per_class = {
        name: {
            "precision": float(matrix[i, i] / max(matrix[:, i].sum(), 1)),
            "recall": float(matrix[i, i] / max(matrix[i].sum(), 1)),
        }
        for i, name in enumerate(splits.classes)
    }
    metrics = {
        "test_acc": float((predicted == labels).mean()),
        "best_val_acc": best,
        "classes": splits.classes,
        "per_class": per_class,
        "history": history,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    confusion_matrix_png(
        matrix, splits.classes, out / "confusion_matrix.png", title=f"test set, {out}"
    )
    print(
        f"test accuracy {metrics['test_acc']:.4f};"
        f" wrote {out}/metrics.json and confusion_matrix.png"
    )
    return {**metrics, "best_checkpoint": str(out / "model_best.pt")}
