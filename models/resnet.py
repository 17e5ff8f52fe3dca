"""ResNet50 from torchvision with a head for our classes, and its weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from infra.exceptions import ModelError


def build_resnet50(
    num_classes: int, *, weights: str | Path | None = None, classes: list[str] | None = None
) -> torch.nn.Module:
    """ResNet50 with a `num_classes` head.

    `weights`: None or "none" for random initialization; "imagenet" for torchvision's
    ImageNet weights through its local cache (no download is attempted here: the
    machines we run on have no route to the hub); or the path of a state dict or of a
    `tagstream train` checkpoint. The head comes too only from a checkpoint trained on
    the same `classes`, in the same order (a student fine-tuned on the clean set);
    otherwise it starts afresh.
    """
    if weights in (None, "none"):
        # zero-init of the last BN in each block makes a from-scratch ResNet train fast.
        return torchvision.models.resnet50(num_classes=num_classes, zero_init_residual=True)
    model = torchvision.models.resnet50()
    same_classes = False
    if weights == "imagenet":
        spec = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
        if not cache.is_file():
            raise ModelError(
                f"ImageNet weights are not in torchvision's cache ({cache}) and cannot be "
                "downloaded here; copy the file there or pass --weights PATH"
            )
        state = torch.load(cache, map_location="cpu", weights_only=True)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        same_classes = classes is not None and state.get("classes") == list(classes)
        state = state.get("model", state)
    if same_classes and state["fc.weight"].shape[0] == num_classes:
        # Same classes (a student fine-tuned on the clean set): the head is kept too.
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, _ = model.load_state_dict(state, strict=False)
    if set(missing) - {"fc.weight", "fc.bias"}:
        raise ModelError(f"weights do not fit ResNet50: missing {sorted(missing)[:5]}")
    if model.fc.out_features != num_classes:
        model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model
