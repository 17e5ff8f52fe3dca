"""Transform presets shared by training and serving.

`ServingPreset` is the one definition of what a served image looks like: the
inference consumer applies it with Pillow and NumPy (no torch in that process),
and training evaluates through the same class, so the two cannot drift apart.

Every path that turns image bytes or files into model input turns the photo upright
first (`infra.images.upright`): phones write JPEGs in the sensor's orientation with an
EXIF orientation tag, and a model shown a sideways cat learns or predicts nonsense.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from infra.exceptions import DecodeImageError
from infra.images import upright

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decompression bombs are refused by Pillow past this many pixels (a 64 MP photo is plenty).
Image.MAX_IMAGE_PIXELS = 64_000_000


def load_upright(path: str | Path) -> Image.Image:
    """An image file as upright RGB: the loader of training and teacher scoring."""
    with Image.open(path) as image:
        return upright(image).convert("RGB")


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
        """Decode bytes to upright RGB; JPEGs are decoded at a reduced scale with `draft()`.

        Any failure on these untrusted bytes is a `DecodeImageError`, never another type."""
        try:
            image = Image.open(io.BytesIO(data))
            # draft() lets libjpeg skip DCT work for scales we would throw away anyway.
            image.draft("RGB", (self.resize_size, self.resize_size))
            image = upright(image).convert("RGB")
        except Exception as exc:  # Pillow's decoders raise many types on hostile input
            raise DecodeImageError(
                f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}"
            ) from None
        return image

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Scale the shorter side to `resize_size` and take the centre `input_size` square.

        Only the box that becomes the crop is resized, so the work and the memory are
        those of the crop: resizing the whole photo first would turn a hostile 1x60000
        image into 224 x 13 million pixels."""
        width, height = image.size
        scale = self.resize_size / min(width, height)
        box_w = min(width, self.input_size / scale)
        box_h = min(height, self.input_size / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        size = (self.input_size, self.input_size)
        if image.size == size and (box_w, box_h) == size:
            return image
        return image.resize(
            size, Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h)
        )

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
