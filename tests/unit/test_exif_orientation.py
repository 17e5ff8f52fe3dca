"""Photos with an EXIF orientation tag are turned upright in every decode path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.demo_images import render_demo_image
from infra.images import upright
from models.data import load_splits
from models.presets import ServingPreset, load_upright
from producers.collect import examine_image, hamming

#: EXIF orientation 6: the stored pixels are turned 90 degrees anticlockwise, and a
#: viewer turns them 90 degrees clockwise to show the photo.
ROTATE_CW = 6
EXIF_ORIENTATION = 0x0112


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    # Not square, so a sideways decode is visibly wrong (and a different shape).
    wide = render_demo_image("elephant", 7, size=240)
    return wide.crop((0, 40, 240, 200))  # 240 x 160


@pytest.fixture(scope="module")
def phone_jpeg(photo: Image.Image) -> bytes:
    """What a phone writes: the pixels sideways, and the tag that turns them back."""
    return jpeg(photo.transpose(Image.Transpose.ROTATE_90), ROTATE_CW)


def diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


#: Mean absolute pixel difference that JPEG re-encoding of a demo photo stays under;
#: the photo against itself turned upside down is several times more.
SAME = 6.0


def test_same_tells_a_turned_photo_apart(photo) -> None:
    assert diff(photo, photo.transpose(Image.Transpose.ROTATE_180)) > 3 * SAME


def test_the_fixture_really_is_sideways(photo, phone_jpeg) -> None:
    with Image.open(io.BytesIO(phone_jpeg)) as stored:
        assert stored.size == (160, 240) and stored.getexif()[EXIF_ORIENTATION] == ROTATE_CW


def test_upright_turns_it_and_leaves_untagged_photos_alone(photo, phone_jpeg) -> None:
    with Image.open(io.BytesIO(phone_jpeg)) as stored:
        turned = upright(stored).convert("RGB")
    assert turned.size == photo.size and diff(turned, photo) < SAME
    with Image.open(io.BytesIO(jpeg(photo))) as plain:
        assert upright(plain).size == photo.size


def test_a_malformed_exif_block_is_ignored_not_fatal(photo) -> None:
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    image = ServingPreset(input_size=64).decode(buf.getvalue())
    assert image.width > image.height  # decoded, as stored


def test_serving_decode_and_model_input_are_upright(photo, phone_jpeg) -> None:
    preset = ServingPreset(input_size=64, resize_size=80)
    decoded = preset.decode(phone_jpeg)
    assert decoded.size[0] > decoded.size[1]  # landscape, as the photo is
    array, resized = preset.from_bytes(phone_jpeg)
    reference, _ = preset.from_bytes(jpeg(photo))
    sideways, _ = preset.from_bytes(jpeg(photo.transpose(Image.Transpose.ROTATE_90)))
    assert diff(array, reference) < 0.05 < diff(sideways, reference)


def test_the_demo_model_sees_the_phone_photo_as_the_upright_one(
    demo_model_dir: Path, photo, phone_jpeg
) -> None:
    from models.runtime import OnnxClassifier

    classifier = OnnxClassifier(demo_model_dir)
    scores = [
        classifier.probabilities(classifier.preset.from_bytes(data)[0][None])[0]
        for data in (jpeg(photo), phone_jpeg)
    ]
    assert np.argmax(scores[0]) == np.argmax(scores[1])
    assert np.abs(scores[0] - scores[1]).max() < 0.05


def test_training_and_teacher_files_are_loaded_upright(tmp_path: Path, photo, phone_jpeg) -> None:
    for split in ("train", "val", "test"):
        folder = tmp_path / "data" / split / "elephant"
        folder.mkdir(parents=True)
        (folder / "phone.jpg").write_bytes(phone_jpeg)
    assert load_upright(tmp_path / "data" / "train" / "elephant" / "phone.jpg").size == photo.size
    splits = load_splits(
        tmp_path / "data",
        train_transform=None,
        eval_transform=None,
        val_split=0,
        test_split=0,
        seed=0,
    )
    for dataset in (splits.train, splits.val, splits.test, splits.calibration):
        image, _ = dataset[0]  # no transform given: the loaded PIL image itself
        assert image.size == photo.size and diff(image, photo) < SAME


def test_collect_hashes_the_upright_photo(photo, phone_jpeg) -> None:
    phone, plain = examine_image(phone_jpeg), examine_image(jpeg(photo))
    assert (phone.width, phone.height) == photo.size
    assert hamming(phone.phash, plain.phash) <= 4
