"""`tagstream pseudo-label`: the teacher/student loop of Yalniz et al. (2019), Table I.

1. The teacher (a `tagstream train` checkpoint) scores every image under
   ``--unlabeled`` (any folder tree; folder names are ignored, so noisy labels such as
   `tagstream collect`'s hashtags never leak in). Unreadable files are counted, skipped.
2. Selection: each image keeps its top ``--top-p`` classes; for each class the images
   keeping it are ranked by that class's probability and the ``--top-k`` best are taken,
   never one below ``--min-confidence``. With top-p 1 an image goes to one class at most.
3. The selected images become a new ImageFolder ``<out>/student_data/train/<class>/``
   (hard links, or copies across file systems), with the teacher's own validation and
   test splits beside it as ``val/`` and ``test/``, so every model of the table is
   measured on the same clean test images. ``selection.json`` lists what was taken.
4. Unless ``--select-only``: `train` the student on the pseudo-labelled set, fine-tune it
   on the clean set (``--finetune-epochs``, the teacher's data and splits), and write the
   Table-I-style ``pseudo_label_report.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from infra.exceptions import ConfigurationError
from models.args import pseudo_label_parser
from models.checkpoint import load_trained
from models.manifest import file_sha256
from models.presets import load_upright
from models.train import TrainConfig, evaluate, resolve_device, train

#: What counts as an image under --unlabeled: what torchvision's ImageFolder reads.
IMAGE_SUFFIXES = frozenset(IMG_EXTENSIONS)

log = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return pseudo_label_parser(add_help=add_help)


@dataclass(frozen=True, kw_only=True)
class PseudoLabelConfig:
    """What `pseudo_label` takes: the flags of `tagstream pseudo-label` (models/args.py), same
    defaults. The student trains as `train` would with the fields from `weights` on, at the
    teacher's input size, with its splits and seed."""

    teacher: Path
    unlabeled: Path
    data: Path | None = None  # None: the teacher's
    output_dir: Path = Path("runs/pseudo-label")
    top_k: int = 500
    top_p: int = 1
    min_confidence: float = 0.5
    select_only: bool = False
    finetune_epochs: int = 1
    finetune_lr: float | None = None  # None: lr / 10
    # The student's training.
    weights: str = "none"
    epochs: int = 10
    batch_size: int = 32
    opt: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    workers: int = 0
    device: str | None = None
    no_progress: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PseudoLabelConfig:
        values = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)}
        return cls(
            **{
                **values,
                "teacher": Path(args.teacher),
                "unlabeled": Path(args.unlabeled),
                "data": Path(args.data) if args.data else None,
                "output_dir": Path(args.output_dir),
            }
        )


@dataclass(frozen=True)
class Selected:
    """One image picked for a class: its index in the scored list and the teacher's score."""

    index: int
    score: float


def select_top_k(
    probabilities: np.ndarray, *, top_k: int, min_confidence: float = 0.0, top_p: int = 1
) -> list[list[Selected]]:
    """Per class, the `top_k` most confident images among those keeping it in their top `top_p`.

    `probabilities` is (images, classes). An image is a candidate for class c when c is
    among its `top_p` most probable classes and p(c) >= `min_confidence`. Ties are broken
    by image index, so the result is deterministic.
    """
    if probabilities.ndim != 2:
        raise ValueError("probabilities must be (images, classes)")
    if top_k < 1 or top_p < 1:
        raise ConfigurationError("--top-k and --top-p must be at least 1")
    images, classes = probabilities.shape
    top_p = min(top_p, classes)
    # Each image's top-p classes: a boolean mask (images, classes).
    kept = np.zeros_like(probabilities, dtype=bool)
    if images:
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_p]
        np.put_along_axis(kept, ranked, True, axis=1)
    kept &= probabilities >= min_confidence
    selection = []
    for c in range(classes):
        candidates = np.flatnonzero(kept[:, c])
        # lexsort: last key first; score descending, then index ascending.
        order = np.lexsort((candidates, -probabilities[candidates, c]))[:top_k]
        selection.append(
            [Selected(int(candidates[i]), float(probabilities[candidates[i], c])) for i in order]
        )
    return selection


