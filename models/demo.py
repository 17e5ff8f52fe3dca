"""The demo model: ResNet50 trained by our own pipeline on generated images of the demo classes.

`tagstream up` and the test suite need a model on a machine with no model hub:
the first call trains one on images from infra.demo_images (the same
generator the demo image server draws from), at a reduced input size so that
it takes minutes on two CPU cores, exports it to ONNX, checks the export, and
caches it under `<data_dir>/models/`. Later calls find it there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from infra.demo_images import DEMO_CLASSES, render_demo_jpeg
from models.export import check_against_pytorch, export_onnx
from models.manifest import MANIFEST_NAME, Manifest, file_sha256
from models.presets import ServingPreset, TrainPreset
from models.resnet import build_resnet50
from models.thresholds import calibrate_thresholds
from models.train import predict, train_one_epoch

log = logging.getLogger(__name__)

#: Bump when the generator or the recipe changes, so stale caches are not reused.
DEMO_RECIPE_VERSION = "1"


@dataclass(frozen=True)
class DemoRecipe:
    input_size: int = 64
    render_size: int = 96
    train_per_class: int = 120
    val_per_class: int = 20
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + DEMO_RECIPE_VERSION
        return hashlib.sha256(text.encode()).hexdigest()[:10]


#: Seeds by split, disjoint: training, validation (thresholds) and held-out tests.
TRAIN_SEEDS_START, VAL_SEEDS_START, TEST_SEEDS_START = 0, 100_000, 200_000


class DemoImages(torch.utils.data.Dataset):
    """Generated demo images, encoded as JPEG and decoded again as the server would serve them."""

    def __init__(self, *, per_class: int, seed_start: int, render_size: int, transform) -> None:
        self.items = [
            (label, seed_start + n) for label in range(len(DEMO_CLASSES)) for n in range(per_class)
        ]
        self.render_size = render_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        label, seed = self.items[index]
        data = render_demo_jpeg(DEMO_CLASSES[label], seed, size=self.render_size)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return self.transform(image), label


def _serving_transform(preset: ServingPreset):
    return lambda image: torch.from_numpy(preset(image))


def train_demo_model(
    out_dir: Path, recipe: DemoRecipe = DemoRecipe(), *, progress: bool = True
) -> Path:
    """Train, export and check the demo model into `out_dir`; returns `out_dir`."""

    torch.manual_seed(recipe.seed)
    preset = ServingPreset(input_size=recipe.input_size)
    train_set = DemoImages(
        per_class=recipe.train_per_class,
        seed_start=TRAIN_SEEDS_START,
        render_size=recipe.render_size,
        transform=TrainPreset(input_size=recipe.input_size, scale=(0.7, 1.0)),
    )
    val_set = DemoImages(
        per_class=recipe.val_per_class,
        seed_start=VAL_SEEDS_START,
        render_size=recipe.render_size,
        transform=_serving_transform(preset),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=recipe.batch_size, shuffle=True, generator=generator, drop_last=True
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=64)

    model = build_resnet50(len(DEMO_CLASSES), weights=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * len(train_loader), pct_start=0.25
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    started = time.monotonic()
    for epoch in range(recipe.epochs):
        with tqdm(
            total=len(train_loader) * recipe.batch_size,
            desc=f"demo model epoch {epoch + 1}/{recipe.epochs}",
            unit="img",
            disable=not progress,
        ) as bar:
            train_one_epoch(
                model, criterion, optimizer, train_loader, scheduler=scheduler, progress=bar
            )
    probabilities, labels = predict(model, val_loader)
    val_acc = float((probabilities.argmax(1) == labels).mean())
    log.info(
        "demo model: validation accuracy %.4f after %.0f s", val_acc, time.monotonic() - started
    )

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx_path = export_onnx(model, tmp / "model.onnx", input_size=recipe.input_size)
    sample = np.stack([val_set[i][0].numpy() for i in range(0, len(val_set), 7)])
    check = check_against_pytorch(model, onnx_path, sample)
    log.info("%s", check)
    if check.argmax_agreement < 0.99:
        raise RuntimeError(f"exported demo model disagrees with PyTorch: {check}")
    torch.save({"model": model.state_dict(), "recipe": asdict(recipe)}, tmp / "checkpoint.pt")
    Manifest(
        model_id="demo-resnet50",
        version=recipe.key(),
        classes=list(DEMO_CLASSES),
        thresholds=calibrate_thresholds(probabilities, labels, list(DEMO_CLASSES)),
        input_size=recipe.input_size,
        resize_size=recipe.input_size,
        mean=list(preset.mean.ravel().tolist()),
        std=list(preset.std.ravel().tolist()),
        file="model.onnx",
        sha256=file_sha256(onnx_path),
        precision="fp32",
        metrics={
            "val_accuracy": round(val_acc, 4),
            "onnx_argmax_agreement": check.argmax_agreement,
            "onnx_max_abs_diff": check.max_abs_diff,
            "train_seconds": round(time.monotonic() - started, 1),
        },
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    ).save(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def demo_model_dir(data_dir: Path, recipe: DemoRecipe = DemoRecipe()) -> Path:
    return Path(data_dir) / "models" / f"demo-resnet50-{recipe.key()}"


def ensure_demo_model(
    data_dir: Path, recipe: DemoRecipe = DemoRecipe(), *, progress: bool = True
) -> Path:
    """The cached demo model's folder, training it first if it is not there."""
    folder = demo_model_dir(data_dir, recipe)
    if (folder / MANIFEST_NAME).is_file():
        try:
            Manifest.load(folder)
            return folder
        except Exception as exc:  # a half-written or tampered cache: train again
            log.warning("cached demo model unusable (%s); training again", exc)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log.info("training the demo model into %s (first run only)", folder)
    return train_demo_model(folder, recipe, progress=progress)
