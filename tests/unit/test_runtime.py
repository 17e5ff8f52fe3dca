"""The ONNX Runtime wrapper: I/O binding, the provider really used, the precision recorded."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from infra.exceptions import ModelError
from infra.settings import Settings
from models.runtime import OnnxClassifier
from tests.helpers import run_cli


def cuda_really_works(model_dir) -> bool:
    """Whether a CUDA session really starts here (ONNX Runtime lists it regardless)."""
    try:
        OnnxClassifier(model_dir, provider="cuda")
    except ModelError:
        return False
    return True


def test_io_binding_on_preallocated_buffers_matches_a_plain_run(demo_model_dir) -> None:
    classifier = OnnxClassifier(demo_model_dir, max_batch=16)
    runner = classifier.runner()
    buffer = classifier.input_buffer()
    assert buffer.shape == (16, 3, 64, 64) and buffer.dtype == np.float32
    rng = np.random.default_rng(0)
    for rows in (16, 5, 1, 16):
        buffer[:rows] = rng.standard_normal((rows, 3, 64, 64), dtype=np.float32)
        bound = runner.run(buffer[:rows])
        plain = classifier.probabilities(buffer[:rows].copy())
        assert bound.shape == (rows, 13)
        np.testing.assert_allclose(bound, plain, rtol=1e-5, atol=1e-6)
    # Results are the caller's: the next run does not overwrite them.
    first = runner.run(buffer[:2])
    kept = first.copy()
    buffer[:2] = 0
    runner.run(buffer[:2])
    np.testing.assert_array_equal(first, kept)
    # A batch that is not a buffer slice (another dtype, not contiguous) still runs.
    strided = buffer[::2].astype(np.float64)
    np.testing.assert_allclose(
        runner.run(strided), classifier.probabilities(strided), rtol=1e-5, atol=1e-6
    )


def test_provider_and_precision_are_what_the_session_runs(demo_model_dir) -> None:
    classifier = OnnxClassifier(demo_model_dir)
    assert (classifier.provider, classifier.precision) == ("cpu", "fp32")
    assert classifier.providers == ["CPUExecutionProvider"]


def test_asking_for_cuda_where_it_cannot_start_is_refused_not_run_on_the_cpu(
    demo_model_dir,
) -> None:
    # The trap: ONNX Runtime lists the GPU providers even where they cannot start.
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda_really_works(demo_model_dir):
        pytest.skip("CUDA really works here: nothing falls back (tests/gpu covers it)")
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(ModelError, match="TAGSTREAM_ORT_ALLOW_FALLBACK") as refused:
            OnnxClassifier(demo_model_dir, provider=provider)
        assert "CPUExecutionProvider" in str(refused.value)
        allowed = OnnxClassifier(demo_model_dir, provider=provider, allow_fallback=True)
        assert (allowed.provider, allowed.precision) == ("cpu", "fp32")


def test_the_cli_refuses_to_start_with_one_error_line(demo_model_dir, monkeypatch, capsys) -> None:
    if cuda_really_works(demo_model_dir):
        pytest.skip("CUDA really works here")
    env = {"TAGSTREAM_ORT_PROVIDER": "cuda", "TAGSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9"}
    assert run_cli(monkeypatch, env, "infer", "--model-dir", str(demo_model_dir)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: asked for the cuda provider"), err


def test_precision_options_are_tensorrt_build_options(demo_model_dir) -> None:
    with pytest.raises(ModelError, match="TensorRT build option"):
        OnnxClassifier(demo_model_dir, precision="fp16")
    with pytest.raises(ModelError, match="needs a calibrated"):
        OnnxClassifier(demo_model_dir, provider="tensorrt", precision="int8", allow_fallback=True)
    with pytest.raises(ValidationError, match="TensorRT build option"):
        Settings(ort_precision="fp16")
    assert Settings(ort_provider="tensorrt", ort_precision="fp16").ort_precision == "fp16"


def test_from_settings_serves_with_the_consumer_options(demo_model_dir, tmp_path) -> None:
    settings = Settings(batch_max_size=12, data_dir=tmp_path)
    classifier = OnnxClassifier.from_settings(demo_model_dir, settings)
    assert classifier.max_batch == 12 and classifier.input_buffer().shape[0] == 12
    runner = classifier.runner()
    assert runner.run(classifier.input_buffer()).shape == (12, 13)
