"""`tagstream evaluate` on the embedded broker, with the real pipeline processes.

A small archive of demo photos (each class a few times, a post with two photos, a post
without one, a photo that is not there, a corrupt one, a line that is no tweet) and a
labels file (some labels deliberately wrong, one post labelled by its tweet id with two
classes, one photo unlabelled) is replayed through the demo model and through a
deliberately worse copy of it (the same network with four classes' names rotated in its
manifest). The accuracy table of each must be exactly what the test computes on its
own: ONNX Runtime run directly on the bytes the image server sends, the manifest's
thresholds, scikit-learn's metrics. The worse model must rank below the demo model, and
every tweet must be accounted for.

The same input put on a topic, and evaluated with ``--topic``, gives the same table.

Then bad input: a missing archive, labels that name nothing of the replay, and a model
folder without a manifest are each one `error:` line and exit status 1.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient
from sklearn.metrics import precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from infra.demo_images import DEMO_CLASSES
from infra.kafka import client_config
from models.evaluation import write_labels
from models.manifest import Manifest
from models.runtime import OnnxClassifier
from producers.archive import StreamArchive
from producers.replay import replay
from tests.helpers import run_cli, settings_env

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000.0


def stream_line(tweet_id: str, urls: list[str]) -> dict:
    keys = [f"3_{tweet_id}_{i}" for i in range(len(urls))]
    line: dict = {
        "data": {"id": tweet_id, "text": "look"},
        "matching_rules": [{"id": "1", "tag": "pets"}],
    }
    if urls:
        line["data"]["attachments"] = {"media_keys": keys}
        line["includes"] = {
            "media": [
                {"media_key": k, "type": "photo", "url": u} for k, u in zip(keys, urls, strict=True)
            ]
        }
    return line


def write_input(folder: Path, base: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The archive and labels: returns each demo photo's URL and the labels written, by
    media key (what the labels file says, right or not)."""
    posts: list[tuple[str, list[str]]] = []
    for n in range(3 * len(DEMO_CLASSES)):
        cls = DEMO_CLASSES[n % len(DEMO_CLASSES)]
        posts.append((str(9000 + n), [f"{base}/img/{cls}/{410_000 + n}.jpg"]))
    posts.append(("9100", [f"{base}/img/cats/420000.jpg", f"{base}/img/dogs/420001.jpg"]))
    posts.append(("9101", []))  # no photo: shed
    posts.append(("9102", [f"{base}/status/404/gone.jpg"]))  # a fetch dead letter
    posts.append(("9103", [f"{base}/corrupt/bad.jpg"]))  # a decode dead letter
    with StreamArchive(folder / "archive") as archive:
        for i, (tweet_id, urls) in enumerate(posts):
            archive.write(stream_line(tweet_id, urls), t_ms=T0 + 40 * i)
            if i == 5:
                archive.write(b"{this is no tweet", t_ms=T0 + 40 * i + 1)

    photos = {f"3_{t}_{i}": u for t, urls in posts for i, u in enumerate(urls) if "/img/" in u}
    labels: dict[str, list[str]] = {}
    for key, url in photos.items():
        if key.startswith("3_9100_"):
            continue  # labelled by its tweet id below
        cls = url.split("/")[-2]
        labels[key] = [] if cls == "others" else [cls]
    labels["3_9000_0"] = ["dogs"]  # wrong on purpose (a butterfly)
    labels["3_9001_0"] = ["cats", "hen"]  # one right, one not there
    labels["3_9015_0"] = []  # a cow said to deserve no hashtag
    del labels["3_9002_0"]  # no label: not judged
    write_labels(folder / "labels.jsonl", labels)
    with (folder / "labels.jsonl").open("a") as out:
        out.write(json.dumps({"tweet_id": "9100", "hashtags": ["#cats", "#dogs"]}) + "\n")
    for key in ("3_9100_0", "3_9100_1"):
        labels[key] = ["cats", "dogs"]
    return photos, labels


def worse_copy(demo: Path, folder: Path) -> Path:
    """The demo network under a manifest that names four of its outputs wrongly."""
    folder.mkdir()
    manifest = Manifest.load(demo)
    (folder / manifest.file).symlink_to((demo / manifest.file).resolve())
    classes = list(manifest.classes)
    classes[:4] = classes[1:4] + classes[:1]  # butterfly, cats, cow, dogs: rotated
    Manifest(**(manifest.__dict__ | {"classes": classes, "version": "rotated"})).save(folder)
    return folder


