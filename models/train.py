"""Training and evaluation loops (in the manner of torchvision's references/classification)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


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


def _device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(args) -> dict:
    """`tagstream train`: fine-tune ResNet50 on an ImageFolder; checkpoints, metrics, plots."""
    import json
    import time
    from pathlib import Path

    from tqdm import tqdm

    from infra.exceptions import ConfigurationError
    from models.data import load_splits
    from models.plots import confusion_matrix, confusion_matrix_png
    from models.presets import ServingPreset, TrainPreset
    from models.resnet import build_resnet50

    if not args.data:
        raise ConfigurationError("--data is required: an ImageFolder root")
    torch.manual_seed(args.seed)
    device = _device(args)
    out = Path(args.output_dir or "runs/train")
    out.mkdir(parents=True, exist_ok=True)
    serving = ServingPreset(input_size=args.input_size, resize_size=args.resize_size)
    splits = load_splits(
        args.data,
        train_transform=TrainPreset(input_size=args.input_size),
        eval_transform=lambda image: torch.from_numpy(serving(image)),
        val_split=args.val_split,
        test_split=args.test_split,
        seed=args.seed,
    )
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader
    train_loader = loader(
        splits.train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(splits.train) > args.batch_size,
        num_workers=args.workers,
        generator=generator,
    )
    val_loader = loader(splits.val, batch_size=64, num_workers=args.workers)
    test_loader = loader(splits.test, batch_size=64, num_workers=args.workers)

    model = build_resnet50(len(splits.classes), weights=args.weights, classes=splits.classes).to(
        device
    )
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=args.lr,
        total_steps=max(1, args.epochs * len(train_loader)),
        pct_start=0.25,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    history: list[dict] = []
    start_epoch, best = 0, -1.0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history = checkpoint["epoch"] + 1, checkpoint.get("history", [])
        if checkpoint["args"]["epochs"] == args.epochs:
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
        else:
            # Extending a finished run: its one-cycle schedule has ended, so a new cycle
            # spans the epochs that remain.
            remaining = max(1, (args.epochs - start_epoch) * len(train_loader))
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=args.lr, total_steps=remaining, pct_start=0.25
            )
        best = max((h["val_acc"] for h in history), default=-1.0)

    def on_device(batches):
        for images, targets in batches:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    # Mixed precision on CUDA: one scaler for the run, so its scale carries across epochs.
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    for epoch in range(start_epoch, args.epochs):
        started = time.monotonic()
        with tqdm(
            total=len(train_loader) * args.batch_size,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="img",
            disable=args.no_progress,
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
            "args": _plain(vars(args)),
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
    return metrics


def _plain(args: dict) -> dict:
    """The arguments a checkpoint keeps: plain values only (not the CLI's handler function),
    so that ``torch.load(weights_only=True)`` can read the checkpoint back."""
    return {k: v for k, v in args.items() if v is None or isinstance(v, str | int | float | bool)}
