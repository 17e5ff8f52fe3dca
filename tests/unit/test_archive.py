"""The stream archive (rotation, .part files, reading back) and replay timing, no broker."""

from __future__ import annotations

import asyncio
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from infra.exceptions import ConfigurationError
from infra.settings import Settings
from producers import replay as replay_module
from producers.archive import StreamArchive, archive_files, read_archive
from producers.replay import ReplaySource, parse_bound, parse_speed
from producers.source import pump
from tests.helpers import RecordingProducer


def line(n: int) -> dict[str, Any]:
    return {
        "data": {"id": f"{1000 + n}", "text": f"tweet {n} &amp; more"},
        "matching_rules": [{"id": "1", "tag": "cow"}],
    }


class FakeClock:
    """Epoch seconds that move only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rotates_by_size_with_sortable_names_and_reads_back_in_order(tmp_path: Path) -> None:
    clock = FakeClock()
    with StreamArchive(tmp_path, max_bytes=300, clock=clock) as archive:
        for n in range(20):
            archive.write(line(n))
            clock.now += 0.01
        archive.write(b"{oops not json \xff")
    files = archive_files(tmp_path)
    assert len(files) > 3
    assert files == archive.closed_files  # names sort in writing order
    assert all(
        f.name.startswith("stream-20231114T") and f.name.endswith(".jsonl.gz") for f in files
    )
    assert not list(tmp_path.glob("*.part"))
    back = list(read_archive(tmp_path))
    assert [a.line for a in back] == [line(n) for n in range(20)] + [b"{oops not json \xff"]
    assert {a.line_format for a in back} == {None}  # X lines: no format, as always
    times = [a.t_ms for a in back]
    assert times[0] == pytest.approx(1_700_000_000_000.0)
    assert times[:20] == sorted(times[:20])
    # One file alone reads too, and every file is a whole gzip stream.
    assert list(read_archive(files[0])) == back[: len(list(read_archive(files[0])))]
    for f in files:
        with gzip.open(f, "rb") as g:
            assert all(json.loads(raw)["t"] > 0 for raw in g.read().splitlines())


def test_rotates_by_age_and_open_file_is_a_part(tmp_path: Path) -> None:
    clock = FakeClock()
    archive = StreamArchive(tmp_path, max_age_s=60, clock=clock)
    archive.write(line(0))
    archive.write(line(1))
    parts = list(tmp_path.glob("*.part"))
    assert len(parts) == 1 and parts[0].name.endswith(".jsonl.gz.part")
    assert list(read_archive(tmp_path)) == []  # readers never see the open file
    clock.now += 61
    archive.write(line(2))
    assert len(archive.closed_files) == 1
    archive.close()
    assert len(archive_files(tmp_path)) == 2 and not list(tmp_path.glob("*.part"))
    assert [a.line["data"]["id"] for a in read_archive(tmp_path)] == ["1000", "1001", "1002"]


def test_same_second_restart_does_not_overwrite(tmp_path: Path) -> None:
    clock = FakeClock()
    for n in range(2):
        with StreamArchive(tmp_path, clock=clock) as archive:
            archive.write(line(n))
    assert len(archive_files(tmp_path)) == 2
    assert [a.line["data"]["id"] for a in read_archive(tmp_path)] == ["1000", "1001"]


def test_cut_part_file_reads_up_to_the_cut(tmp_path: Path) -> None:
    with StreamArchive(tmp_path) as archive:
        for n in range(200):
            archive.write(line(n))
    data = archive.closed_files[0].read_bytes()
    cut = tmp_path / "cut.jsonl.gz.part"
    cut.write_bytes(data[: len(data) // 2])
    got = list(read_archive(cut))
    assert 0 < len(got) < 200
    assert [a.line for a in got] == [line(n) for n in range(len(got))]


def test_plain_json_lines_have_no_times(tmp_path: Path) -> None:
    plain = tmp_path / "saved.jsonl"
    plain.write_text(json.dumps(line(0)) + "\n\n" + "not json\r\n" + json.dumps(line(1)) + "\n")
    assert list(read_archive(plain)) == [
        (None, line(0), None),
        (None, b"not json", None),
        (None, line(1), None),
    ]
    gz = tmp_path / "saved.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(read_archive(gz)) == list(read_archive(plain))


def test_lines_of_other_sources_name_their_format_and_old_archives_read_the_same(
    tmp_path: Path,
) -> None:
    with StreamArchive(tmp_path / "a") as archive:
        archive.write(line(0), t_ms=1.0)
        archive.write({"event": {"did": "did:plc:x"}}, t_ms=2.0, line_format="bluesky")
        archive.write(b"{cut", t_ms=3.0, line_format="bluesky")
    assert list(read_archive(tmp_path / "a")) == [
        (1.0, line(0), None),
        (2.0, {"event": {"did": "did:plc:x"}}, "bluesky"),
        (3.0, b"{cut", "bluesky"),
    ]
    with gzip.open(archive.closed_files[0], "rt") as f:
        stored = [json.loads(raw) for raw in f]
    assert stored[0] == {"t": 1.0, "line": line(0)}  # what older versions wrote and read
    assert stored[1]["format"] == "bluesky"
    # An object with a format that is not a string is no archive record: a plain line.
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"t": 1, "format": 7, "line": {}}) + "\n")
    assert list(read_archive(odd)) == [(None, {"t": 1, "format": 7, "line": {}}, None)]


def test_parse_speed_and_bounds() -> None:
    assert parse_speed("10x") == 10.0
    assert parse_speed("0.5X") == 0.5
    assert parse_speed("2") == 2.0
    assert parse_speed("max") is None
    for bad in ("0x", "-1x", "fast", "infx"):
        with pytest.raises(ConfigurationError):
            parse_speed(bad)
    assert parse_bound("42") == 42
    assert parse_bound("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_bound("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=UTC)
    with pytest.raises(ConfigurationError):
        parse_bound("yesterday")


class SimClock:
    """A monotonic clock that a sleep moves forward, plus some work time per read."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        self.now += 0.0002  # each send costs a little time
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def archived(tmp_path: Path, gaps_ms: list[float]) -> Path:
    t = 1_700_000_000_000.0
    with StreamArchive(tmp_path / "a") as archive:
        archive.write(line(0), t_ms=t)
        for n, gap in enumerate(gaps_ms, start=1):
            t += gap
            archive.write(line(n) if n != 3 else b"garbage", t_ms=t)
    return tmp_path / "a"


