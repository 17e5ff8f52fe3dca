"""APoZ channel pruning of torchvision's ResNet50 that really shrinks the layers.

Hu et al. 2016 ("Network Trimming"): the Average Percentage of Zeros (APoZ) of a channel is the
share of its post-ReLU activations that are zero over a validation set; channels that are
mostly zero carry little and can go. The ELEN 6889 report zeroed such weights but kept the
layer shapes, so inference cost did not move. Here the convolutions and batch norms are
rebuilt with fewer channels, so parameters, multiply-accumulates and the ONNX graph shrink.

Only `conv1` and `conv2` of each Bottleneck are prunable: `conv3`, the downsample path and the
stem write into residual additions, whose widths must match across blocks. Pruning `conv1`
narrows `conv1`/`bn1` and the input of `conv2`; pruning `conv2` narrows `conv2`/`bn2` and the
input of `conv3`. The block's output width never changes, so the rest of the network is
untouched.

Pruned models no longer fit the stock ResNet50 shapes; save `pruned_widths(model)` with the
state dict and rebuild with `build_pruned_resnet50(num_classes, widths)` before loading it.
Parameters are new tensors after pruning: build the optimizer again before fine-tuning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

#: Channels of conv1/conv2 in the bottlenecks of stage N (layerN) of the stock ResNet50.
_STAGE_WIDTH = {1: 64, 2: 128, 3: 256, 4: 512}
_LAYER_KEY = re.compile(r"^(.*)\.(conv1|conv2)$")
_STAGE = re.compile(r"(?:^|\.)layer([1-4])\.\d+\.conv[12]$")

RULES = ("mean+std", "top-fraction")


def _bottlenecks(model: nn.Module) -> dict[str, Bottleneck]:
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, Bottleneck)}
    if not blocks:
        raise ValueError("model has no torchvision Bottleneck blocks to prune")
    return blocks


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the prunable convolutions, e.g. "layer1.0.conv1", in network order."""
    return [f"{block}.{conv}" for block in _bottlenecks(model) for conv in ("conv1", "conv2")]


def pruned_widths(model: nn.Module) -> dict[str, int]:
    """Current output channels of every prunable convolution; save this with a checkpoint."""
    return {
        f"{name}.{conv}": getattr(block, conv).out_channels
        for name, block in _bottlenecks(model).items()
        for conv in ("conv1", "conv2")
    }


def stock_width(key: str) -> int:
    """Width of a prunable layer in the unpruned ResNet50 (the reference for floors/sparsity)."""
    match = _STAGE.search(key)
    if match is None:
        raise ValueError(f"{key!r} is not a ResNet50 bottleneck layer (expected layerN.i.convJ)")
    return _STAGE_WIDTH[int(match.group(1))]


def _images(batch: object) -> torch.Tensor:
    # Loaders here yield (images, targets); accept bare image tensors as well.
    if isinstance(batch, list | tuple):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"loader yielded {type(batch).__name__}, expected a tensor or a tuple")
    return batch


@torch.no_grad()
def measure_apoz(
    model: nn.Module, loader: Iterable[object], *, max_batches: int | None = None
) -> dict[str, torch.Tensor]:
    """APoZ per channel of every prunable layer, as float tensors on the CPU in [0, 1].

    Measured in eval mode (the model's mode is restored afterwards), averaged over all
    images and spatial positions. torchvision's Bottleneck reuses one `relu` module three
    times, so hooking it would mix layers; instead the hooks sit on bn1 and bn2, and
    relu(x) == 0 exactly when x <= 0.
    """
    blocks = _bottlenecks(model)
    zeros: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(key: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            # Integer sums so that large validation sets do not lose precision.
            hits = (output <= 0).sum(dim=(0, 2, 3))
            zeros[key] = zeros[key] + hits if key in zeros else hits
            counts[key] = counts.get(key, 0) + output.numel() // output.shape[1]

        return hook

    handles = []
    for name, block in blocks.items():
        handles.append(block.bn1.register_forward_hook(hook_for(f"{name}.conv1")))
        handles.append(block.bn2.register_forward_hook(hook_for(f"{name}.conv2")))
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    batches = 0
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            model(_images(batch).to(device))
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("the loader yielded no batches; APoZ needs validation images")
    return {
        key: (zeros[key].double() / counts[key]).float().cpu()
        for key in (k for name in blocks for k in (f"{name}.conv1", f"{name}.conv2"))
    }


def _floor_for(key: str, width: int, floor: int | float | None) -> int:
    original = stock_width(key)
    if floor is None:
        # Never thinner than 8 channels or a tenth of the stock width, whichever is more.
        wanted = max(8, math.ceil(0.1 * original))
    elif isinstance(floor, bool):
        raise TypeError("floor must be an int (channels) or a float (fraction of stock width)")
    elif isinstance(floor, int):
        if floor < 1:
            raise ValueError(f"floor must be >= 1 channel, got {floor}")
        wanted = floor
    else:
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"a fractional floor must be in (0, 1], got {floor}")
        wanted = max(1, math.ceil(floor * original))
    # A floor never brings back channels that an earlier round already removed.
    return min(wanted, width)