def list_images(root: Path) -> list[Path]:
    """Every image file under `root`, sorted, recursively (links to files included)."""
    if not root.is_dir():
        raise ConfigurationError(f"--unlabeled {root} is not a folder")
    return sorted(
        path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


@torch.no_grad()
def score_images(
    model: torch.nn.Module, paths: list[Path], preset, *, batch_size: int = 64, progress=None
) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """The teacher's softmax for every readable image; unreadable ones are reported, not fatal.

    Returns (probabilities of the readable images, their indices in `paths`, {path: error}).
    """
    model.eval()
    device = next(model.parameters()).device
    probabilities, readable, unreadable = [], [], {}
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            logits = model(torch.from_numpy(np.stack(batch)).to(device))
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            batch.clear()

    for index, path in enumerate(paths):
        try:
            batch.append(preset(load_upright(path)))
        except Exception as exc:  # untrusted files: Pillow raises many types
            unreadable[str(path)] = f"{type(exc).__name__}: {exc}"
        else:
            readable.append(index)
        if len(batch) >= batch_size:
            flush()
        if progress is not None:
            progress.update(1)
    flush()
    if not probabilities:
        return np.zeros((0, 0), dtype=np.float32), readable, unreadable
    return np.concatenate(probabilities), readable, unreadable


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _dataset_files(dataset) -> list[tuple[Path, int]]:
    """(file, label) of every item of an ImageFolder or a Subset of one, without decoding."""
    if isinstance(dataset, torch.utils.data.Subset):
        samples = dataset.dataset.samples
        return [(Path(samples[i][0]), samples[i][1]) for i in dataset.indices]
    return [(Path(path), label) for path, label in dataset.samples]


def write_student_folder(
    out: Path,
    paths: list[Path],
    selection: list[list[Selected]],
    classes: list[str],
    *,
    val,
    test,
) -> Path:
    """``out/train/<class>/`` from the selection, ``val/`` and ``test/`` from the clean splits.

    Every class gets a folder, empty or not, so the student's classes match the teacher's.
    """
    if out.exists():
        shutil.rmtree(out)
    for c, name in enumerate(classes):
        (out / "train" / name).mkdir(parents=True)
        for rank, item in enumerate(selection[c]):
            source = paths[item.index]
            # The rank keeps names unique when two folders hold the same file name.
            _place(source, out / "train" / name / f"{rank:06d}_{source.name}")
    for split, dataset in (("val", val), ("test", test)):
        for c in range(len(classes)):
            (out / split / classes[c]).mkdir(parents=True, exist_ok=True)
        for number, (source, label) in enumerate(_dataset_files(dataset)):
            _place(source, out / split / classes[label] / f"{number:06d}_{source.name}")
    return out


def drop_clean_images(paths: list[Path], clean: list[Path]) -> tuple[list[Path], list[Path]]:
    """(paths without the teacher's validation and test images, the ones dropped).

    An unlabeled folder may hold copies of clean images (the same collection, a folder
    made from the same photos); trained on by the student, they would inflate Table I.
    The same file (resolved path) or the same bytes (SHA-256) counts as a copy.
    """
    resolved = {p.resolve() for p in clean}
    digests = {file_sha256(p) for p in clean}
    kept, dropped = [], []
    for path in paths:
        same = path.resolve() in resolved or file_sha256(path) in digests
        (dropped if same else kept).append(path)
    return kept, dropped


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def main(args: argparse.Namespace) -> dict:
    return pseudo_label(PseudoLabelConfig.from_args(args))


def pseudo_label(config: PseudoLabelConfig) -> dict:
    """Select with the teacher, then (unless `config.select_only`) train and fine-tune the
    student. Returns the selection summary, the student's ImageFolder (``student_data``)
    and, after training, the Table I rows."""

    out = Path(config.output_dir)
    unlabeled = Path(config.unlabeled)
    if _overlap(out, unlabeled):
        # A second run would score the first one's student_data, test images included.
        raise ConfigurationError(f"--output-dir {out} and --unlabeled {unlabeled} overlap")
    paths = list_images(unlabeled)
    if not paths:
        raise ConfigurationError(f"--unlabeled {unlabeled} holds no images")
    teacher = load_trained(config.teacher, data=config.data)
    classes, trained = teacher.classes, teacher.args
    out.mkdir(parents=True, exist_ok=True)
    clean = [
        path
        for split in (teacher.splits.val, teacher.splits.test)
        for path, _ in _dataset_files(split)
    ]
    paths, copies = drop_clean_images(paths, clean)
    if copies:
        print(f"left out {len(copies)} unlabeled images that are the teacher's val/test images")

    with tqdm(
        total=len(paths), desc="teacher scoring", unit="img", disable=config.no_progress
    ) as bar:
        probabilities, readable, unreadable = score_images(
            teacher.model.to(resolve_device(config.device)),
            paths,
            teacher.serving,
            batch_size=config.batch_size,
            progress=bar,
        )
    teacher.model.to("cpu")
    scored = [paths[i] for i in readable]
    if not scored:
        raise ConfigurationError(f"none of the {len(paths)} images under {unlabeled} decodes")
    selection = select_top_k(
        probabilities,
        top_k=config.top_k,
        min_confidence=config.min_confidence,
        top_p=config.top_p,
    )
    if not any(selection):
        raise ConfigurationError(
            f"the teacher is not confident enough (--min-confidence {config.min_confidence}) "
            f"about any of the {len(scored)} images: nothing to train a student on"
        )
    empty = [name for name, picked in zip(classes, selection, strict=True) if not picked]
    if empty:
        log.warning("no image selected for %s; the student sees none of it", ", ".join(empty))
    data = write_student_folder(
        out / "student_data",
        scored,
        selection,
        classes,
        val=teacher.splits.val,
        test=teacher.splits.test,
    )
    per_class = {
        name: {
            "selected": len(picked),
            "mean_confidence": float(np.mean([s.score for s in picked])) if picked else None,
            "min_confidence": float(min(s.score for s in picked)) if picked else None,
        }
        for name, picked in zip(classes, selection, strict=True)
    }
    summary = {
        "teacher": str(config.teacher),
        "unlabeled": str(config.unlabeled),
        "images": len(paths) + len(copies),
        "left_out_clean_copies": [str(p) for p in copies],
        "unreadable": unreadable,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "min_confidence": config.min_confidence,
        "selected": sum(len(picked) for picked in selection),
        "per_class": per_class,
        "files": {
            name: [{"file": str(scored[s.index]), "score": round(s.score, 6)} for s in picked]
            for name, picked in zip(classes, selection, strict=True)
        },
    }
    (out / "selection.json").write_text(json.dumps(summary, indent=2) + "\n")
    counts = ", ".join(f"{name} {info['selected']}" for name, info in per_class.items())
    print(
        f"selected {summary['selected']} of {len(paths)} images "
        f"({len(unreadable)} unreadable) into {data}/train: {counts}",
        flush=True,
    )
    if config.select_only:
        return {"selection": summary, "student_data": str(data)}

    test_loader = torch.utils.data.DataLoader(teacher.splits.test, batch_size=64)
    teacher_acc = evaluate(teacher.model, test_loader)
    student_config = TrainConfig(
        data=data,
        output_dir=out / "student",
        # The teacher's input size, splits and seed, so that every row has the same test set.
        input_size=trained["input_size"],
        resize_size=trained.get("resize_size"),
        val_split=trained["val_split"],
        test_split=trained["test_split"],
        seed=trained["seed"],
        weights=config.weights,
        epochs=config.epochs,
        batch_size=config.batch_size,
        opt=config.opt,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        workers=config.workers,
        device=config.device,
        no_progress=config.no_progress,
    )
    print(f"teacher test accuracy {teacher_acc:.4f}; training the student", flush=True)
    student = train(student_config)
    print("fine-tuning the student on the clean set", flush=True)
    finetuned = train(
        dataclasses.replace(
            student_config,
            data=Path(config.data or trained["data"]),
            output_dir=out / "student_finetuned",
            weights=student["best_checkpoint"],
            epochs=config.finetune_epochs,
            # The student already fits; a full-size step would undo what it learned.
            lr=config.finetune_lr or config.lr / 10,
        )
    )
    rows = [
        {"model": "teacher", "trained on": "clean set", "test_acc": teacher_acc},
        {
            "model": "student",
            "trained on": f"{summary['selected']} teacher-labelled images",
            "test_acc": student["test_acc"],
        },
        {
            "model": "student, fine-tuned",
            "trained on": "then the clean set",
            "test_acc": finetuned["test_acc"],
        },
    ]
    lines = [
        f"# Teacher/student (Yalniz et al.) from {config.teacher}",
        "",
        f"{len(paths)} unlabeled images ({len(unreadable)} unreadable); top-{config.top_k} "
        f"per class of each image's top-{config.top_p}, confidence at least "
        f"{config.min_confidence}: {summary['selected']} selected. Every accuracy is on the "
        f"teacher's clean test split ({len(teacher.splits.test)} images).",
        "",
        "| model | trained on | test acc. |",
        "|---|---|---|",
        *(f"| {r['model']} | {r['trained on']} | {100 * r['test_acc']:.2f} |" for r in rows),
        "",
        "| class | selected | mean confidence | min confidence |",
        "|---|---|---|---|",
        *(
            f"| {name} | {info['selected']} | "
            + (
                f"{info['mean_confidence']:.3f} | {info['min_confidence']:.3f} |"
                if info["selected"]
                else "— | — |"
            )
            for name, info in per_class.items()
        ),
    ]
    (out / "pseudo_label_report.md").write_text("\n".join(lines) + "\n")
    (out / "pseudo_label_report.json").write_text(
        json.dumps({"rows": rows, "selection": per_class}, indent=2) + "\n"
    )
    print("\n".join(lines[4:9]), flush=True)
    return {"rows": rows, "selection": summary, "student_data": str(data)}