def expected_table(model: Path, photos: dict[str, str], labels: dict[str, list[str]]) -> dict:
    """The accuracy table, computed without the pipeline: ONNX Runtime on each photo's
    bytes as served, the manifest's thresholds, scikit-learn's metrics."""
    classifier = OnnxClassifier(model)
    manifest = classifier.manifest
    truth, served, right, margins = [], [], 0, []
    for key, url in photos.items():
        if key not in labels:
            continue
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read()
        (p,) = classifier.probabilities(classifier.preset.from_bytes(data)[0][None])
        scores = dict(zip(manifest.classes, p.tolist(), strict=True))
        top = manifest.classes[int(np.argmax(p))]
        tags = {c for c, s in scores.items() if s >= manifest.thresholds[c] and c != "others"}
        margins += [abs(s - manifest.thresholds[c]) for c, s in scores.items()]
        wanted = set(labels[key])
        truth.append(wanted)
        served.append(tags)
        right += top in (wanted or {"others"})
    # The pipeline batches photos, so its scores may differ from these in the last bits:
    # no score may sit that close to its threshold for the table to be exact.
    assert min(margins) > 1e-4
    names = sorted(set().union(*truth, *served))
    binarizer = MultiLabelBinarizer(classes=names)
    y_true, y_pred = binarizer.fit_transform(truth), binarizer.transform(served)
    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0
    )
    micro = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    return {
        "photos": len(truth),
        "top1_correct": right,
        "per_hashtag": [(f"#{n}", p[i], r[i], f[i], int(support[i])) for i, n in enumerate(names)],
        "micro": micro[:3],
        "macro": macro[:3],
    }


def assert_table(got: dict, want: dict) -> None:
    assert got["photos"] == want["photos"]
    assert got["top1_correct"] == want["top1_correct"]
    rows = [
        (r["hashtag"], r["precision"], r["recall"], r["f1"], r["support"])
        for r in got["per_hashtag"]
    ]
    assert [r[0] for r in rows] == [w[0] for w in want["per_hashtag"]]
    for row, wanted in zip(rows, want["per_hashtag"], strict=True):
        assert row[1:4] == pytest.approx(wanted[1:4], abs=1e-12), row[0]
        assert row[4] == wanted[4], row[0]
    for average in ("micro", "macro"):
        values = (got[average]["precision"], got[average]["recall"], got[average]["f1"])
        assert values == pytest.approx(want[average], abs=1e-12)


def test_two_models_side_by_side_with_an_exact_accuracy_table(
    make_settings, image_server, demo_model_dir, tmp_path, monkeypatch
) -> None:
    photos, labels = write_input(tmp_path / "input", image_server)
    worse = worse_copy(demo_model_dir, tmp_path / "worse")
    want = [expected_table(m, photos, labels) for m in (demo_model_dir, worse)]
    assert want[0]["top1_correct"] > want[1]["top1_correct"]  # the premise of the test

    settings = make_settings(fetch_allow_hosts=["127.0.0.1"], fetch_retries=0)
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--archive",
        str(tmp_path / "input" / "archive"),
        "--labels",
        str(tmp_path / "input" / "labels.jsonl"),
        "--model-dir",
        str(demo_model_dir),
        "--model-dir",
        str(worse),
        "--out",
        str(out),
        "--wait",
        "20",
        "--no-progress",
    ]
    assert run_cli(monkeypatch, settings_env(settings), *argv) == 0

    report = json.loads((out / "report.json").read_text())
    m1, m2 = report["models"]
    for model, wanted in zip((m1, m2), want, strict=True):
        assert_table(model["accuracy"], wanted)
        acc = model["accounting"]
        assert (acc["tweets_in"], acc["photos"], acc["results"]) == (43, 43, 41)
        assert acc["shed_tweets"] == {"no_photo": 1}
        assert acc["dead_letters"] == {"decode_image": 1, "fetch": 1, "replay": 1}
        assert acc["not_tweets"] == 1
        assert acc["missing_tweets"] == [] and acc["missing_photos"] == []
        assert model["accuracy"]["unlabelled"] == 1
        matrix = np.array(model["accuracy"]["confusion"]["matrix"])
        assert matrix.sum() == wanted["photos"] and np.trace(matrix) == wanted["top1_correct"]
        for stage in model["latency"]:
            assert stage["count"] == 41, stage
            assert stage["p50_ms"] <= stage["p90_ms"] <= stage["p99_ms"] <= stage["max_ms"]
        assert model["images_per_busy_s"] > 0
        assert model["precision"] == "fp32" and model["size_bytes"] > 1_000_000
    assert m1["deltas_vs_m1"] is None
    assert m2["deltas_vs_m1"]["top1_accuracy"] < 0 and m2["deltas_vs_m1"]["micro_f1"] < 0
    assert m1["run_id"] != m2["run_id"]
    assert report["truth"]["kind"] == "labels" and report["input"]["not_tweets"] == 1
    assert len(report["input"]["sha256"]) == 64

    md = (out / "report.md").read_text()
    assert "Ranked by top-1 accuracy, then micro F1: m1 demo-resnet50" in md
    assert " > m2 demo-resnet50:rotated." in md
    assert "Nothing missing" in md
    for name in ("report.html", "latency.png", "throughput.png", "confusion-m2.png"):
        assert (out / name).stat().st_size > 1000, name
    # On a cluster it was given, the evaluation leaves no topic of its own behind.
    admin = AdminClient(client_config(settings))
    left = [t for t in admin.list_topics(timeout=10).topics if "eval-" in t]
    assert not [t for t in left if t.startswith(settings.topic_prefix)], left


