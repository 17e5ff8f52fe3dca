"""Synthetic X API v2 stream lines and their conversion to Tweet records."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from infra.demo_images import DEMO_CLASSES
from infra.exceptions import CodecError
from infra.image_server import truth_from_url
from producers.synthetic import KINDS, SyntheticTweets, write_archive
from producers.tweets import tweet_from_stream_line
from schemas.records import photos

BASE = "http://127.0.0.1:8089"
TWEET_SCHEMA = fastavro.parse_schema(
    json.loads((Path(__file__).parents[2] / "schemas" / "Tweet.avsc").read_text())
)
TWEET_FIELDS = {f["name"] for f in TWEET_SCHEMA["fields"]}
LINES = 400


@pytest.fixture(scope="module")
def gen() -> SyntheticTweets:
    return SyntheticTweets(image_base_url=BASE + "/", seed=3, slow_delay_s=5)


@pytest.fixture(scope="module")
def by_kind(gen: SyntheticTweets) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = {}
    for n in range(LINES):
        kinds.setdefault(gen.kind(n), []).append(n)
    return kinds


def convert(line: dict[str, Any]) -> dict[str, Any]:
    return tweet_from_stream_line(line, source="synthetic", ingested_at_ms=1.5e12)


def test_every_kind_occurs(by_kind: dict[str, list[int]]) -> None:
    assert set(by_kind) == set(KINDS)
    assert len(by_kind["photo"]) > len(by_kind["multi_photo"]) > len(by_kind["video"])


def test_lines_are_deterministic_and_ids_unique(gen: SyntheticTweets) -> None:
    again = SyntheticTweets(image_base_url=BASE, seed=3, slow_delay_s=5)
    assert [gen.line(n) for n in range(50)] == [again.line(n) for n in range(50)]
    other = SyntheticTweets(image_base_url=BASE, seed=4)
    assert gen.line(0)["data"]["id"] != other.line(0)["data"]["id"]
    ids = [gen.line(n)["data"]["id"] for n in range(LINES)]
    assert len(set(ids)) == LINES and all(i.isdigit() for i in ids)
    keys = [
        k
        for n in range(LINES)
        for k in gen.line(n)["data"].get("attachments", {}).get("media_keys", [])
    ]
    assert len(set(keys)) == len(keys)


def test_line_shape_matches_the_v2_stream(gen: SyntheticTweets) -> None:
    for n in range(LINES):
        line = gen.line(n)
        assert set(line) <= {"data", "includes", "matching_rules"}
        data = line["data"]
        assert {"id", "text", "author_id", "created_at"} <= set(data)
        assert data["created_at"].endswith("Z") and "T" in data["created_at"]
        assert line["matching_rules"] and all(
            set(r) == {"id", "tag"} for r in line["matching_rules"]
        )
        if "attachments" not in data:
            assert "includes" not in line
            continue
        keys = data["attachments"]["media_keys"]
        media = {m["media_key"]: m for m in line["includes"]["media"]}
        assert set(keys) == set(media)
        for m in media.values():
            assert m["type"] in ("photo", "video", "animated_gif")
            assert isinstance(m["width"], int) and isinstance(m["height"], int)
            if m["type"] == "photo":
                assert m["url"].startswith(BASE + "/") and "preview_image_url" not in m
                assert m["media_key"].startswith("3_")
            else:
                assert "url" not in m and m["preview_image_url"].startswith(BASE + "/img/")


def test_each_kind_converts_to_a_valid_tweet(
    gen: SyntheticTweets, by_kind: dict[str, list[int]]
) -> None:
    expected_photos = {
        "photo": (1, 1),
        "multi_photo": (2, 4),
        "video": (0, 0),
        "animated_gif": (0, 0),
        "mixed": (1, 1),
        "no_media": (0, 0),
    }
    for kind, lines in by_kind.items():
        for n in lines[:10]:
            line = gen.line(n)
            tweet = convert(line)
            assert set(tweet) == TWEET_FIELDS
            assert fastavro.validate(tweet, TWEET_SCHEMA, strict=True)
            assert tweet["id"] == line["data"]["id"] and tweet["source"] == "synthetic"
            keys = line["data"].get("attachments", {}).get("media_keys", [])
            assert [m["media_key"] for m in tweet["media"]] == keys  # attachment order
            got = photos(tweet)
            lo, hi = expected_photos.get(kind, (1, 2))
            assert lo <= len(got) <= hi, (kind, n)
            for m in tweet["media"]:
                if m["type"] != "photo":
                    assert m["url"] is None and m["preview_image_url"]
            urls = [p["url"] for p in got]
            if kind in ("photo", "multi_photo", "mixed"):
                assert all(truth_from_url(u) in DEMO_CLASSES for u in urls)
            if kind.startswith("fault_"):
                fault = {
                    "fault_404": "/status/404/",
                    "fault_slow": "/slow/",
                    "fault_html": "/html/",
                    "fault_huge": "/huge/",
                    "fault_corrupt": "/corrupt/",
                }[kind]
                assert fault in urls[-1]
            if kind == "fault_slow":
                assert urls[-1].endswith("?delay=5") and truth_from_url(urls[-1]) in DEMO_CLASSES


def test_texts_include_markup_sometimes(gen: SyntheticTweets) -> None:
    texts = [gen.line(n)["data"]["text"] for n in range(LINES)]
    assert any("&lt;" in t for t in texts) and any("&amp;" in t for t in texts)
    assert not any("<" in t for t in texts)  # escaped, as the API sends text
    assert any(any(w in t for w in ("cat", "dog", "panda", "spider", "cow")) for t in texts)


def test_truth_from_url() -> None:
    assert truth_from_url(f"{BASE}/img/cats/12.jpg") == "cats"
    assert truth_from_url(f"{BASE}/slow/spider/3.jpg?delay=2") == "spider"
    assert truth_from_url(f"{BASE}/img/unicorn/1.jpg") is None
    assert truth_from_url(f"{BASE}/html/3_1_0.jpg") is None


def test_missing_include_is_skipped_and_order_kept() -> None:
    line = {
        "data": {"id": "1", "text": "t", "attachments": {"media_keys": ["3_b", "3_gone", "3_a"]}},
        "includes": {
            "media": [
                {"media_key": "3_a", "type": "photo", "url": "http://x/a.jpg"},
                {"media_key": "3_b", "type": "photo", "url": "http://x/b.jpg", "alt_text": "a & b"},
            ]
        },
    }
    tweet = convert(line)
    assert [m["media_key"] for m in tweet["media"]] == ["3_b", "3_a"]
    assert tweet["media"][0]["alt_text"] == "a & b"
    assert tweet["matching_rules"] == [] and tweet["author_id"] is None
    assert fastavro.validate(tweet, TWEET_SCHEMA, strict=True)
    replay = tweet_from_stream_line(line, source="replay", ingested_at_ms=1, replay_run_id="r1")
    assert replay["replay_run_id"] == "r1" and replay["ingested_at_ms"] == 1.0


def _broken(change: Any) -> dict[str, Any]:
    line = copy.deepcopy(SyntheticTweets(image_base_url=BASE).line(0))
    change(line)
    return line


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ([], "must be a JSON object"),
        ({}, "no 'data' object"),
        ({"errors": [{"title": "operational-disconnect"}]}, "no 'data'.*operational-disconnect"),
        ({"data": "x"}, "no 'data' object"),
        ({"data": {"text": "hi"}}, "no string 'data.id'"),
        ({"data": {"id": 5, "text": "hi"}}, "no string 'data.id'"),
        ({"data": {"id": "5"}}, "tweet 5: 'text' must be a string"),
        (_broken(lambda ln: ln["data"].update(author_id=7)), "'author_id' must be a string"),
        (_broken(lambda ln: ln["data"].update(attachments=[])), "'attachments' must be"),
        (_broken(lambda ln: ln["data"]["attachments"].update(media_keys="3_0_0")), "media_keys"),
        (_broken(lambda ln: ln.update(includes={"media": [{"type": "photo"}]})), "media_key"),
        (_broken(lambda ln: ln["includes"]["media"][0].update(width="160")), "'width' must"),
        (_broken(lambda ln: ln["includes"]["media"][0].update(type=None)), "'type' must"),
        (_broken(lambda ln: ln.update(matching_rules={"id": "1"})), "'matching_rules' must"),
    ],
)
def test_malformed_lines_raise_codec_error(line: Any, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        convert(line)


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="add up"):
        SyntheticTweets(image_base_url=BASE, fault_fraction=0.6, multi_photo_fraction=0.6)
    with pytest.raises(ValueError, match="0..1"):
        SyntheticTweets(image_base_url=BASE, video_fraction=-0.1)


def test_stream_text_entities_are_unescaped_once() -> None:
    line = {"data": {"id": "9", "text": "Tom &amp; Jerry &lt;3 &amp;amp;"}}
    tweet = tweet_from_stream_line(line, source="twitter", ingested_at_ms=1.0)
    assert tweet["text"] == "Tom & Jerry <3 &amp;"


def test_a_demo_archive_replays_the_lines_with_their_classes(tmp_path: Path) -> None:
    from producers.archive import read_archive

    gen = SyntheticTweets(image_base_url=BASE, seed=5)
    truth = write_archive(gen, tmp_path / "archive", count=120, rate=10.0, start=3)
    got = list(read_archive(tmp_path / "archive"))
    assert [a.line for a in got] == [gen.line(n) for n in range(3, 123)]
    assert [a.t_ms - got[0].t_ms for a in got] == [100.0 * i for i in range(120)]
    shown = {
        m["media_key"]: truth_from_url(m["url"])
        for a in got
        for m in (a.line.get("includes") or {}).get("media", [])
        if m["type"] == "photo" and truth_from_url(m["url"])
    }
    assert truth == shown and len(truth) > 100
    assert set(truth.values()) <= set(DEMO_CLASSES)
    # Replayed, they are synthetic posts still: not from X, with no x.com page.
    from producers.replay import ARCHIVE_PARSERS

    assert {a.line_format for a in got} == {"synthetic"}
    replayed = ARCHIVE_PARSERS["synthetic"](got[0].line, source="replay", ingested_at_ms=1.0)
    assert replayed["network"] == "synthetic" and replayed["post_url"] is None
    assert replayed["id"] == gen.line(3)["data"]["id"]


def test_the_demo_archive_command_writes_labels_evaluate_reads(tmp_path: Path, monkeypatch) -> None:
    from models.evaluation import Labels
    from producers.archive import read_archive
    from tests.helpers import run_cli

    out = tmp_path / "demo"
    argv = ["demo-archive", "--out", str(out), "--count", "40", "--no-faults"]
    assert run_cli(monkeypatch, {"TAGSTREAM_IMAGE_SERVER_PORT": "18123"}, *argv) == 0
    lines = [a.line for a in read_archive(out / "archive")]
    assert len(lines) == 40
    labels = Labels.load(out / "labels.jsonl")
    for line in lines:
        for m in (line.get("includes") or {}).get("media", []):
            if m["type"] != "photo":
                continue
            assert m["url"].startswith("http://127.0.0.1:18123/img/")
            cls = truth_from_url(m["url"])
            assert labels.truth(line["data"]["id"], m["media_key"]) == (
                frozenset() if cls == "others" else {cls}
            )
