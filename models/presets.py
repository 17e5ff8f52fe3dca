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
from dataclasses import dataclass
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
        values = np.arange(256, dtype=np.float32)[None, :] / 255.0
        self._lookup = ((values - self.mean.reshape(3, 1)) / self.std.reshape(3, 1)).astype(
            np.float32
        )

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

    def to_array(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """CHW, scaled to [0,1] and normalized; written into `out` (a row of a preallocated
        batch) when given, so a batch needs no stacking copy."""
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        if out is None or out.dtype != np.float32:
            target = np.empty((3, height, width), dtype=np.float32)
        else:
            target = out
        # (v / 255 - mean) / std for each of the 256 values of each channel, looked up.
        for channel in range(3):
            np.take(self._lookup[channel], pixels[..., channel], out=target[channel])
        if out is not None and target is not out:
            out[...] = target
            return out
        return target

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        return self.to_array(self.resize_crop(image.convert("RGB")), out)

    def from_bytes(self, data: bytes) -> tuple[np.ndarray, Image.Image]:
        """The model input and the resized image (for thumbnails) from encoded bytes."""
        resized = self.resize_crop(self.decode(data))
        return self.to_array(resized), resized


#: EXIF orientation -> (quarter turns counter-clockwise, then a left-right mirror), as
#: Pillow's ImageOps.exif_transpose turns a photo upright.
_EXIF_TURNS = {2: (0, True), 3: (2, False), 4: (2, True), 5: (1, True), 6: (3, False),
               7: (3, True), 8: (1, False)}  # fmt: skip


@dataclass
class TorchDecoded:
    """What `TorchPreset.decode_into` made of one image: its thumbnail, or why it failed."""

    thumbnail: bytes | None = None
    error: DecodeImageError | None = None


class TorchPreset:
    """The serving preset with torchvision, on the CPU or a CUDA device, a batch at a time.

    JPEGs are decoded by nvJPEG on a CUDA device (torchvision's batched `decode_jpeg`) or
    by libjpeg on the CPU; other formats by torchvision on the CPU. Resize (antialiased
    bilinear, as Pillow's), centre crop and normalisation run on the device, into a row of
    a preallocated batch tensor there, which ONNX Runtime then reads in place. Photos are
    turned upright by their EXIF orientation. Gives the same model input as
    `ServingPreset` up to resampling differences (tests check the top class agrees).
    """

    def __init__(
        self, preset: ServingPreset, *, device: str = "cpu", thumbnail_px: int = 0
    ) -> None:
        # Imported here for start-up time: only the GPU decode path (and its tests) load
        # torch; a CPU consumer never does.
        import torch

        self.torch = torch
        self.preset = preset
        self.device = torch.device(device)
        self.thumbnail_px = thumbnail_px
        mean = torch.as_tensor(preset.mean.ravel(), device=self.device).view(3, 1, 1)
        std = torch.as_tensor(preset.std.ravel(), device=self.device).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply-subtract.
        self.scale = 1.0 / (255.0 * std)
        self.offset = mean / std

    def new_batch(self, rows: int, dtype: str = "float32"):  # -> torch.Tensor
        size = self.preset.input_size
        return self.torch.zeros(
            (rows, 3, size, size), dtype=getattr(self.torch, dtype), device=self.device
        )

    def _header(self, data: bytes) -> tuple[str, int]:
        """Format and EXIF orientation from the header alone (no pixels decoded); refuses
        what Pillow refuses, decompression bombs included."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "", int(image.getexif().get(0x0112, 1) or 1)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            raise DecodeImageError(f"cannot decode image ({len(data)} bytes): {exc}") from exc

    def _decode(self, datas: list[bytes], headers: list[tuple[str, int] | None]) -> list:
        """Decoded uint8 CHW tensors on the device (None where the header was refused)."""
        import warnings

        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        torch = self.torch
        images: list = [None] * len(datas)
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        jpegs = [i for i, h in enumerate(headers) if h is not None and h[0] == "JPEG"]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec.
            warnings.simplefilter("ignore")
            if self.device.type == "cuda" and jpegs:
                try:
                    decoded = decode_jpeg(
                        [raw[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device
                    )
                    for i, image in zip(jpegs, decoded, strict=True):
                        images[i] = image
                except RuntimeError:
                    pass  # one bad JPEG fails the batch: decode them one by one below
            for i, header in enumerate(headers):
                if header is None or images[i] is not None:
                    continue
                try:
                    if header[0] == "JPEG":
                        image = decode_jpeg(
                            raw[i],
                            mode=ImageReadMode.RGB,
                            device=self.device,
                            apply_exif_orientation=self.device.type == "cpu",
                        )
                    else:
                        image = decode_image(raw[i], mode=ImageReadMode.RGB).to(self.device)
                except RuntimeError as exc:
                    images[i] = DecodeImageError(
                        f"cannot decode image ({len(datas[i])} bytes): {exc}"
                    )
                    continue
                images[i] = image
        return images

    def _upright(self, image, orientation: int, applied: bool):
        turns, mirror = _EXIF_TURNS.get(orientation, (0, False))
        if applied or (not turns and not mirror):
            return image
        if mirror:
            image = image.flip(-1)
        return self.torch.rot90(image, turns, dims=(-2, -1)) if turns else image

    def _resize(self, image, height: int, width: int):
        from torchvision.transforms.v2 import functional as F

        return F.resize(
            image, [height, width], interpolation=F.InterpolationMode.BILINEAR, antialias=True
        )

    def decode_into(
        self, datas: list[bytes], out, *, rows: list[int] | None = None
    ) -> list[TorchDecoded]:
        """Decode, resize, crop and normalise `datas` into rows of `out` (a batch tensor on
        the device): `rows[i]` for `datas[i]` (default: 0..n-1). The rows of images that
        fail are left as they were."""
        rows = list(range(len(datas))) if rows is None else rows
        headers: list[tuple[str, int] | None] = []
        results = [TorchDecoded() for _ in datas]
        for result, data in zip(results, datas, strict=True):
            try:
                headers.append(self._header(data))
            except DecodeImageError as exc:
                headers.append(None)
                result.error = exc
        images = self._decode(datas, headers)
        thumbnails: list[tuple[int, object]] = []
        size, resize = self.preset.input_size, self.preset.resize_size
        for i, (image, header) in enumerate(zip(images, headers, strict=True)):
            if isinstance(image, DecodeImageError):
                results[i].error = image
            if header is None or not isinstance(image, self.torch.Tensor):
                continue
            row = rows[i]
            # torchvision applies EXIF orientation itself only on the CPU.
            image = self._upright(
                image, header[1], applied=self.device.type == "cpu" and header[0] == "JPEG"
            )
            height, width = image.shape[-2:]
            scale = resize / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
            resized = (
                self._resize(image, new_h, new_w) if (new_h, new_w) != (height, width) else image
            )
            top, left = (new_h - size) // 2, (new_w - size) // 2
            crop = resized[:, top : top + size, left : left + size]
            out[row].copy_(crop)
            out[row].mul_(self.scale).sub_(self.offset)
            if self.thumbnail_px > 0:
                thumbnails.append((i, self._thumbnail(image)))
        for i, data in self._encode_thumbnails(thumbnails):
            results[i].thumbnail = data
        return results

    def _thumbnail(self, image):
        # The size Pillow's Image.thumbnail((edge, edge)) gives: fit the box, keep the aspect.
        height, width = image.shape[-2:]
        edge = self.thumbnail_px
        if max(height, width) <= edge:
            return image
        if width >= height:
            return self._resize(image, max(1, round(height * edge / width)), edge)
        return self._resize(image, edge, max(1, round(width * edge / height)))

    def _encode_thumbnails(self, thumbnails: list[tuple[int, object]]) -> list[tuple[int, bytes]]:
        import warnings

        from torchvision.io import encode_jpeg

        if not thumbnails:
            return []
        rows = [row for row, _ in thumbnails]
        tensors = [t.contiguous() for _, t in thumbnails]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoded = encode_jpeg(tensors, quality=80)  # batched with nvJPEG on CUDA
        return [
            (row, bytes(e.cpu().numpy().tobytes())) for row, e in zip(rows, encoded, strict=True)
        ]


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
