"""`tagstream produce bluesky` and `produce mastodon` on the embedded broker, in process,
against the fakes of tests/unit/test_bluesky.py and test_mastodon.py (real WebSocket and
server-sent events on loopback), then `tagstream produce replay` of what each archived.

Every image post must be on `tweets` exactly once, keyed by its network's id, across a
dropped connection (and, for Mastodon, a 429); edits and deletions follow under the same
key; frames and events that are not posts are dead letters with their bytes; the resume
position is saved; and the replay of the archive produces the same records again.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from producers.bluesky import at_uri
from producers.mastodon import status_key
from tests.helpers import BackgroundLoop, KafkaReader, run_cli, settings_env
from tests.unit.test_bluesky import ALICE, BOB, FakeJetstream, feed
from tests.unit.test_mastodon import FakeInstance, status

pytestmark = pytest.mark.integration

#: What the records of the same post must agree on, first produced and then replayed.
SAME = ("id", "text", "author_id", "media", "matching_rules", "network", "post_id",
        "post_url", "langs", "tags", "operation", "revision")  # fmt: skip


def read(settings, tweets: int, letters: int) -> dict[str, list[dict[str, Any]]]:
    reader = KafkaReader(settings, {"tweets": "Tweet", "deadletter": "DeadLetter"})
    try:
        reader.read_until(
            lambda f: len(f["tweets"]) >= tweets and len(f["deadletter"]) >= letters,
            timeout_s=20,
        )
        # Everything was flushed before the command returned: nothing more is coming.
        found = reader.read_until(lambda f: False, timeout_s=1.0)
    finally:
        reader.close()
    # In the order they were produced (the partitions interleave as they are read).
    found["tweets"].sort(key=lambda t: t["ingested_at_ms"])
    return found


def replay_and_compare(monkeypatch, make_settings, archive: Path, found: dict) -> None:
    target = make_settings()
    assert run_cli(monkeypatch, settings_env(target), "produce", "replay", "--archive",
                   str(archive), "--speed", "max") == 0  # fmt: skip
    again = read(target, len(found["tweets"]), len(found["deadletter"]))
    assert all(t["source"] == "replay" and t["replay_run_id"] for t in again["tweets"])
    assert [[t[k] for k in SAME] for t in again["tweets"]] == [
        [t[k] for k in SAME] for t in found["tweets"]
    ]
    # What was dead-lettered is again, with its bytes (inside the archived line for a
    # source that archives events with their context).
    assert len(again["deadletter"]) == len(found["deadletter"])
    for replayed, original in zip(again["deadletter"], found["deadletter"], strict=True):
        assert original["payload"] in replayed["payload"] and replayed["stage"] == "replay"


def test_bluesky_to_tweets_then_replay(monkeypatch, make_settings, tmp_path: Path) -> None:
    events = feed()
    fake = FakeJetstream(
        events,
        [
            [("send", 5), ("raw", "{not json"), ("drop",)],  # between 3k03 and 3k04
            [("send", 20)],
        ],
    )
    loop = BackgroundLoop()
    url = loop.run(fake.start())
    try:
        settings = make_settings()
        env = settings_env(settings, TAGSTREAM_BLUESKY_JETSTREAM_URL=url,
                           TAGSTREAM_BLUESKY_CDN_URL="https://cdn.example")  # fmt: skip
        state = tmp_path / "bluesky.json"
        argv = ["produce", "bluesky", "--tags", "cats,dogs,cow", "--max-tweets", "4",
                "--state", str(state), "--archive", str(tmp_path / "archive")]  # fmt: skip
        assert run_cli(monkeypatch, env, *argv) == 0
    finally:
        loop.run(fake.stop())
        loop.close()
    assert json.loads(state.read_text())["position"] == [events[12]["time_us"], 1]  # 3k07
    assert fake.queries[1]["cursor"] == [str(events[4]["time_us"])]

    found = read(settings, tweets=6, letters=1)
    ids = Counter((t["id"], t["operation"]) for t in found["tweets"])
    kept = [at_uri(ALICE, "3k01"), at_uri(ALICE, "3k03"), at_uri(BOB, "3k05"),
            at_uri(ALICE, "3k07")]  # fmt: skip
    assert ids == Counter(
        [(k, "create") for k in kept]
        + [(at_uri(ALICE, "3k01"), "delete"), (at_uri(ALICE, "3k03"), "update")]
    )
    for tweet in found["tweets"]:
        assert tweet["_key"] == tweet["id"].encode() and tweet["source"] == "bluesky"
        assert tweet["network"] == "bluesky"
        if tweet["operation"] != "delete":
            assert tweet["media"] and tweet["media"][0]["url"].startswith(
                "https://cdn.example/img/"
            )
            assert tweet["matching_rules"][0]["tag"] in ("cats", "dogs", "cow")
    (letter,) = found["deadletter"]
    assert letter["payload"] == b"{not json" and letter["stage"] == "bluesky"
    replay_and_compare(monkeypatch, make_settings, tmp_path / "archive", found)


def test_mastodon_to_tweets_then_replay(monkeypatch, make_settings, tmp_path: Path) -> None:
    first, second = status("401", tags=("sheep",)), status("402", tags=("Sheep",), images=2)
    fake = FakeInstance(
        {
            "hashtag:sheep": [
                [
                    ("event", "update", first),
                    (":", "thump"),
                    ("event", "update", "{oops"),
                    ("event", "update", status("403", tags=("sheep",), images=0)),
                    ("drop",),
                ],
                [("http", 429, {"Retry-After": "1"})],
                [
                    ("event", "status.update", {**first, "edited_at": "2024-09-10T08:00:00Z"}),
                    ("event", "delete", "401"),
                    ("event", "update", second),
                    ("stall",),
                ],
            ]
        }
    )
    loop = BackgroundLoop()
    base = loop.run(fake.start())
    try:
        settings = make_settings()
        argv = ["produce", "mastodon", "--instance", base, "--tag", "sheep", "--max-tweets",
                "2", "--archive", str(tmp_path / "archive")]  # fmt: skip
        assert run_cli(monkeypatch, settings_env(settings), *argv) == 0
    finally:
        loop.run(fake.stop())
        loop.close()
    assert [stream for stream, _ in fake.requests] == ["hashtag:sheep"] * 3

    found = read(settings, tweets=4, letters=1)
    host = base.removeprefix("http://")
    assert [(t["id"], t["operation"]) for t in found["tweets"]] == [
        (status_key(host, "401"), "create"),
        (status_key(host, "401"), "update"),
        (status_key(host, "401"), "delete"),
        (status_key(host, "402"), "create"),
    ]
    assert all(t["_key"] == t["id"].encode() for t in found["tweets"])
    assert found["tweets"][3]["matching_rules"] == [{"id": "hashtag:sheep", "tag": "sheep"}]
    assert [m["type"] for m in found["tweets"][3]["media"]] == ["photo", "photo"]
    (letter,) = found["deadletter"]
    assert letter["payload"] == b"{oops" and letter["stage"] == "mastodon"
    replay_and_compare(monkeypatch, make_settings, tmp_path / "archive", found)
