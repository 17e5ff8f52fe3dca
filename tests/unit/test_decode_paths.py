"""The two decode paths agree: Pillow with draft() (the CPU consumer) and torchvision (the
GPU consumer's path; here on the CPU with torchvision's CPU decoder, on a GPU box also
with nvJPEG) give the same top class on the demo images, thumbnails and photo-size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from infra.demo_images import render_demo_jpeg, render_demo_photo_jpeg
from models.presets import _EXIF_TURNS, TorchPreset
from models.runtime import OnnxClassifier

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def demo_images(classes: list[str]) -> list[bytes]:
    """Two 160-px thumbnails (what the demo image server sends) and one 1200x900 photo (what
    tweets carry) per class."""
    images = []
    for i, name in enumerate(classes):
        images += [render_demo_jpeg(name, 700_000 + i), render_demo_jpeg(name, 710_000 + i)]
        images.append(render_demo_photo_jpeg(name, 720_000 + i))
    return images


def pillow_batch(classifier: OnnxClassifier, images: list[bytes]) -> np.ndarray:
    return np.stack([classifier.preset.from_bytes(data)[0] for data in images])


@pytest.mark.parametrize("device", DEVICES)
def test_both_decode_paths_give_the_same_top_class(demo_model_dir, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    classifier = OnnxClassifier(demo_model_dir)
    images = demo_images(classifier.classes)
    torch_path = TorchPreset(classifier.preset, device=device)
    out = torch_path.new_batch(len(images))
    decoded = torch_path.decode_into(images, out)
    assert all(d.error is None for d in decoded)
    by_torch = out.cpu().numpy()
    by_pillow = pillow_batch(classifier, images)
    # Resampling differs (draft() first, a different bilinear kernel), pixels barely do.
    assert np.abs(by_torch - by_pillow).mean() < 0.05
    top_torch = classifier.probabilities(by_torch).argmax(1)
    top_pillow = classifier.probabilities(by_pillow).argmax(1)
    disagree = [i for i in range(len(images)) if top_torch[i] != top_pillow[i]]
    print(f"\n{device}: {len(images)} images, top class differs on {disagree}")
    assert not disagree


@pytest.mark.parametrize("device", DEVICES)
def test_bad_images_fail_alone_and_other_formats_decode(demo_model_dir, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    classifier = OnnxClassifier(demo_model_dir)
    good = render_demo_jpeg("cats", 1)
    png = io.BytesIO()
    Image.open(io.BytesIO(render_demo_jpeg("dogs", 2))).save(png, format="PNG")
    corrupt = good[:200] + b"\0" * 50
    torch_path = TorchPreset(classifier.preset, device=device, thumbnail_px=32)
    out = torch_path.new_batch(8)
    datas = [good, b"not an image", corrupt, png.getvalue(), good]
    decoded = torch_path.decode_into(datas, out, rows=[0, 1, 2, 3, 7])
    assert [d.error is None for d in decoded] == [True, False, False, True, True]
    assert "cannot decode image" in str(decoded[1].error)
    for d in (decoded[0], decoded[3]):
        assert d.thumbnail is not None
        assert Image.open(io.BytesIO(d.thumbnail)).size == (32, 32)
    by_pillow = pillow_batch(classifier, [good, png.getvalue()])
    rows = out.cpu().numpy()
    assert np.array_equal(rows[0], rows[7])
    for row, reference in zip((0, 3), by_pillow, strict=True):
        assert np.abs(rows[row] - reference).mean() < 0.05


def test_exif_orientations_turn_photos_upright_as_pillow_does() -> None:
    # An asymmetric 3x2 image: every orientation gives a different picture.
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    image = Image.fromarray(pixels, "RGB")
    preset = TorchPreset.__new__(TorchPreset)
    preset.torch = torch
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", exif=exif)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
        ours = preset._upright(tensor, orientation, applied=False).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, upright), orientation
    assert set(_EXIF_TURNS) == set(range(2, 9))
