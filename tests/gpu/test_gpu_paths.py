"""The GPU paths: an AMP training step on CUDA, FP16 ONNX on the CUDA execution provider,
the consumer's GPU decode (nvJPEG into a CUDA buffer ONNX Runtime reads in place), TensorRT.

Marked `gpu`; each test skips cleanly (with the reason) where torch sees no CUDA device
or ONNX Runtime has no CUDA provider. Run them on a GPU box with ``pytest -m gpu -s``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.quantize import make_variant
from models.resnet import build_resnet50
from models.runtime import OnnxClassifier
from models.variant_bench import _save_with_manifest

pytestmark = pytest.mark.gpu

INPUT = 64


def _need_torch_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")


def _need_ort_cuda() -> None:
    import onnxruntime as ort

    # onnxruntime-gpu lists its CUDA provider whether or not a GPU is there.
    _need_torch_cuda()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime has no CUDA provider here ({ort.get_available_providers()})")


def _batch(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, INPUT, INPUT), dtype=np.float32)


def test_amp_training_step_on_cuda_learns_a_fixed_batch() -> None:
    _need_torch_cuda()
    from models.train import train_one_epoch

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_resnet50(4).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    images = torch.from_numpy(_batch()).to(device)
    targets = (torch.arange(16) % 4).to(device)
    before = model.fc.weight.detach().clone()

    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(8):
        stats = train_one_epoch(
            model, torch.nn.CrossEntropyLoss(), optimizer, [(images, targets)],
            scheduler=scheduler, scaler=scaler,
        )  # fmt: skip
        losses.append(stats["loss"])
    print(f"\nAMP losses on one batch: {[round(x, 3) for x in losses]}")
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # it fits the batch: autocast and the scaler both work
    assert not torch.equal(before, model.fc.weight.detach())
    assert model.fc.weight.dtype == torch.float32  # AMP keeps master weights in FP32


def test_fp16_model_runs_on_the_cuda_provider_and_agrees_with_fp32(tmp_path) -> None:
    _need_ort_cuda()
    torch.manual_seed(0)
    model = build_resnet50(13, weights=None).eval()
    # Randomly initialised BN statistics make logits tiny; a few train-mode passes give
    # realistic activations to compare.
    with torch.no_grad():
        model.train()
        for seed in range(4):
            model(torch.from_numpy(_batch(seed=seed)))
        model.eval()
    fp32 = _save_with_manifest(model, tmp_path / "fp32", INPUT)
    make_variant(fp32, tmp_path / "fp16", "fp16")
    reference = OnnxClassifier(fp32, provider="cpu")
    half = OnnxClassifier(tmp_path / "fp16", provider="cuda")
    assert half.providers[0] == "CUDAExecutionProvider", half.providers
    batch = _batch(32, seed=9)
    p32, p16 = reference.probabilities(batch), half.probabilities(batch)
    agreement = float((p32.argmax(1) == p16.argmax(1)).mean())
    diff = float(np.abs(p32 - p16).max())
    print(
        f"\nFP16 on CUDA vs FP32 on CPU: argmax agreement {agreement:.3f}, max |p diff| {diff:.2e}"
    )
    assert agreement >= 0.9 and diff < 0.05


def test_fp32_model_on_cuda_matches_cpu(tmp_path) -> None:
    _need_ort_cuda()
    torch.manual_seed(1)
    model = build_resnet50(13, weights=None).eval()
    folder = _save_with_manifest(model, tmp_path / "fp32", INPUT)
    cpu, gpu = OnnxClassifier(folder, provider="cpu"), OnnxClassifier(folder, provider="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
    batch = _batch(8, seed=3)
    assert np.abs(cpu.probabilities(batch) - gpu.probabilities(batch)).max() < 1e-3


def _need_ort_tensorrt(folder) -> None:
    _need_ort_cuda()
    from infra.exceptions import ModelError

    try:
        OnnxClassifier(folder, provider="tensorrt")
    except ModelError as exc:
        pytest.skip(f"TensorRT does not start here: {exc}")


def test_cuda_session_is_really_on_cuda_and_records_it(demo_model_dir) -> None:
    _need_ort_cuda()
    classifier = OnnxClassifier(demo_model_dir, provider="cuda")
    assert (classifier.provider, classifier.precision) == ("cuda", "fp32")
    assert classifier.providers[0] == "CUDAExecutionProvider"


def test_gpu_decode_feeds_onnx_runtime_in_place_and_agrees_with_the_cpu_path(
    demo_model_dir,
) -> None:
    """nvJPEG decode into a CUDA buffer, bound to ONNX Runtime by pointer (no copy back),
    gives the same top classes as Pillow's draft() decode on the CPU."""
    _need_ort_cuda()
    from infra.demo_images import render_demo_photo_jpeg
    from models.presets import TorchPreset

    gpu = OnnxClassifier(demo_model_dir, provider="cuda", max_batch=32)
    cpu = OnnxClassifier(demo_model_dir)
    images = [render_demo_photo_jpeg(name, 900_000 + i) for i, name in enumerate(gpu.classes)]
    preset = TorchPreset(gpu.preset, device="cuda:0", thumbnail_px=160)
    buffer = preset.new_batch(32)
    decoded = preset.decode_into(images, buffer)
    torch.cuda.synchronize()
    assert all(d.error is None and d.thumbnail for d in decoded)
    rows = buffer[: len(images)]
    on_gpu = gpu.runner().run_device(rows.data_ptr(), tuple(rows.shape), np.float32)
    on_cpu = cpu.probabilities(np.stack([cpu.preset.from_bytes(d)[0] for d in images]))
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).all()


