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
) -> dict[str, float]:
    """One pass over `loader`; the scheduler (if any) steps per batch. Returns loss and accuracy."""
    model.train()
    seen, correct, loss_sum = 0, 0, 0.0
    for images, targets in loader:
        output = model(images)
        loss = criterion(output, targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
    """Softmax probabilities and labels for everything in `loader`."""
    model.eval()
    probabilities, labels = [], []
    for images, targets in loader:
        probabilities.append(torch.softmax(model(images), dim=1).numpy())
        labels.append(targets.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy over `loader`."""
    probabilities, labels = predict(model, loader)
    return float((probabilities.argmax(1) == labels).mean())
