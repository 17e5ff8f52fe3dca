"""Transform presets shared by training and serving.

`ServingPreset` is the one definition of what a served image looks like: the
inference consumer applies it with Pillow and NumPy (no torch in that process),
and training evaluates through the same class, so the two cannot drift apart.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from infra.exceptions import DecodeImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decompression bombs are refused by Pillow past this many pixels (a 64 MP photo is plenty).
Image.MAX_IMAGE_PIXELS = 64_000_000


class ServingPreset:
    """Decode, resize the shorter side, centre-crop, scale to [0,1], normalize: CHW float32."""

    def __init__(
        self,
        *,
        input_size: int,
        resize_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.input_size = input_size
        self.resize_size = resize_size or input_size
        if self.resize_size < input_size:
            raise ValueError("resize_size must be at least input_size")
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def decode(self, data: bytes) -> Image.Image:
        """Decode bytes to RGB; JPEGs are decoded at a reduced scale with `draft()` first."""
        try:
            image = Image.open(io.BytesIO(data))
            # draft() lets libjpeg skip DCT work for scales we would throw away anyway.
            image.draft("RGB", (self.resize_size, self.resize_size))
            image = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            raise DecodeImageError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
        return image

    def resize_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        new_size = (
            max(self.input_size, round(width * scale)),
            max(self.input_size, round(height * scale)),
        )
        if new_size != image.size:
            image = image.resize(new_size, Image.Resampling.BILINEAR)
        left = (new_size[0] - self.input_size) // 2
        top = (new_size[1] - self.input_size) // 2
        if new_size != (self.input_size, self.input_size):
            image = image.crop((left, top, left + self.input_size, top + self.input_size))
        return image

    def to_array(self, image: Image.Image) -> np.ndarray:
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (array - self.mean) / self.std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.to_array(self.resize_crop(image.convert("RGB")))

    def from_bytes(self, data: bytes) -> tuple[np.ndarray, Image.Image]:
        """The model input and the resized image (for thumbnails) from encoded bytes."""
        resized = self.resize_crop(self.decode(data))
        return self.to_array(resized), resized


class TrainPreset:
    """Training augmentation (torchvision): random resized crop and flip, then normalize."""

    def __init__(
        self,
        *,
        input_size: int,
        scale: tuple[float, float] = (0.6, 1.0),
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        # Imported here for start-up time: the serving process imports this module and
        # must never load torch (tests/unit/test_serving_imports.py).
        import torch
        from torchvision.transforms import v2 as T

        self.transform = T.Compose(
            [
                T.ToImage(),
                T.RandomResizedCrop(input_size, scale=scale, antialias=True),
                T.RandomHorizontalFlip(hflip),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    def __call__(self, image: Image.Image):  # -> torch.Tensor
        return self.transform(image.convert("RGB"))