@pytest.mark.parametrize("precision", ["model", "fp16"])
def test_tensorrt_builds_a_cached_engine_in_the_precision_asked(
    tmp_path, demo_model_dir, precision
) -> None:
    _need_ort_tensorrt(demo_model_dir)
    cache = tmp_path / "engines"
    classifier = OnnxClassifier(
        demo_model_dir, provider="tensorrt", precision=precision, cache_dir=cache, max_batch=8
    )
    assert classifier.provider == "tensorrt"
    assert classifier.precision == ("fp32" if precision == "model" else "fp16")
    batch = _batch(8, seed=5)
    reference = OnnxClassifier(demo_model_dir).probabilities(batch)
    assert (classifier.runner().run(batch).argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert any(cache.iterdir()), "no engine was cached"


def test_the_gpu_consumer_end_to_end(make_settings, demo_model_dir) -> None:
    """CUDA provider, nvJPEG decode, results through the embedded broker, recorded as such."""
    _need_ort_cuda()
    from infra.demo_images import render_demo_photo_jpeg
    from infra.record_producer import RecordProducer
    from processors.decoding import DeviceDecoder
    from processors.inference import InferenceConsumer
    from tests.helpers import KafkaReader
    from tests.integration.test_inference import image_event, run_until

    settings = make_settings(batch_max_size=8, model_dir=demo_model_dir, ort_provider="cuda")
    classifier = OnnxClassifier.from_settings(demo_model_dir, settings)
    classes = classifier.classes
    with RecordProducer(settings) as producer:
        for i in range(26):
            data = render_demo_photo_jpeg(classes[i % 13], 910_000 + i)
            producer.send("images", image_event(i, data), key=f"m{i}")
    consumer = InferenceConsumer(settings, classifier)
    assert isinstance(consumer.decoder, DeviceDecoder) and consumer.stats.decode_device != "cpu"
    run_until(consumer, lambda: consumer.stats.images >= 26)
    reader = KafkaReader(settings, {"hashtags": "HashtagResult"})
    found = reader.read_until(lambda f: len(f["hashtags"]) >= 26, timeout_s=30)["hashtags"]
    reader.close()
    assert {(r["provider"], r["precision"]) for r in found} == {("cuda", "fp32")}
    right = sum(r["top_class"] == classes[int(r["media_key"][1:]) % 13] for r in found)
    assert right >= 24, right
