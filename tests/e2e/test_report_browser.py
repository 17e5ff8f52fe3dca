"""The evaluation report's page in a real (headless) Chromium: it renders its tables and
inlined plots from the file alone, and text from the input stays text.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from models.evaluation_report import write_report
from tests.unit.test_evaluation_report import HOSTILE, evaluation

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs /usr/bin/chromium (apt-get install -y chromium)",
)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_report_page_renders_offline_and_escapes_its_text(tmp_path: Path) -> None:
    page = write_report(evaluation(tmp_path), tmp_path / "out")["html"]
    # Moved away from its PNGs: the page needs nothing beside itself.
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    page.rename(alone)
    url = alone.as_uri()

    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title == "tagstream evaluation"  # the hostile text ran nothing
    assert "<script" not in dom.stdout
    assert dom.stdout.count('src="data:image/png;base64,') == 6
    assert dom.stdout.count("<table>") >= 6
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom.stdout
    assert HOSTILE not in dom.stdout

    shot = tmp_path / "report.png"
    snap = _chromium(
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        "--hide-scrollbars",
        url,
    )
    assert snap.returncode == 0, snap.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 2400)
    # The plots drew: the page holds their colours, not only text on white.
    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((120, 240)).getcolors(maxcolors=120 * 240)
    assert colours is not None
    blue = sum(n for n, (r, g, b) in colours if b > 150 and r < 100 and g < 160)
    assert blue > 50, "no plot bars on the page"