def select_channels(
    apoz: Mapping[str, torch.Tensor],
    *,
    rule: str = "mean+std",
    k: float = 1.0,
    fraction: float = 0.1,
    floor: int | float | None = None,
) -> dict[str, torch.Tensor]:
    """Sorted indices (int64) of the channels to KEEP in each layer of `apoz`.

    rule "mean+std": a channel goes when its APoZ >= mean + k * std over the layer's current
    channels (population std). A layer whose channels all share one APoZ has nothing to tell
    them apart, so it keeps them all.
    rule "top-fraction": the round(fraction * width) channels with the highest APoZ go.
    floor: at least this many channels stay (int), or this fraction of the stock ResNet50
    width (float); default max(8, 10% of stock width). When the rule would go below it, the
    channels with the lowest APoZ are kept.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if rule == "top-fraction" and not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    keep: dict[str, torch.Tensor] = {}
    for key, values in apoz.items():
        values = values.detach().flatten().double().cpu()
        width = values.numel()
        if width == 0:
            raise ValueError(f"{key}: empty APoZ vector")
        order = torch.argsort(values, stable=True)  # lowest APoZ (most useful) first
        if rule == "mean+std":
            std = values.std(correction=0)
            if std == 0:
                n_keep = width
            else:
                n_keep = int((values < values.mean() + k * std).sum())
        else:
            n_keep = width - round(fraction * width)
        n_keep = max(n_keep, _floor_for(key, width, floor))
        # Taking a prefix of the stable order keeps exactly the below-threshold channels
        # (they are the lowest), topped up by the next-lowest ones if the floor demands it.
        keep[key] = torch.sort(order[:n_keep]).values.long()
    return keep


def _index(idx: torch.Tensor, width: int, key: str, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(idx).long().flatten()
    if idx.numel() == 0:
        raise ValueError(f"{key}: cannot keep zero channels")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{key}: duplicate channel indices")
    if int(idx.min()) < 0 or int(idx.max()) >= width:
        raise ValueError(f"{key}: channel indices must be in [0, {width})")
    return torch.sort(idx).values.to(device)


def _slice_conv(
    conv: nn.Conv2d, *, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not supported")
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
        bias = bias.index_select(0, out_idx) if bias is not None else None
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new.train(conv.training)


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        idx.numel(),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=idx.device,
        dtype=bn.weight.dtype if bn.weight is not None else None,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.index_select(0, idx))
            new.bias.copy_(bn.bias.index_select(0, idx))
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean.index_select(0, idx))
            new.running_var.copy_(bn.running_var.index_select(0, idx))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


def prune_bottlenecks(model: nn.Module, keep: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the bottlenecks named in `keep` with only the kept channels. IN PLACE.

    Modifies and returns `model` (deep-copy it first to keep the original). `keep` maps
    "layerN.i.conv1"/"layerN.i.conv2" to indices of channels to keep; layers not named keep
    all their channels. Channels whose post-ReLU output is always zero contribute nothing
    downstream, so removing them leaves the model's output unchanged.
    """
    blocks = _bottlenecks(model)
    by_block: dict[str, dict[str, torch.Tensor]] = {}
    for key, idx in keep.items():
        match = _LAYER_KEY.match(key)
        if match is None or match.group(1) not in blocks:
            raise ValueError(f"{key!r} is not a prunable layer; see prunable_layers(model)")
        by_block.setdefault(match.group(1), {})[match.group(2)] = idx
    # Check every index first so that a bad entry leaves the model whole.
    plan = []
    for name, wanted in by_block.items():
        block = blocks[name]
        device = block.conv1.weight.device
        k1, k2 = wanted.get("conv1"), wanted.get("conv2")
        if k1 is not None:
            k1 = _index(k1, block.conv1.out_channels, f"{name}.conv1", device)
        if k2 is not None:
            k2 = _index(k2, block.conv2.out_channels, f"{name}.conv2", device)
        plan.append((block, k1, k2))
    for block, k1, k2 in plan:
        if k1 is not None:
            block.conv1 = _slice_conv(block.conv1, out_idx=k1, in_idx=None)
            block.bn1 = _slice_bn(block.bn1, k1)
        block.conv2 = _slice_conv(block.conv2, out_idx=k2, in_idx=k1)
        if k2 is not None:
            block.bn2 = _slice_bn(block.bn2, k2)
            block.conv3 = _slice_conv(block.conv3, out_idx=None, in_idx=k2)
    return model