def test_a_topic_range_gives_the_table_its_archive_gave(
    make_settings, image_server, demo_model_dir, tmp_path, monkeypatch
) -> None:
    photos, labels = write_input(tmp_path / "input", image_server)
    want = expected_table(demo_model_dir, photos, labels)
    archived = make_settings()  # an archived `tweets` topic, of an earlier run
    replay(archived, archive=tmp_path / "input" / "archive", speed="max", run_id="earlier")

    settings = make_settings(fetch_allow_hosts=["127.0.0.1"], fetch_retries=0)
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--topic",
        archived.topic("tweets"),
        "--from",
        "0",
        "--labels",
        str(tmp_path / "input" / "labels.jsonl"),
        "--model-dir",
        str(demo_model_dir),
        "--out",
        str(out),
        "--wait",
        "20",
        "--no-progress",
    ]
    assert run_cli(monkeypatch, settings_env(settings), *argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["kind"] == "topic" and report["input"]["tweets"] == 43
    assert report["input"]["where"] == archived.topic("tweets") and report["input"]["from"] == 0
    [m1] = report["models"]
    assert_table(m1["accuracy"], want)
    acc = m1["accounting"]
    assert (acc["tweets_in"], acc["results"], acc["shed_tweets"]) == (43, 41, {"no_photo": 1})
    assert acc["dead_letters"] == {"decode_image": 1, "fetch": 1}  # no line that is no tweet
    assert acc["missing_photos"] == [] and acc["duplicates"] == {}


# Bad input: one clear line -------------------------------------------------------------


def run_evaluate(monkeypatch, capsys, tmp_path, *argv: str) -> tuple[int, list[str]]:
    env = {"TAGSTREAM_DATA_DIR": str(tmp_path / "data")}
    code = run_cli(monkeypatch, env, "evaluate", "--out", str(tmp_path / "out"), *argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return code, errors


def test_a_missing_archive_is_one_error_line(monkeypatch, capsys, tmp_path) -> None:
    code, errors = run_evaluate(monkeypatch, capsys, tmp_path, "--archive", str(tmp_path / "nope"))
    assert code == 1 and errors == [f"error: no archive at {tmp_path / 'nope'}"]
    assert not (tmp_path / "out").exists()


def test_labels_for_nothing_in_the_replay_are_one_error_line(
    monkeypatch, capsys, tmp_path, demo_model_dir
) -> None:
    write_input(tmp_path / "input", "http://127.0.0.1:9")
    labels = write_labels(tmp_path / "other.jsonl", {"3_1_0": ["cats"], "3_2_0": []})
    code, errors = run_evaluate(
        monkeypatch,
        capsys,
        tmp_path,
        "--archive",
        str(tmp_path / "input" / "archive"),
        "--labels",
        str(labels),
        "--model-dir",
        str(demo_model_dir),
    )
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"error: labels file {labels}: none of its 2 labels names")


def test_a_model_folder_without_a_manifest_is_one_error_line(
    monkeypatch, capsys, tmp_path, demo_model_dir
) -> None:
    write_input(tmp_path / "input", "http://127.0.0.1:9")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    shutil.copy(Manifest.load(demo_model_dir).model_path(demo_model_dir), empty / "model.onnx")
    code, errors = run_evaluate(
        monkeypatch,
        capsys,
        tmp_path,
        "--archive",
        str(tmp_path / "input" / "archive"),
        "--model-dir",
        str(demo_model_dir),
        "--model-dir",
        str(empty),
    )
    assert code == 1 and errors == [f"error: no manifest.json in {empty}"]
