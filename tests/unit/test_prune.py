"""APoZ channel pruning: measurement, selection, real removal of channels, export, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from models.apoz import (
    PruneReport,
    build_pruned_resnet50,
    channel_sparsity,
    count_flops,
    count_params,
    measure_apoz,
    prunable_layers,
    prune_bottlenecks,
    prune_round,
    pruned_widths,
    select_channels,
    stock_widths,
)
from models.export import check_against_pytorch, export_onnx
from models.resnet import build_resnet50

NUM_CLASSES = 13
SIZE = 32


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def loader(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images[:4], torch.zeros(4, dtype=torch.long)), (images[4:], torch.ones(4).long())]


@pytest.fixture(scope="module")
def base_model(loader) -> nn.Module:
    """Random ResNet50 whose residual branches matter, in eval mode with sane BN statistics.

    build_resnet50 zero-initializes bn3, which would make every bottleneck branch invisible
    in the output (and the "output unchanged" checks vacuous), so bn3 gets random scales.
    """
    torch.manual_seed(0)
    model = build_resnet50(NUM_CLASSES, weights=None)
    with torch.no_grad():
        # Running statistics from the data itself keep activations in a useful range.
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None
        for batch, _ in loader:
            model(batch)
        for name, module in model.named_modules():
            if name.endswith("bn3"):
                module.weight.uniform_(0.1, 0.5)
    return model.eval()


@pytest.fixture
def model(base_model: nn.Module) -> nn.Module:
    return copy.deepcopy(base_model)


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def test_apoz_keys_lengths_and_range(model, loader) -> None:
    apoz = measure_apoz(model, loader)
    assert len(apoz) == 32  # 16 bottlenecks x (conv1, conv2)
    assert list(apoz) == prunable_layers(model)
    assert "layer1.0.conv1" in apoz and "layer4.2.conv2" in apoz
    for key, values in apoz.items():
        assert values.shape == (model.get_submodule(key).out_channels,)
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    assert not model.training  # mode restored


def test_apoz_sees_dead_and_always_on_channels(model, loader) -> None:
    with torch.no_grad():
        model.layer2[1].bn1.bias[[3, 7]] = -1e4  # relu output always zero
        model.layer2[1].bn1.bias[5] = 1e4  # relu output never zero
        model.layer3[0].bn2.bias[0] = -1e4
    apoz = measure_apoz(model, loader)
    assert apoz["layer2.1.conv1"][[3, 7]].tolist() == [1.0, 1.0]
    assert float(apoz["layer2.1.conv1"][5]) == 0.0
    assert float(apoz["layer3.0.conv2"][0]) == 1.0


def test_apoz_max_batches(model, loader) -> None:
    first = measure_apoz(model, loader[:1])
    limited = measure_apoz(model, loader, max_batches=1)
    for key in first:
        assert torch.equal(first[key], limited[key])
    with pytest.raises(ValueError, match="no batches"):
        measure_apoz(model, [])


def test_select_mean_plus_std() -> None:
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95] * 2)
    threshold = float(values.mean() + values.std(correction=0))
    keep = select_channels({"layer1.0.conv1": values}, floor=1)["layer1.0.conv1"]
    assert keep.tolist() == [i for i, v in enumerate(values.tolist()) if v < threshold]
    assert keep.dtype == torch.long
    # a larger k removes fewer channels
    wide = select_channels({"layer1.0.conv1": values}, k=0.0, floor=1)["layer1.0.conv1"]
    assert len(wide) < len(keep)
    # channels that cannot be told apart all stay
    flat = select_channels({"layer1.0.conv1": torch.full((64,), 0.5)})["layer1.0.conv1"]
    assert len(flat) == 64


def test_select_floor() -> None:
    # layer1 stock width is 64: default floor is max(8, 10%) = 8; layer4 (512) gives 52.
    ramp = torch.linspace(0, 1, 64)
    apoz = {"layer1.0.conv1": ramp, "layer4.0.conv2": torch.linspace(0, 1, 512)}
    many = select_channels(apoz, rule="top-fraction", fraction=0.99)
    assert len(many["layer1.0.conv1"]) == 8 and len(many["layer4.0.conv2"]) == 52
    # the floor keeps the lowest-APoZ channels
    assert many["layer1.0.conv1"].tolist() == list(range(8))
    absolute = select_channels(apoz, rule="top-fraction", fraction=0.99, floor=20)
    assert len(absolute["layer1.0.conv1"]) == 20 and len(absolute["layer4.0.conv2"]) == 20
    relative = select_channels(apoz, rule="top-fraction", fraction=0.99, floor=0.25)
    assert len(relative["layer1.0.conv1"]) == 16 and len(relative["layer4.0.conv2"]) == 128
    # a floor never adds back channels an earlier round removed
    thin = select_channels({"layer1.0.conv1": torch.rand(6)}, rule="top-fraction", fraction=0.5)
    assert len(thin["layer1.0.conv1"]) == 6


def test_select_top_fraction() -> None:
    values = torch.rand(128, generator=torch.Generator().manual_seed(1))
    keep = select_channels({"layer2.0.conv2": values}, rule="top-fraction", fraction=0.25)
    kept = keep["layer2.0.conv2"]
    assert len(kept) == 96
    removed = sorted(set(range(128)) - set(kept.tolist()))
    assert float(values[removed].min()) >= float(values[kept].max())


def test_select_rejects_bad_options() -> None:
    apoz = {"layer1.0.conv1": torch.rand(64)}
    with pytest.raises(ValueError, match="unknown rule"):
        select_channels(apoz, rule="median")
    with pytest.raises(ValueError):
        select_channels(apoz, floor=0)
    with pytest.raises(ValueError):
        select_channels(apoz, floor=1.5)


def test_dead_channels_are_pruned_without_changing_the_output(model, images) -> None:
    dead = {"layer1.0.conv1": [0, 5, 9], "layer2.3.conv2": [1, 2], "layer4.1.conv1": [100]}
    with torch.no_grad():
        for key, channels in dead.items():
            bn = model.get_submodule(key.replace("conv", "bn"))
            bn.bias[channels] = -1e4
    before = logits(model, images)
    widths = pruned_widths(model)
    keep = {
        key: torch.tensor([c for c in range(widths[key]) if c not in channels])
        for key, channels in dead.items()
    }
    params = count_params(model)
    assert prune_bottlenecks(model, keep) is model  # in place
    after = logits(model, images)
    assert count_params(model) < params
    assert pruned_widths(model)["layer1.0.conv1"] == 61
    assert model.layer1[0].conv2.in_channels == 61
    assert model.layer2[3].conv3.in_channels == 126
    assert before.abs().max() > 0.1  # the check below means something
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert channel_sparsity(widths, model) == pytest.approx(6 / sum(widths.values()))


def test_prune_bottlenecks_rejects_bad_keys_and_leaves_the_model_whole(model) -> None:
    widths = pruned_widths(model)
    with pytest.raises(ValueError, match="not a prunable"):
        prune_bottlenecks(model, {"layer1.0.conv3": torch.arange(10)})
    with pytest.raises(ValueError, match="indices"):
        prune_bottlenecks(
            model, {"layer1.0.conv1": torch.arange(10), "layer1.1.conv2": torch.tensor([64])}
        )
    assert pruned_widths(model) == widths


def test_count_flops_is_torchvision_macs() -> None:
    # torchvision lists ResNet50 at 4.09 "GFLOPS" (multiply-accumulates) at 224x224.
    macs = count_flops(build_resnet50(NUM_CLASSES, weights=None), 224)
    assert macs == pytest.approx(4.09e9, rel=0.01)


def test_prune_round_removes_channels_for_real(model, loader, images, tmp_path: Path) -> None:
    original = copy.deepcopy(model)
    before_onnx = export_onnx(original, tmp_path / "before.onnx", input_size=SIZE)
    report = prune_round(model, loader, rule="mean+std", k=1.0, input_size=SIZE)
    assert isinstance(report, PruneReport)
    assert report.widths_before == pruned_widths(original)
    assert report.widths_after == pruned_widths(model)
    assert report.removed > 0
    assert all(report.widths_after[k] <= report.widths_before[k] for k in report.widths_before)
    assert report.params_after < report.params_before == count_params(original)
    assert report.flops_after < report.flops_before == count_flops(original, SIZE)
    assert report.sparsity == pytest.approx(channel_sparsity(original, model))
    assert 0 < report.sparsity < 1
    assert logits(model, images).shape == (len(images), NUM_CLASSES)

    after_onnx = export_onnx(model, tmp_path / "after.onnx", input_size=SIZE)
    check = check_against_pytorch(model, after_onnx, images.numpy())
    assert check.argmax_agreement == 1.0
    sizes = before_onnx.stat().st_size, after_onnx.stat().st_size
    assert sizes[1] < sizes[0]

    rows = [
        ("params", f"{report.params_before:,}", f"{report.params_after:,}"),
        ("MFLOPs (MACs)", f"{report.flops_before / 1e6:.1f}", f"{report.flops_after / 1e6:.1f}"),
        ("onnx bytes", f"{sizes[0]:,}", f"{sizes[1]:,}"),
    ]
    print(f"\nAPoZ round (mean+std, k=1), {SIZE}x{SIZE}, sparsity {report.sparsity:.4f}")
    print(f"{'':>14} {'before':>12} {'after':>12}")
    for name, before, after in rows:
        print(f"{name:>14} {before:>12} {after:>12}")


def test_two_rounds_keep_working(model, loader, images) -> None:
    first = prune_round(model, loader, input_size=SIZE)
    second = prune_round(model, loader, input_size=SIZE)
    assert second.widths_before == first.widths_after
    assert second.params_after < first.params_after
    assert second.sparsity > first.sparsity
    stock = stock_widths(model)
    for key, width in second.widths_after.items():
        assert width >= max(8, stock[key] // 10)
    assert logits(model, images).shape == (len(images), NUM_CLASSES)


def test_widths_round_trip_through_a_checkpoint(model, loader, images, tmp_path: Path) -> None:
    prune_round(model, loader, rule="top-fraction", fraction=0.3, input_size=SIZE)
    path = tmp_path / "pruned.pt"
    torch.save({"model": model.state_dict(), "widths": pruned_widths(model)}, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt = build_pruned_resnet50(NUM_CLASSES, saved["widths"])
    rebuilt.load_state_dict(saved["model"])  # strict: every shape must fit
    assert pruned_widths(rebuilt) == pruned_widths(model)
    torch.testing.assert_close(logits(rebuilt, images), logits(model, images))
    with pytest.raises(ValueError):
        build_pruned_resnet50(NUM_CLASSES, {"layer1.0.conv1": 65})
