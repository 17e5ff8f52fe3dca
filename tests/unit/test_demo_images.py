"""Demo images: deterministic, distinct per class, and separable by a tiny linear model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.demo_images import (
    DEMO_CLASSES,
    SEED_BLOCK,
    render_demo_image,
    render_demo_jpeg,
    render_demo_photo,
    render_demo_photo_jpeg,
    write_demo_image_folder,
)


def _small(cls: str, seed: int) -> np.ndarray:
    img = render_demo_image(cls, seed).resize((16, 16), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32).ravel() / 255.0


def test_classes_are_sorted_like_image_folder() -> None:
    assert len(DEMO_CLASSES) == 13
    assert list(DEMO_CLASSES) == sorted(DEMO_CLASSES)


def test_same_class_and_seed_give_same_pixels() -> None:
    for cls in ("cats", "spider", "others"):
        a, b = render_demo_image(cls, 42), render_demo_image(cls, 42)
        assert a.mode == "RGB" and a.size == (160, 160)
        assert a.tobytes() == b.tobytes()
        assert render_demo_jpeg(cls, 42) == render_demo_jpeg(cls, 42)
    assert render_demo_image("cats", 1).tobytes() != render_demo_image("cats", 2).tobytes()
    assert render_demo_image("cats", 1).tobytes() != render_demo_image("dogs", 1).tobytes()
    assert render_demo_image("horse", 3, size=64).size == (64, 64)


def test_jpeg_is_a_jpeg_and_unknown_class_fails() -> None:
    data = render_demo_jpeg("panda", 7, quality=80)
    assert data[:3] == b"\xff\xd8\xff"
    with pytest.raises(KeyError, match="unknown demo class"):
        render_demo_image("unicorn", 1)


def test_rendering_is_fast() -> None:
    started = time.perf_counter()
    for seed in range(26):
        render_demo_image(DEMO_CLASSES[seed % 13], seed)
    assert (time.perf_counter() - started) / 26 < 0.010


def test_nearest_centroid_on_16px_images_separates_the_classes() -> None:
    train = np.stack([np.stack([_small(c, s) for s in range(30)]) for c in DEMO_CLASSES])
    centroids = train.mean(axis=1)
    test_seeds = range(50_000, 50_012)
    x = np.stack([_small(c, s) for c in DEMO_CLASSES for s in test_seeds])
    y = np.repeat(np.arange(len(DEMO_CLASSES)), len(test_seeds))
    predicted = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == y).mean())
    print(f"nearest-centroid accuracy on held-out seeds: {accuracy:.3f}")
    assert accuracy >= 0.8


def test_write_demo_image_folder(tmp_path: Path) -> None:
    write_demo_image_folder(tmp_path, per_class=2, size=32, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_CLASSES)
    img = Image.open(tmp_path / "sheep" / "1.png")
    assert img.size == (32, 32)
    expected = render_demo_image("sheep", SEED_BLOCK + 1, size=32)
    assert img.convert("RGB").tobytes() == expected.tobytes()


def test_photos_are_tweet_sized_and_centre_on_the_demo_image() -> None:
    photo = render_demo_photo("cats", 5)
    assert photo.size == (1200, 900) and photo.mode == "RGB"
    # The centre crop is the square demo image itself, so the class is the square's.
    square = render_demo_image("cats", 5, size=900)
    assert photo.crop((150, 0, 1050, 900)).tobytes() == square.tobytes()
    sizes = [len(render_demo_photo_jpeg(c, 5)) for c in ("cats", "others", "spider")]
    assert all(50_000 < n < 400_000 for n in sizes), sizes  # as a real photo's JPEG
    with pytest.raises(ValueError, match="landscape"):
        render_demo_photo("cats", 5, width=800, height=900)
