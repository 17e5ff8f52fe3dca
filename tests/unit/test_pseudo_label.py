"""`tagstream pseudo-label` on scikit-learn's digits: a clean labelled part and an unlabeled rest.

The teacher learns from 60 images per digit; the other ~1,200 digits lose their labels
(one flat folder, plus a corrupt file) and are what the teacher selects from. The truth
of every unlabeled file is kept aside to measure how clean the selection is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from infra.exceptions import ConfigurationError
from models.pseudo_label import PseudoLabelConfig, select_top_k

CLEAN_PER_CLASS = 60
TOP_K = 40
FLOOR = 0.3
#: The teacher's training and the student's (which takes the teacher's input size).
TRAINING = {"batch_size": 32, "opt": "adamw", "lr": 0.002, "no_progress": True}


def test_select_top_k_ranks_each_class_and_respects_the_floor_and_top_p() -> None:
    probabilities = np.array(
        [
            [0.90, 0.10, 0.00],
            [0.60, 0.40, 0.00],
            [0.55, 0.45, 0.00],
            [0.20, 0.70, 0.10],
            [0.34, 0.33, 0.33],
            [0.10, 0.10, 0.80],
        ]
    )
    picked = select_top_k(probabilities, top_k=2, min_confidence=0.5)
    assert [[s.index for s in c] for c in picked] == [[0, 1], [3], [5]]
    assert picked[0][0].score == pytest.approx(0.9)
    # Top-2 per image: images 1, 2 and 4 may now go to class 1 too, ranked by p(class 1);
    # image 4's top 2 are classes 0 and 1 (the tie with class 2 goes to the lower index).
    picked = select_top_k(probabilities, top_k=2, min_confidence=0.3, top_p=2)
    assert [[s.index for s in c] for c in picked] == [[0, 1], [3, 2], [5]]
    # Ties are broken by index, so the selection is deterministic.
    even = np.full((4, 2), 0.5)
    assert [s.index for s in select_top_k(even, top_k=3)[0]] == [0, 1, 2]
    with pytest.raises(ConfigurationError):
        select_top_k(probabilities, top_k=0)


@pytest.fixture(scope="module")
def split_digits(tmp_path_factory):
    """clean/digitN/ (60 each) and unlabeled/ (the rest, unnamed), and the rest's truth."""
    from models.data import write_digits_folder

    root = tmp_path_factory.mktemp("pseudo")
    everything = write_digits_folder(root / "all")
    clean, unlabeled = root / "clean", root / "unlabeled"
    truth: dict[str, int] = {}
    rng = np.random.default_rng(3)
    for label in range(10):
        files = sorted((everything / f"digit{label}").iterdir())
        order = rng.permutation(len(files))
        (clean / f"digit{label}").mkdir(parents=True)
        for rank, i in enumerate(order):
            if rank < CLEAN_PER_CLASS:
                shutil.copy(files[i], clean / f"digit{label}" / files[i].name)
            else:
                # A nested folder whose name says nothing true: folder names are ignored.
                target = unlabeled / f"batch{rank % 3}" / f"img_{files[i].stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(files[i], target)
                truth[str(target)] = label
    (unlabeled / "batch0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (unlabeled / "notes.txt").write_text("not an image")
    # Copies of three of the teacher's test images (its seeded split, as train makes it):
    # they must stay out of the student's training set.
    from torchvision.datasets import ImageFolder

    from models.data import stratified_indices

    folder = ImageFolder(clean)
    _, _, test = stratified_indices(folder.targets, val_split=0.15, test_split=0.15, seed=0)
    copies = []
    for i in test[:3]:
        copies.append(unlabeled / "batch1" / f"copy_{Path(folder.samples[i][0]).name}")
        shutil.copy(folder.samples[i][0], copies[-1])
    return clean, unlabeled, truth, copies


@pytest.fixture(scope="module")
def teacher_checkpoint(split_digits, tmp_path_factory) -> Path:
    from models.train import TrainConfig, train

    teacher_dir = tmp_path_factory.mktemp("teacher")
    trained = train(
        TrainConfig(
            data=split_digits[0], output_dir=teacher_dir, epochs=4, input_size=32, **TRAINING
        )
    )
    return Path(trained["best_checkpoint"])


@pytest.mark.slow
def test_pseudo_label_selects_top_k_with_the_teachers_labels_then_trains_the_student(
    split_digits, teacher_checkpoint, tmp_path
) -> None:
    import torch

    from models.checkpoint import load_trained
    from models.pseudo_label import pseudo_label, score_images

    clean, unlabeled, truth, copies = split_digits
    out = tmp_path / "pseudo"
    result = pseudo_label(
        PseudoLabelConfig(
            teacher=teacher_checkpoint,
            unlabeled=unlabeled,
            output_dir=out,
            top_k=TOP_K,
            min_confidence=FLOOR,
            epochs=3,
            finetune_epochs=2,
            **TRAINING,
        )
    )

    # The selection: exactly K per class, each image under the teacher's own label.
    selection = json.loads((out / "selection.json").read_text())
    assert selection["images"] == len(truth) + 1 + len(copies)
    assert sorted(selection["left_out_clean_copies"]) == sorted(map(str, copies))
    assert list(selection["unreadable"]) == [str(unlabeled / "batch0" / "broken.png")]
    train = out / "student_data" / "train"
    teacher = load_trained(teacher_checkpoint)
    classes = teacher.classes
    # Recompute, independently, what the teacher should have picked: per class, the
    # images it labels so with p >= floor, best first, K of them (fewer if there are fewer).
    everything = sorted(map(Path, truth))
    scores, _, _ = score_images(teacher.model, everything, teacher.serving)
    expected, labels, sources = {}, [], []
    for c, name in enumerate(classes):
        mine = np.flatnonzero((scores.argmax(1) == c) & (scores[:, c] >= FLOOR))
        best = mine[np.argsort(-scores[mine, c], kind="stable")][:TOP_K]
        expected[name] = {everything[i] for i in best}
        chosen = [Path(item["file"]) for item in selection["files"][name]]
        assert len(chosen) == len(best) == len(list((train / name).iterdir()))
        assert set(chosen) == expected[name], name
        sources += chosen
        labels += [c] * len(chosen)
    full = [name for name in classes if len(expected[name]) == TOP_K]
    print(f"\nselected per class: { {n: len(e) for n, e in expected.items()} }")
    assert len(full) >= 7  # most classes have K confident images; the rest give all they have
    assert len(set(sources)) == len(sources) == selection["selected"]  # top-p 1: one class each
    precision = float(
        np.mean([truth[str(s)] == label for s, label in zip(sources, labels, strict=True)])
    )

    # val/ and test/ are the teacher's clean splits, so every row uses the same test set.
    test_dir = out / "student_data" / "test"
    test_files = sorted(p.name.split("_", 1)[1] for p in test_dir.rglob("*.png"))
    teacher_test = sorted(
        Path(teacher.splits.test.dataset.samples[i][0]).name for i in teacher.splits.test.indices
    )
    assert test_files == teacher_test

    rows = {row["model"]: row["test_acc"] for row in result["rows"]}
    assert list(rows) == ["teacher", "student", "student, fine-tuned"]
    report = (out / "pseudo_label_report.md").read_text()
    print(f"\nselection precision against the hidden labels {precision:.3f}\n{report}")
    assert precision >= 0.8  # the teacher's most confident picks are mostly right
    assert rows["student"] >= 0.3 and rows["student, fine-tuned"] >= 0.5  # chance is 0.1
    assert "| student, fine-tuned |" in report
    assert (
        torch.load(out / "student_finetuned" / "model_best.pt", weights_only=False)["classes"]
        == classes
    )


def test_unlabeled_folder_must_hold_images(split_digits, tmp_path) -> None:
    from models.pseudo_label import list_images

    with pytest.raises(ConfigurationError, match="not a folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty") == []
    _, unlabeled, truth, copies = split_digits
    assert len(list_images(unlabeled)) == len(truth) + 1 + len(copies)  # not the .txt


@pytest.mark.slow
def test_refusals_overlap_and_nothing_confident(split_digits, teacher_checkpoint, tmp_path):
    from models.pseudo_label import pseudo_label

    _, unlabeled, _, _ = split_digits

    def run(out: Path, **changes):
        return pseudo_label(
            PseudoLabelConfig(
                teacher=teacher_checkpoint,
                unlabeled=unlabeled,
                output_dir=out,
                no_progress=True,
                **changes,
            )
        )

    # Output inside the unlabeled folder: a second run would score the test images.
    with pytest.raises(ConfigurationError, match="overlap"):
        run(unlabeled / "semi")
    # No probability reaches 1.01: a clear error, not a crash in the student's training.
    with pytest.raises(ConfigurationError, match="not confident enough"):
        run(tmp_path / "semi", min_confidence=1.01)
