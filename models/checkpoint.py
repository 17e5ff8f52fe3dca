"""A training checkpoint back as a model, its serving preset and the splits it was trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from infra.exceptions import ConfigurationError
from models.apoz import build_pruned_resnet50
from models.data import Splits, load_splits
from models.presets import ServingPreset, TrainPreset
from models.resnet import build_resnet50


@dataclass
class Trained:
    checkpoint: dict
    model: nn.Module
    serving: ServingPreset
    splits: Splits

    @property
    def args(self) -> dict:
        return self.checkpoint["args"]

    @property
    def classes(self) -> list[str]:
        return self.checkpoint["classes"]


def load_trained(
    path: str | Path, *, data: str | Path | None = None, augment: bool = False
) -> Trained:
    """Rebuild the checkpoint's model (dense, or pruned from its saved widths) in eval mode,
    and the same seeded splits of `data` (default: the data it was trained on).

    The training split gets the training augmentation with `augment` (to fine-tune),
    else the serving preset like the other splits (to calibrate).
    """

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    trained, classes = checkpoint["args"], checkpoint["classes"]
    serving = ServingPreset(
        input_size=trained["input_size"], resize_size=trained.get("resize_size")
    )
    if "widths" in checkpoint:
        model = build_pruned_resnet50(len(classes), checkpoint["widths"])
    else:
        model = build_resnet50(len(classes))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    data = data or trained["data"]

    def eval_transform(image):
        return torch.from_numpy(serving(image))

    splits = load_splits(
        data,
        train_transform=TrainPreset(input_size=trained["input_size"])
        if augment
        else eval_transform,
        eval_transform=eval_transform,
        val_split=trained["val_split"],
        test_split=trained["test_split"],
        seed=trained["seed"],
    )
    if splits.classes != classes:
        raise ConfigurationError(f"{data} has classes {splits.classes}, the checkpoint {classes}")
    return Trained(checkpoint, model, serving, splits)
