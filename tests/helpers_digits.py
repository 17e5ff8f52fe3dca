"""scikit-learn's bundled digits (1,797 real handwritten images) written out as an ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(root: Path, *, size: int = 32) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = (np.asarray(pixels) * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        image.convert("RGB").save(folder / f"{index:04d}.png")
    return root