def replay_sim(path: Path, speed: str, **bounds: Any) -> tuple[SimClock, Any, Any]:
    sim = SimClock()
    producer = RecordingProducer()
    source = ReplaySource(Settings(), archive=path, speed=speed, run_id="run-1", **bounds)

    async def sleep(seconds: float) -> None:
        sim.sleep(seconds)

    counts = asyncio.run(pump(source, producer, clock=sim.clock, sleep=sleep))  # type: ignore[arg-type]
    return sim, producer, counts


def test_replay_at_10x_sleeps_the_original_gaps_over_ten(tmp_path: Path) -> None:
    gaps = [120.0, 35.0, 500.0, 7.0, 60.0, 1000.0, 250.0]
    sim, sender, counts = replay_sim(archived(tmp_path, gaps), "10x")
    assert len(sim.sleeps) == len(gaps)
    for asked, gap in zip(sim.sleeps, gaps, strict=True):
        assert asked == pytest.approx(gap / 10 / 1000, abs=0.001)
    assert counts["tweets"] == len(gaps) and counts["dead_letters"] == 1
    sent = sender.of("tweets")
    assert [t["id"] for t in sent] == [f"{1000 + n}" for n in range(len(gaps) + 1) if n != 3]
    assert all(t["replay_run_id"] == "run-1" and t["source"] == "replay" for t in sent)
    assert sent[0]["text"] == "tweet 0 & more"
    (letter,) = sender.of("deadletter")
    assert letter["payload"] == b"garbage" and letter["source_offset"] == 3
    assert letter["stage"] == "replay" and letter["source_topic"].startswith("archive:")


def test_replay_max_never_sleeps_and_bounds_select(tmp_path: Path) -> None:
    path = archived(tmp_path, [100.0] * 9)
    sim, sender, _ = replay_sim(path, "max")
    assert sim.sleeps == [] and len(sender.of("tweets")) == 9
    _, sender, _ = replay_sim(path, "max", start=4, stop=7)
    assert [t["id"] for t in sender.of("tweets")] == ["1004", "1005", "1006"]
    t0 = 1_700_000_000_000.0
    start = datetime.fromtimestamp((t0 + 250) / 1000, UTC)
    stop = datetime.fromtimestamp((t0 + 500) / 1000, UTC)
    _, sender, _ = replay_sim(path, "max", start=start, stop=stop)
    assert [t["id"] for t in sender.of("tweets")] == ["1004"]  # 1003 (300 ms) is the garbage line


def test_replay_needs_one_source() -> None:
    with pytest.raises(ConfigurationError):
        replay_module.replay(None, speed="max")  # type: ignore[arg-type]
