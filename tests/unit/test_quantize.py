"""FP16 and INT8 variants of the demo model: loadable from their manifests, and faithful."""

from __future__ import annotations

import numpy as np
import pytest

from infra.demo_images import render_demo_jpeg
from models.demo import TEST_SEEDS_START, TRAIN_SEEDS_START, DemoRecipe
from models.manifest import Manifest
from models.quantize import make_variant
from models.runtime import OnnxClassifier

pytestmark = pytest.mark.slow


def arrays(
    classifier: OnnxClassifier, seed_start: int, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, name in enumerate(classifier.classes):
        for n in range(per_class):
            data = render_demo_jpeg(name, seed_start + n, size=DemoRecipe().render_size)
            xs.append(classifier.preset.from_bytes(data)[0])
            ys.append(label)
    return np.stack(xs), np.array(ys)


@pytest.fixture(scope="module")
def fp32(demo_model_dir) -> OnnxClassifier:
    return OnnxClassifier(demo_model_dir)


def test_int8_agrees_with_fp32(demo_model_dir, fp32, tmp_path) -> None:
    calibration, _ = arrays(fp32, TRAIN_SEEDS_START, 8)
    manifest = make_variant(
        demo_model_dir, tmp_path / "int8", "int8", calibration=list(np.split(calibration, 13))
    )
    assert manifest.precision == "int8" and manifest.parent == Manifest.load(demo_model_dir).name
    int8 = OnnxClassifier(tmp_path / "int8")  # from its manifest alone
    test, labels = arrays(fp32, TEST_SEEDS_START, 20)
    p32, p8 = fp32.probabilities(test).argmax(1), int8.probabilities(test).argmax(1)
    agreement = float((p32 == p8).mean())
    print(
        f"\nINT8 vs FP32 argmax agreement {agreement:.4f}; accuracy fp32 "
        f"{(p32 == labels).mean():.4f} int8 {(p8 == labels).mean():.4f}; "
        f"file {manifest.model_path(tmp_path / 'int8').stat().st_size} bytes vs "
        f"{Manifest.load(demo_model_dir).model_path(demo_model_dir).stat().st_size}"
    )
    assert agreement >= 0.97


def test_fp16_loads_from_manifest_and_agrees(demo_model_dir, fp32, tmp_path) -> None:
    manifest = make_variant(demo_model_dir, tmp_path / "fp16", "fp16")
    assert manifest.precision == "fp16"
    fp16 = OnnxClassifier(tmp_path / "fp16")
    test, _ = arrays(fp32, TEST_SEEDS_START, 5)
    assert (fp16.probabilities(test).argmax(1) == fp32.probabilities(test).argmax(1)).mean() >= 0.98


def test_unknown_precision_and_missing_calibration_are_refused(demo_model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="precision"):
        make_variant(demo_model_dir, tmp_path / "x", "int4")
    with pytest.raises(ValueError, match="calibration"):
        make_variant(demo_model_dir, tmp_path / "y", "int8")