def build_pruned_resnet50(num_classes: int, widths: Mapping[str, int]) -> nn.Module:
    """A randomly initialized ResNet50 with the given prunable widths, ready for load_state_dict.

    `widths` is what `pruned_widths` returned for the pruned model; layers it leaves out keep
    the stock width.
    """
    model = torchvision.models.resnet50(num_classes=num_classes)
    current = pruned_widths(model)
    keep = {}
    for key, width in widths.items():
        if key not in current:
            raise ValueError(f"{key!r} is not a prunable ResNet50 layer")
        if not 1 <= int(width) <= current[key]:
            raise ValueError(f"{key}: width {width} is outside [1, {current[key]}]")
        if int(width) < current[key]:
            keep[key] = torch.arange(int(width))
    return prune_bottlenecks(model, keep)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN running statistics not included)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear, measured with hooks.

    These are MACs, the convention torchvision uses for its "GFLOPS" (about 4.09e9 for
    ResNet50 at 224); BN, ReLU, pooling and additions are left out.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    parameter = next(model.parameters())
    model.eval()
    try:
        model(torch.zeros(1, 3, input_size, input_size, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def channel_sparsity(
    original: nn.Module | Mapping[str, int], pruned: nn.Module | Mapping[str, int]
) -> float:
    """Removed prunable channels / prunable channels of `original` (models or width maps)."""
    before = pruned_widths(original) if isinstance(original, nn.Module) else dict(original)
    after = pruned_widths(pruned) if isinstance(pruned, nn.Module) else dict(pruned)
    if set(before) != set(after):
        raise ValueError("the two models do not have the same prunable layers")
    total = sum(before.values())
    return (total - sum(after.values())) / total


def stock_widths(model: nn.Module) -> dict[str, int]:
    """The unpruned ResNet50 widths of `model`'s prunable layers."""
    return {key: stock_width(key) for key in prunable_layers(model)}


@dataclass
class PruneReport:
    """What one pruning round did; sparsity is cumulative against the stock ResNet50."""

    widths_before: dict[str, int]
    widths_after: dict[str, int]
    sparsity: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def removed(self) -> int:
        return sum(self.widths_before.values()) - sum(self.widths_after.values())

    def __str__(self) -> str:
        return (
            f"pruned {self.removed} channels (sparsity {self.sparsity:.4f}); params "
            f"{self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M; MACs "
            f"{self.flops_before / 1e6:.1f}M -> {self.flops_after / 1e6:.1f}M"
        )


def prune_round(
    model: nn.Module,
    loader: Iterable[object],
    *,
    rule: str = "mean+std",
    k: float = 1.0,
    fraction: float = 0.1,
    floor: int | float | None = None,
    max_batches: int | None = None,
    input_size: int = 224,
) -> PruneReport:
    """Measure APoZ on `loader`, select, and prune `model` IN PLACE; fine-tune afterwards.

    `input_size` only sets the image size at which MACs are counted.
    """
    widths_before = pruned_widths(model)
    params_before = count_params(model)
    flops_before = count_flops(model, input_size)
    apoz = measure_apoz(model, loader, max_batches=max_batches)
    keep = select_channels(apoz, rule=rule, k=k, fraction=fraction, floor=floor)
    # Only layers that actually lose channels are rebuilt.
    keep = {key: idx for key, idx in keep.items() if idx.numel() < widths_before[key]}
    prune_bottlenecks(model, keep)
    return PruneReport(
        widths_before=widths_before,
        widths_after=pruned_widths(model),
        sparsity=channel_sparsity(stock_widths(model), model),
        params_before=params_before,
        params_after=count_params(model),
        flops_before=flops_before,
        flops_after=count_flops(model, input_size),
    )
