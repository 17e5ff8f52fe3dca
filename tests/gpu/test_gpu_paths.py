"""The GPU paths: an AMP training step on CUDA, FP16 ONNX on the CUDA execution provider.

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
