"""The evaluation report (models/evaluation_report.py): the same content in Markdown, HTML
and JSON, plots that are real PNGs, a self-contained page whose text is all escaped, and
deltas against the first model."""

from __future__ import annotations

import html
import json
import re
import struct
from pathlib import Path

import pytest

from models.evaluation import (
    CLASSIFIED,
    PhotoOutcome,
    account,
    accuracy,
    busy_rate,
    latency,
    throughput,
)
from models.evaluation_report import Evaluation, ModelRun, write_report
from models.manifest import Manifest
from schemas import records

HOSTILE = "<script>document.title='pwned'</script>"
CLASSES = ["cats", "dogs", "others", f"x{HOSTILE}"]


def manifest(version: str, thresholds: float = 0.5) -> Manifest:
    return Manifest(
        model_id=f"demo{HOSTILE}",
        version=version,
        classes=CLASSES,
        thresholds={c: thresholds for c in CLASSES},
        input_size=64,
        resize_size=64,
        mean=[0.5] * 3,
        std=[0.2] * 3,
        file="model.onnx",
        sha256="ab" * 32,
        precision="fp32" if version == "1" else "int8",
    )


def model_run(n: int, right: int, folder: Path) -> ModelRun:
    """A run over 6 photos of which `right` get the right class."""
    tweets, results = [], []
    truth = {}
    for i in range(6):
        key = f"3_{i}"
        tweets.append(
            records.tweet(
                id=str(i),
                text="",
                source="replay",
                ingested_at_ms=1000.0 * i,
                media=[records.media(media_key=key, type="photo", url=f"http://h/{key}")],
            )
        )
        cls = "cats" if i % 2 else "dogs"
        truth[key] = frozenset([cls])
        top = cls if i < right else ("dogs" if cls == "cats" else "cats")
        stamps = {
            "ingested": 1000.0 * i,
            "received": 1000.0 * i + 5,
            "admitted": 1000.0 * i + 5.1,
            # no "fetched": the fetch and queue stages have no span (as with a cache hit)
            "consumed": 1000.0 * i + 30,
            "decoded": 1000.0 * i + 31,
            "inferred": 1000.0 * i + 40 * n,
            "produced": 1000.0 * i + 41 * n,
        }
        results.append(
            {
                "tweet_id": str(i),
                "media_key": key,
                "top_class": top,
                "hashtags": [f"#{top}"],
                "scores": {c: (0.8 if c == top else 0.2 / 3) for c in CLASSES},
                "consumer_id": "c",
                "retraction": False,
                "timestamps": stamps,
            }
        )
    acc = account(
        tweets,
        tweets=tweets,
        results=results,
        truth_of=lambda t, p: truth[p["media_key"]],
    )
    kept = [o.result for o in acc.outcomes if o.outcome == CLASSIFIED]
    width, points = throughput(kept, start_ms=0.0)
    images, rate = busy_rate(kept)
    return ModelRun(
        folder=folder,
        manifest=manifest(str(n)),
        size_bytes=4_000_000 // n,
        run_id=f"run-m{n}",
        accounting=acc,
        table=accuracy(acc.outcomes, classes=CLASSES),
        latencies=latency(kept),
        throughput_width_s=width,
        throughput=points,
        busy_images=images,
        busy_rate=rate,
    )


def evaluation(tmp_path: Path, rights: tuple[int, ...] = (6, 3)) -> Evaluation:
    return Evaluation(
        version="0.1.0",
        created_at="2025-01-01T00:00:00Z",
        input={
            "kind": "archive",
            "where": str(tmp_path / f"arch{HOSTILE}"),
            "sha256": "cd" * 32,
            "tweets": 6,
            "not_tweets": 0,
            "tweets_sha256": "ef" * 32,
        },
        speed="max",
        truth=f"labels file {HOSTILE}.jsonl (6 media keys, 0 tweet ids)",
        truth_kind="labels",
        admission="none: nothing shed for load",
        admission_kind="none",
        broker="embedded tansu",
        settings={"batch_max_size": 32, "note": HOSTILE},
        runs=[
            model_run(n, right, tmp_path / f"m{n}|{HOSTILE}")
            for n, right in enumerate(rights, start=1)
        ],
        wait_s=60.0,
    )


def test_report_files_and_numbers(tmp_path: Path) -> None:
    ev = evaluation(tmp_path)
    paths = write_report(ev, tmp_path / "out")
    out = tmp_path / "out"
    for name in (
        "confusion-m1.png",
        "confusion-m2.png",
        "reliability-m1.png",
        "reliability-m2.png",
        "latency.png",
        "throughput.png",
    ):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 250 and height > 250, name
    report = json.loads(paths["json"].read_text())
    m1, m2 = report["models"]
    assert m1["accuracy"]["top1_accuracy"] == 1.0 and m2["accuracy"]["top1_accuracy"] == 0.5
    assert m1["deltas_vs_m1"] is None
    assert m2["deltas_vs_m1"]["top1_accuracy"] == pytest.approx(-0.5)
    assert m2["deltas_vs_m1"]["size_ratio"] == pytest.approx(0.5)
    assert m1["accounting"]["missing_photos"] == [] and m1["accounting"]["photos"] == 6
    # JSON has no NaN: the percentiles of a stage no result has a span of are null.
    stages = {s["stage"]: s for s in m1["latency"]}
    assert stages["admit"]["count"] == 6 and stages["admit"]["p50_ms"] == pytest.approx(0.1)
    for name in ("fetch", "queue"):
        assert stages[name]["count"] == 0 and stages[name]["p50_ms"] is None
    assert "NaN" not in paths["json"].read_text()
    lines = (out / "photos-m2.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["truth"] == ["dogs"]

    md = paths["md"].read_text()
    assert "| top-1 accuracy | 1.0000 | 0.5000 (-0.5000) |" in md
    assert "Ranked by top-1 accuracy, then micro F1: m1 " in md and " > m2 " in md
    assert "![confusion matrix of m1" in md and "(confusion-m1.png)" in md
    assert "Nothing missing" in md
    assert "\\|" in md  # a pipe in a folder name does not break the table


def test_html_is_self_contained_and_every_text_is_escaped(tmp_path: Path) -> None:
    paths = write_report(evaluation(tmp_path), tmp_path / "out")
    page = paths["html"].read_text()
    assert HOSTILE not in page and "<script" not in page
    assert html.escape(HOSTILE) in page
    images = re.findall(r'<img alt="[^"]*" title="[^"]*" src="([^"]+)">', page)
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert 'src="http' not in page and "href=" not in page  # nothing to fetch
    assert "default-src 'none'" in page


def test_equal_models_are_ranked_as_equal(tmp_path: Path) -> None:
    paths = write_report(evaluation(tmp_path, rights=(3, 3)), tmp_path / "out")
    assert " = m2 " in paths["md"].read_text()


def test_one_model_has_no_side_by_side_and_missing_ids_are_listed(tmp_path: Path) -> None:
    ev = evaluation(tmp_path, rights=(6,))
    run = ev.runs[0]
    run.accounting.missing_photos = ["3_9"]
    run.accounting.outcomes.append(PhotoOutcome("9", "3_9", "", None, "missing"))
    run.waited_s = 60.0
    md = write_report(ev, tmp_path / "out")["md"].read_text()
    assert "F1 per hashtag, side by side" not in md and "Ranked" not in md
    assert "m1: missing after waiting 60 s: 3_9" in md
