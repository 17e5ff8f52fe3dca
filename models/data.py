"""ImageFolder data for training: given splits, or stratified splits made with a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from infra.exceptions import ConfigurationError
from models.presets import load_upright


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: list[str]
    calibration: torch.utils.data.Dataset  # training images with the eval transform


def stratified_indices(
    targets: list[int], *, val_split: float, test_split: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Per class, a seeded shuffle cut into train / val / test (each class in every split)."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    labels = np.asarray(targets)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        n_val = max(1, round(len(members) * val_split))
        n_test = max(1, round(len(members) * test_split))
        val += members[:n_val]
        test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


def load_splits(
    root: str | Path,
    *,
    train_transform,
    eval_transform,
    val_split: float,
    test_split: float,
    seed: int,
) -> Splits:
    root = Path(root)
    if not root.is_dir():
        raise ConfigurationError(f"--data {root} is not a folder")
    if (root / "train").is_dir():
        # A class may have no training images (a pseudo-label selection found none).
        train = ImageFolder(
            root / "train", transform=train_transform, allow_empty=True, loader=load_upright
        )
        val_root = root / "val" if (root / "val").is_dir() else None
        test_root = root / "test" if (root / "test").is_dir() else None
        if val_root is None or test_root is None:
            raise ConfigurationError(f"{root} has train/ but not both val/ and test/")
        val = ImageFolder(val_root, transform=eval_transform, loader=load_upright)
        test = ImageFolder(test_root, transform=eval_transform, loader=load_upright)
        if not (train.classes == val.classes == test.classes):
            raise ConfigurationError(f"train/, val/ and test/ of {root} name different classes")
        calibration = ImageFolder(
            root / "train", transform=eval_transform, allow_empty=True, loader=load_upright
        )
        return Splits(train, val, test, list(train.classes), calibration)
    for_train = ImageFolder(root, transform=train_transform, loader=load_upright)
    for_eval = ImageFolder(root, transform=eval_transform, loader=load_upright)
    train_idx, val_idx, test_idx = stratified_indices(
        for_train.targets, val_split=val_split, test_split=test_split, seed=seed
    )
    subset = torch.utils.data.Subset
    return Splits(
        subset(for_train, train_idx),
        subset(for_eval, val_idx),
        subset(for_eval, test_idx),
        list(for_train.classes),
        subset(for_eval, train_idx),
    )


def write_digits_folder(root: Path, *, size: int = 32) -> Path:
    """scikit-learn's bundled digits (1,797 real handwritten 8x8 images, shipped with the
    package, so no download) written out as an ImageFolder of RGB PNGs at `size`."""
    try:
        # Imported here for start-up time: scikit-learn (a dev dependency) takes about a
        # second to import and only this function needs it.
        from sklearn.datasets import load_digits
    except ImportError as exc:  # a dev extra: `make install` has it
        raise ConfigurationError(
            "the digits task needs scikit-learn: pip install -e '.[dev]'"
        ) from exc
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = (np.asarray(pixels) * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        image.convert("RGB").save(folder / f"{index:04d}.png")
    return root
