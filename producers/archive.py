"""An archive of raw stream lines, with their receive times, in rotating gzip files.

`StreamArchive` writes one JSON object per line: ``{"t": epoch_ms, "line": {...}}`` for a
line that parsed as a JSON object, ``{"t": epoch_ms, "raw": "..."}`` for one that did not
(its bytes as text; bytes that are not UTF-8 survive the round trip as escaped
surrogates). A line of a source other than the X stream also names its format,
``{"t": epoch_ms, "format": "bluesky", "line": {...}}``, which tells replay how to read
it back (producers/replay.py); X lines carry no format, as they always did, so archives
of either age read the same. Files rotate by uncompressed size and by age and are named
``stream-YYYYmmddTHHMMSSZ-NNNNNN.jsonl.gz`` (UTC open time, then a counter), so names sort
in time order. A file is written as ``<name>.part`` and renamed when closed: a reader of
the folder never sees a half-written file. A process killed mid-file leaves its
``.part`` behind; `read_archive` skips those in a folder but reads one named directly, up
to where it was cut.

`read_archive` also reads plain v2 JSON-lines files (one stream line per line, no times),
as saved by ``curl`` or another tool; their lines come with ``t = None``.

This is a file archive, not a Kafka client: it guarantees that a line whose `write`
returned is in the file once the file is closed (`close`, rotation, or the context
manager's exit), and nothing for a process killed before that.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

log = logging.getLogger(__name__)

PREFIX = "stream-"
SUFFIX = ".jsonl.gz"
PART = ".part"

#: A parsed stream line, or the bytes of one that was not a JSON object.
ArchivedLine = dict[str, Any] | bytes


class Archived(NamedTuple):
    """What `read_archive` yields per line: its receive time (None in plain JSON-lines
    files), the line, and its format (None: an X API v2 line)."""

    t_ms: float | None
    line: ArchivedLine
    line_format: str | None = None


class StreamArchive:
    """Appends stream lines to rotating gzip JSON-lines files in `folder`.

    A file is closed and a new one opened when its uncompressed size reaches
    `max_bytes` or it has been open `max_age_s` seconds (by `clock`, epoch seconds);
    the check runs before each write, so a file holds at least one line. Use as a
    context manager or call `close()`. Not thread-safe: one writer per archive.
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 64_000_000,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        compresslevel: int = 6,
    ) -> None:
        if max_bytes < 1 or max_age_s <= 0:
            raise ValueError("max_bytes and max_age_s must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.compresslevel = compresslevel
        self._clock = clock
        self._seq = 0
        self._file: IO[bytes] | None = None
        self._part: Path | None = None
        self._opened_at = 0.0
        self._written = 0
        #: Final paths of the files closed so far, in order.
        self.closed_files: list[Path] = []

    def __enter__(self) -> StreamArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(
        self,
        line: dict[str, Any] | bytes | str,
        *,
        t_ms: float | None = None,
        line_format: str | None = None,
    ) -> None:
        """Archive one line as received at `t_ms` (default: now by the clock).

        A dict is stored as parsed JSON; bytes or str (a malformed line) as text.
        `line_format` names the source's format (None: an X API v2 line).
        """
        now = self._clock()
        if t_ms is None:
            t_ms = now * 1000.0
        record: dict[str, Any] = {"t": t_ms}
        if line_format is not None:
            record["format"] = line_format
        if isinstance(line, dict):
            record["line"] = line
        else:
            raw = line.decode("utf-8", "surrogateescape") if isinstance(line, bytes) else line
            record["raw"] = raw
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        if self._file is not None and (
            self._written >= self.max_bytes or now - self._opened_at >= self.max_age_s
        ):
            self._rotate()
        if self._file is None:
            self._open(now)
        assert self._file is not None
        self._file.write(data)
        self._written += len(data)

    def close(self) -> None:
        """Close the open file, if any, and give it its final name."""
        self._rotate()

    def _open(self, now: float) -> None:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        while True:
            self._seq += 1
            name = f"{PREFIX}{stamp}-{self._seq:06d}{SUFFIX}"
            final = self.folder / name
            part = self.folder / (name + PART)
            # Another archive (an earlier run) may have used this second and counter.
            if not final.exists() and not part.exists():
                break
        self._part = part
        self._file = gzip.open(part, "wb", compresslevel=self.compresslevel)
        self._opened_at = now
        self._written = 0

    def _rotate(self) -> None:
        if self._file is None or self._part is None:
            return
        self._file.close()
        final = self._part.with_name(self._part.name[: -len(PART)])
        self._part.rename(final)
        self.closed_files.append(final)
        log.info("archived %d bytes to %s", self._written, final)
        self._file = None
        self._part = None


def archive_files(path: Path) -> list[Path]:
    """The files `read_archive` reads for `path`, in order: the file itself, or the
    folder's finished files (no ``.part``) sorted by name."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(PART))
    if not path.exists():
        raise FileNotFoundError(f"no archive at {path}")
    return [path]


def _open_text(path: Path) -> IO[bytes]:
    with path.open("rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def _decode(raw: bytes) -> Archived:
    try:
        obj = json.loads(raw)
    except ValueError:
        return Archived(None, raw)
    if not isinstance(obj, dict):
        return Archived(None, raw)
    t = obj.get("t")
    line_format = obj.get("format")
    is_record = (
        set(obj) - {"format"} in ({"t", "line"}, {"t", "raw"})
        and (t is None or (isinstance(t, int | float) and not isinstance(t, bool)))
        and (line_format is None or isinstance(line_format, str))
    )
    if not is_record:
        return Archived(None, obj)  # a plain v2 stream line
    # JSON from elsewhere may say Infinity or NaN: such a time is no time (pacing would
    # wait for ever on it); the line is still replayed.
    try:
        t_ms = float(t) if t is not None else None
    except OverflowError:  # an integer beyond any float
        t_ms = None
    if t_ms is not None and not math.isfinite(t_ms):
        t_ms = None
    if "line" in obj:
        line = obj["line"]
        if isinstance(line, dict):
            return Archived(t_ms, line, line_format)
        return Archived(t_ms, json.dumps(line).encode(), line_format)
    text = obj["raw"]
    if not isinstance(text, str):
        return Archived(t_ms, json.dumps(text).encode(), line_format)
    return Archived(t_ms, text.encode("utf-8", "surrogateescape"), line_format)


def read_archive(path: Path) -> Iterator[Archived]:
    """``(t_ms, line, line_format)`` for every line of an archive file or folder, in order.

    `line` is the parsed stream line (a dict), or the bytes of a line that was not a JSON
    object. `t_ms` is the receive time in epoch ms, None for plain JSON-lines files.
    `line_format` is the source's format, None for X API v2 lines.
    Blank lines are skipped; a file cut short (a leftover ``.part``) is read up to the
    cut, with a warning.
    """
    for file in archive_files(Path(path)):
        with _open_text(file) as f:
            try:
                for raw in f:
                    raw = raw.rstrip(b"\r\n")
                    if raw.strip():
                        yield _decode(raw)
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                log.warning("archive file %s is cut short (%s); read up to the cut", file, e)
