"""The serving processes load only what they need: no torch in any of them.

`tagstream infer` with a model folder needs ONNX Runtime, not PyTorch (whose libraries
alone put a process at about 1 GB resident); the sink, the producers and the Faust
worker need neither. Checked on the running processes through /proc: no torch library
is mapped into them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.broker import free_port
from tests.pipeline import RunningPipeline

pytestmark = pytest.mark.integration


def mapped_torch(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "/torch/" in line})


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_serving_processes_never_load_torch(
    make_settings, image_server, demo_model_dir, tmp_path
) -> None:
    settings = make_settings(
        fetch_allow_hosts=["127.0.0.1"],
        faust_web_port=free_port(),
        sink_port=free_port(),
        sink_dir=tmp_path / "sink",
    )
    ready = {
        "infer": "inference consumer",
        "sink": "gallery: http",
        "faust": "Worker]: Ready",
        "producer": "produced",
    }
    with RunningPipeline(settings, tmp_path / "logs") as pipeline:
        pipeline.start("faust")
        pipeline.start("infer", "infer", "--model-dir", str(demo_model_dir))
        pipeline.start("sink", "sink")
        pipeline.start(
            "producer", "produce", "synthetic", "--rate", "50", "--count", "0",
            "--image-base-url", image_server,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(
            ready[name] in pipeline.log_of(name) or name == "producer" for name in ready
        ):
            time.sleep(0.5)
        time.sleep(2.0)  # the producer streams, the others have taken work
        found = {}
        for name in ready:
            assert pipeline.alive(name), pipeline.logs()
            pid = pipeline.group.processes[name].pid
            found[name] = (mapped_torch(pid), resident_mb(pid))
    print("\nresident MB: " + ", ".join(f"{n} {mb:.0f}" for n, (_, mb) in found.items()))
    for name, (libraries, _) in found.items():
        assert not libraries, f"{name} loaded torch: {libraries[:5]}"
