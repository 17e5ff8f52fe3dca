"""The inference consumer's decode stage: image events to a model-ready batch buffer.

Two decoders with one interface; each owns `depth` preallocated batch buffers (one per
batch in flight, handed out by slot number) and writes each image straight into its row:

- `HostDecoder` (the path without a GPU): each image is decoded as soon as it is
  consumed, on a thread pool (Pillow releases the GIL while decoding, and `draft()` lets
  libjpeg decode a JPEG at a reduced scale), into a host buffer the model reads in place;
- `DeviceDecoder` (the GPU path): a closed batch is decoded at once on the device by
  torchvision (nvJPEG), resized and normalised there into a CUDA buffer, which ONNX
  Runtime reads without a copy back to the host. One worker thread, so batch n+1 decodes
  while the model runs batch n. With ``device="cpu"`` it runs torchvision's CPU decoder
  into a host buffer: the same code, testable without a GPU.

A decoder never raises for a bad image: the image's `Prepared` carries the error and the
stage (``decode_image_event``, ``decode_image``), and the consumer dead-letters it.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from infra.exceptions import CodecError, DecodeImageError
from models.presets import TorchPreset
from models.runtime import BoundRunner, OnnxClassifier
from schemas.codec import Codec
from schemas.records import ImageEvent, now_ms


@dataclass
class Prepared:
    """One consumed image, decoded into its row of the batch buffer (or failed)."""

    message: Any
    event: ImageEvent | None = None
    thumbnail: bytes | None = None
    error: BaseException | None = None
    stage: str = ""
    timestamps: dict[str, float] = field(default_factory=dict)
    decode_s: float = 0.0  # wall time its decode took (on a host decoder's thread)


@dataclass
class Batch:
    """Images consumed together and run through the model together, in buffer `slot`."""

    slot: int
    prepared: list[Prepared] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)  # offset-tracking handles, per row
    futures: list[Future] = field(default_factory=list)
    closed: str = ""  # why it closed: full, idle or waited (processors.batching)
    decode_s: float = 0.0  # a device decoder's time for the whole batch

    def __len__(self) -> int:
        return len(self.prepared)


def make_thumbnail(image: Image.Image, edge: int) -> bytes | None:
    """A JPEG that fits in edge x edge (as `Image.thumbnail` sizes it), for the gallery.
    Bilinear, not thumbnail()'s bicubic: half the cost, and a thumbnail does not show it."""
    if edge <= 0:
        return None
    width, height = image.size
    scale = min(1.0, edge / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    thumb = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _decode_event(codec: Codec, prepared: Prepared) -> bool:
    try:
        prepared.event = codec.decode("ImageEvent", prepared.message.value())
    except CodecError as exc:
        prepared.error, prepared.stage = exc, "decode_image_event"
        return False
    return True


class _PooledDecoder:
    """What both decoders share: batch buffers, one per batch in flight, filled on a pool."""

    buffers: list
    pool: ThreadPoolExecutor

    @property
    def depth(self) -> int:
        """Batch buffers: how many batches may be in flight."""
        return len(self.buffers)

    def wait(self, batch: Batch) -> None:
        for future in batch.futures:
            future.result()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)


class HostDecoder(_PooledDecoder):
    """Pillow on a thread pool, each image as soon as it is consumed, into host buffers."""

    device = "cpu"

    def __init__(
        self,
        classifier: OnnxClassifier,
        codec: Codec,
        *,
        workers: int,
        thumbnail_px: int,
        depth: int,
    ) -> None:
        self.classifier = classifier
        self.preset = classifier.preset
        self.codec = codec
        self.thumbnail_px = thumbnail_px
        self.buffers = [classifier.input_buffer() for _ in range(depth)]
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def add(self, batch: Batch, row: int) -> None:
        """Decode row `row` of `batch` now, on the pool."""
        out = self.buffers[batch.slot][row]
        batch.futures.append(self.pool.submit(self._prepare, batch.prepared[row], out))

    def _prepare(self, prepared: Prepared, row: np.ndarray) -> None:
        started = time.perf_counter()
        if _decode_event(self.codec, prepared):
            assert prepared.event is not None
            try:
                image = self.preset.decode(prepared.event["image"])
                prepared.thumbnail = make_thumbnail(image, self.thumbnail_px)
                self.preset.to_array(self.preset.resize_crop(image), out=row)
            except DecodeImageError as exc:
                prepared.error, prepared.stage = exc, "decode_image"
        prepared.timestamps["decoded"] = now_ms()
        prepared.decode_s = time.perf_counter() - started

    def close(self, batch: Batch) -> None:
        """Every image is already being decoded."""

    def run_model(self, runner: BoundRunner, batch: Batch) -> np.ndarray:
        return runner.run(self.buffers[batch.slot][: len(batch)])


class DeviceDecoder(_PooledDecoder):
    """torchvision on a device, a closed batch at a time, into buffers on that device."""

    def __init__(
        self,
        classifier: OnnxClassifier,
        codec: Codec,
        *,
        thumbnail_px: int,
        depth: int,
        device: str = "cuda",
    ) -> None:
        if device != "cpu":
            device = f"cuda:{classifier.device_id}"
        self.classifier = classifier
        self.codec = codec
        self.device = device
        self.preset = TorchPreset(classifier.preset, device=device, thumbnail_px=thumbnail_px)
        dtype = np.dtype(classifier.input_dtype).name  # float16 or float32
        self.buffers = [self.preset.new_batch(classifier.max_batch, dtype) for _ in range(depth)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="device-decode")

    def add(self, batch: Batch, row: int) -> None:
        """Nothing yet: the device decodes the whole batch once it closes."""

    def close(self, batch: Batch) -> None:
        batch.futures.append(self.pool.submit(self._decode_batch, batch))

    def _decode_batch(self, batch: Batch) -> None:
        started = time.perf_counter()
        rows = [i for i, p in enumerate(batch.prepared) if _decode_event(self.codec, p)]
        datas = [batch.prepared[i].event["image"] for i in rows]  # type: ignore[index]
        buffer = self.buffers[batch.slot]
        if self.device == "cpu":
            decoded = self.preset.decode_into(datas, buffer, rows=rows) if rows else []
        else:
            cuda = self.preset.torch.cuda
            with cuda.device(self.device):
                decoded = self.preset.decode_into(datas, buffer, rows=rows) if rows else []
                # The model thread hands this buffer to ONNX Runtime, which reads it on its
                # own stream: the decode's kernels must be done first.
                cuda.current_stream().synchronize()
        done = now_ms()
        for row, result in zip(rows, decoded, strict=True):
            prepared = batch.prepared[row]
            prepared.thumbnail = result.thumbnail
            if result.error is not None:
                prepared.error, prepared.stage = result.error, "decode_image"
        for prepared in batch.prepared:
            prepared.timestamps["decoded"] = done
        batch.decode_s = time.perf_counter() - started

    def run_model(self, runner: BoundRunner, batch: Batch) -> np.ndarray:
        rows = self.buffers[batch.slot][: len(batch)]
        if self.device == "cpu":
            return runner.run(rows.numpy())
        return runner.run_device(rows.data_ptr(), tuple(rows.shape), self.classifier.input_dtype)


Decoder = HostDecoder | DeviceDecoder
