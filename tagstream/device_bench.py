"""`tagstream device-bench`: the GPU figures of the device check, as JSON and Markdown.

Run by scripts/device_check.sh on a machine with an NVIDIA GPU. The goals are for an H200
with 16 cores: the model stage at least 30,000 images/s, the consumers end to end at least
10,000 images/s. Within a time budget, each step written out as soon as it is measured:

1. the model alone: the 224x224 APoZ-pruned ResNet50 (models/variant_bench.py) in FP16
   and INT8, on the CUDA and on the TensorRT execution provider, batches already on the
   device (as MLPerf measures), through the I/O binding the consumer uses;
2. GPU decode alone: nvJPEG batches of tweet-size photos (1200x900 JPEG), resized,
   normalised and thumbnailed on the device, as the consumer's GPU decoder does;
3. the consumers end to end: a backlog of those photos on the broker (the embedded one
   unless TAGSTREAM_KAFKA_BOOTSTRAP names a cluster) and 1, 2, 4, ... `tagstream infer`
   processes, each run in its own consumer group from the start of the backlog, until
   throughput stops growing (the GPU is saturated) or the budget ends.

With ``cpu_dry_run`` the same steps run on the CPU at tiny sizes: a check that the script
works end to end, not figures.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from infra.broker import EmbeddedBroker
from infra.demo_images import render_demo_photo_jpeg
from infra.kafka import consumed, consumer_config
from infra.settings import Settings
from infra.topics import ensure_topics
from models.presets import TorchPreset
from models.runtime import OnnxClassifier
from models.variant_bench import pruned_resnet50_variants
from schemas.codec import Codec
from tagstream.pipeline_bench import photo_key, produce_backlog

GOALS = {"model_alone": 30_000.0, "end_to_end": 10_000.0}


@dataclass
class Sizes:
    """How much each step does: a GPU run, or the CPU dry run's tiny version."""

    batch: int
    model_seconds: float
    decode_photos: int
    backlog: int
    partitions: int
    consumer_counts: tuple[int, ...]
    configs: tuple[tuple[str, str], ...]  # (provider, precision) for the model alone
    e2e: tuple[str, str]  # (provider, precision) of the consumers
    device: str


GPU = Sizes(
    batch=256,
    model_seconds=4.0,
    decode_photos=2048,
    backlog=24_000,
    partitions=16,
    consumer_counts=(1, 2, 4, 8, 12),
    configs=(("cuda", "fp16"), ("cuda", "int8"), ("tensorrt", "fp16"), ("tensorrt", "int8")),
    e2e=("tensorrt", "int8"),
    device="cuda:0",
)
DRY = Sizes(
    batch=8,
    model_seconds=1.0,
    decode_photos=16,
    backlog=96,
    partitions=2,
    consumer_counts=(1, 2),
    configs=(("cpu", "fp32"), ("cpu", "int8")),
    e2e=("cpu", "int8"),
    device="cpu",
)


@dataclass
class Report:
    mode: str
    machine: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    model_alone: list[dict[str, Any]] = field(default_factory=list)
    decode_alone: dict[str, Any] = field(default_factory=dict)
    end_to_end: list[dict[str, Any]] = field(default_factory=list)
    goals: dict[str, float] = field(default_factory=lambda: dict(GOALS))
    notes: list[str] = field(default_factory=list)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_bench.json").write_text(json.dumps(asdict(self), indent=2) + "\n")
        (out / "device_bench.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [
            f"# Device check ({self.mode})",
            "",
            "| | |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in self.machine.items()),
            *(f"| tests: {k} | {v} |" for k, v in self.tests.items()),
            "",
            "| figure | provider | precision | batch | images/s | goal |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.model_alone:
            rate = f"{row['images_per_s']:,.0f}" if "images_per_s" in row else row["error"]
            lines.append(
                f"| model alone ({row['model']}) | {row['provider']} | {row['precision']} | "
                f"{row['batch']} | {rate} | >= {GOALS['model_alone']:,.0f} |"
            )
        if self.decode_alone:
            d = self.decode_alone
            rate = f"{d['images_per_s']:,.0f}" if "images_per_s" in d else d["error"]
            lines.append(
                f"| decode alone ({d['what']}) | {d['device']} | | {d['batch']} | {rate} | |"
            )
        for row in self.end_to_end:
            rate = f"{row['images_per_s']:,.0f}" if "images_per_s" in row else row["error"]
            util = f", GPU busy {row['gpu_busy']:.0%}" if row.get("gpu_busy") is not None else ""
            lines.append(
                f"| end to end, {row['consumers']} consumer process(es){util} | "
                f"{row['provider']} | {row['precision']} | {row['batch']} | {rate} | "
                f">= {GOALS['end_to_end']:,.0f} |"
            )
        lines += ["", *(f"- {note}" for note in self.notes), ""]
        return "\n".join(lines)


def progress(message: str) -> None:
    print(f"[device-bench] {message}", flush=True)


def machine_info(sizes: Sizes) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": f"{ort.__version__} {ort.get_available_providers()}",
        "torch": torch.__version__,
    }
    if sizes.device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def tests_summary(junit: Path | None) -> dict[str, Any]:
    if junit is None or not junit.is_file():
        return {}
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def device_batch(classifier: OnnxClassifier, rows: int, device: str):
    """A random input batch where the model reads it: on the GPU, or a host buffer."""
    if device == "cpu":
        return classifier.input_buffer(rows)
    dtype = torch.float16 if classifier.input_dtype == np.float16 else torch.float32
    return torch.randn((rows, *classifier.input_shape), device=device, dtype=dtype)


def time_model(classifier: OnnxClassifier, batch, seconds: float) -> float:
    """Images/s of ONNX Runtime alone on `batch` (a device tensor or a host buffer)."""
    runner = classifier.runner()

    def run() -> None:
        if isinstance(batch, np.ndarray):
            runner.run(batch)
        else:
            runner.run_device(batch.data_ptr(), tuple(batch.shape), classifier.input_dtype)

    for _ in range(3):
        run()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def bench_models(
    settings: Settings, sizes: Sizes, folders: dict[str, Path], report: Report, out: Path
) -> None:
    for provider, precision in sizes.configs:
        # FP16 on CUDA is the FP16 model file; on TensorRT the FP32 file built in FP16.
        # INT8 is the QDQ file on both (TensorRT reads its scales).
        if precision == "fp16" and provider == "tensorrt":
            folder, asked = folders["fp32"], "fp16"
        elif precision == "int8" and provider == "tensorrt":
            folder, asked = folders["int8"], "int8"
        else:
            folder, asked = folders[precision], "model"
        row: dict[str, Any] = {
            "model": f"pruned ResNet50 224x224 {folder.name}",
            "provider": provider,
            "precision": precision,
            "batch": sizes.batch,
        }
        progress(f"model alone: {provider} {precision}")
        try:
            started = time.monotonic()
            classifier = OnnxClassifier(
                folder,
                provider=provider,
                precision=asked,
                max_batch=sizes.batch,
                cache_dir=settings.data_dir / "tensorrt-cache",
            )
            row["session_s"] = round(time.monotonic() - started, 1)
            batch = device_batch(classifier, sizes.batch, sizes.device)
            row["images_per_s"] = time_model(classifier, batch, sizes.model_seconds)
            row["recorded_as"] = f"{classifier.provider} {classifier.precision}"
        except Exception as exc:  # a provider that cannot start here is a finding, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        report.model_alone.append(row)
        report.write(out)


def bench_decode(sizes: Sizes, folder: Path, report: Report, out: Path) -> None:
    progress(f"decode alone: {sizes.decode_photos} photos on {sizes.device}")
    classifier = OnnxClassifier(folder)
    photos = [render_demo_photo_jpeg(*photo_key(i)) for i in range(min(64, sizes.decode_photos))]
    preset = TorchPreset(classifier.preset, device=sizes.device, thumbnail_px=160)
    buffer = preset.new_batch(sizes.batch)
    chunks = [
        [photos[(s + i) % len(photos)] for i in range(sizes.batch)]
        for s in range(0, sizes.decode_photos, sizes.batch)
    ]
    row: dict[str, Any] = {
        "what": "nvJPEG decode, resize, normalise, thumbnail" if sizes.device != "cpu" else
        "torchvision CPU decode, resize, normalise, thumbnail",
        "device": sizes.device,
        "batch": sizes.batch,
    }  # fmt: skip
    try:
        preset.decode_into(chunks[0], buffer)  # warm-up: nvJPEG's first call allocates
        sync = torch.cuda.synchronize if sizes.device != "cpu" else (lambda: None)
        sync()
        started = time.perf_counter()
        for chunk in chunks:
            preset.decode_into(chunk, buffer)
        sync()
        row["images_per_s"] = len(chunks) * sizes.batch / (time.perf_counter() - started)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    report.decode_alone = row
    report.write(out)


class GpuBusy:
    """nvidia-smi sampling the GPU's utilisation while a run lasts (None without one)."""

    def __init__(self, enabled: bool) -> None:
        self.process = None
        if enabled:
            try:
                self.process = subprocess.Popen(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                        "-lms",
                        "250",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError:
                self.process = None

    def stop(self) -> float | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=10)
        samples = [float(x) for x in output.split() if x.strip().replace(".", "").isdigit()]
        # The middle half: the run's steady state, not its start-up or its tail.
        middle = samples[len(samples) // 4 : 3 * len(samples) // 4] or samples
        return sum(middle) / len(middle) / 100 if middle else None


def run_consumers(
    settings: Settings, sizes: Sizes, folder: Path, count: int, budget_s: float
) -> dict[str, Any]:
    """`count` consumer processes in a new group through the whole backlog; images/s
    between a quarter and three quarters of it (start-up and tail excluded)."""
    provider, precision = sizes.e2e
    run = f"e2e{count}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TAGSTREAM_KAFKA_BOOTSTRAP": settings.bootstrap(),
        "TAGSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "TAGSTREAM_MODEL_DIR": str(folder.resolve()),
        "TAGSTREAM_DATA_DIR": str(settings.data_dir.resolve()),
        "TAGSTREAM_BATCH_MAX_SIZE": str(sizes.batch),
        "TAGSTREAM_ORT_PROVIDER": provider,
        "TAGSTREAM_ORT_PRECISION": "model" if provider != "tensorrt" else precision,
        "TAGSTREAM_DECODE_WORKERS": str(max(2, (os.cpu_count() or 2) // max(1, count))),
        "TAGSTREAM_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
    }
    row: dict[str, Any] = {
        "consumers": count,
        "provider": provider,
        "precision": precision,
        "batch": sizes.batch,
    }
    codec = Codec.from_settings(settings)
    counter = Consumer(consumer_config(settings, f"count-{run}"))
    hashtags = settings.topic("hashtags")
    metadata = counter.list_topics(hashtags, timeout=10).topics[hashtags]
    counter.assign([TopicPartition(hashtags, p, OFFSET_END) for p in metadata.partitions])
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    busy = GpuBusy(sizes.device != "cpu")
    done, marks = 0, []
    started = time.monotonic()
    try:
        for i in range(count):
            log = open(logs / f"{run}-{i}.log", "wb")  # noqa: SIM115 - closed with the process
            child_env = env | {"TAGSTREAM_CONSUMER_ID": f"{run}-{i}"}
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, "-m", "tagstream.cli", "infer", "--group", run],
                        env=child_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        while done < sizes.backlog and time.monotonic() - started < budget_s:
            for message in consumed(counter, 10_000, 0.1):
                # Only this run's results (the end offsets tansu reports can be stale).
                result = codec.decode("HashtagResult", message.value())
                done += result["consumer_id"].startswith(f"{run}-")
            marks.append((time.monotonic(), done))
            exited = [p.returncode for p, _ in processes if p.poll() is not None]
            if exited:
                raise RuntimeError(f"a consumer exited ({exited}); see {logs}/{run}-*.log")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        row["gpu_busy"] = busy.stop()
        for process, _ in processes:
            process.send_signal(signal.SIGTERM)
        for process, log in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        counter.close()
    row["results"] = done
    quarter = [(t, n) for t, n in marks if sizes.backlog / 4 <= n <= 3 * sizes.backlog / 4]
    if "error" not in row and len(quarter) >= 2 and quarter[-1][0] > quarter[0][0]:
        (t0, n0), (t1, n1) = quarter[0], quarter[-1]
        row["images_per_s"] = (n1 - n0) / (t1 - t0)
    elif "error" not in row:
        row["error"] = f"only {done} of {sizes.backlog} results within {budget_s:.0f} s"
    return row


def bench_end_to_end(
    settings: Settings,
    sizes: Sizes,
    folder: Path,
    report: Report,
    out: Path,
    deadline: float,
) -> None:
    settings = settings.model_copy(update={"topic_partitions": sizes.partitions})
    progress(f"end to end: producing a backlog of {sizes.backlog} photos")
    photos = [render_demo_photo_jpeg(*photo_key(i)) for i in range(64)]
    settings = produce_backlog(settings, [photos[i % 64] for i in range(sizes.backlog)])
    ensure_topics(settings)
    best = 0.0
    for count in sizes.consumer_counts:
        left = deadline - time.monotonic()
        if left < 30:
            report.notes.append(f"end to end stopped before {count} consumers: budget spent")
            break
        progress(f"end to end: {count} consumer process(es), {left:.0f} s left")
        row = run_consumers(settings, sizes, folder, count, left - 10)
        report.end_to_end.append(row)
        report.write(out)
        rate = row.get("images_per_s", 0.0)
        if rate < 1.1 * best:
            report.notes.append(
                f"{count} consumers gave {rate:,.0f} images/s, less than 10% over "
                f"{best:,.0f}: the GPU (or the broker) is saturated"
            )
            break
        best = max(best, rate)


def run_device_bench(
    settings: Settings,
    *,
    out: Path,
    cpu_dry_run: bool = False,
    budget_s: float = 330.0,
    tests_junit: Path | None = None,
) -> int:
    deadline = time.monotonic() + budget_s
    sizes = DRY if cpu_dry_run else GPU
    report = Report(
        mode="CPU dry run (a check of the script, not figures)" if cpu_dry_run else "GPU"
    )
    report.machine = machine_info(sizes)
    report.tests = tests_summary(tests_junit or out / "gpu-tests.xml")
    if not cpu_dry_run and not torch.cuda.is_available():
        report.notes.append("torch sees no CUDA device: nothing measured")
        report.write(out)
        print(report.markdown())
        return 1
    report.write(out)
    progress("building (once) the pruned ResNet50 224x224 in FP32, FP16 and INT8")
    folders = pruned_resnet50_variants(
        settings.data_dir / "models" / "bench-resnet50-pruned50-224",
        precisions=("fp32", "fp16", "int8"),
    )
    bench_models(settings, sizes, folders, report, out)
    bench_decode(sizes, folders["fp32"], report, out)
    broker = None
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker(log_path=settings.data_dir / "logs" / "device-broker.log").start()
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    try:
        folder = folders["int8" if sizes.e2e[1] == "int8" else "fp16"]
        bench_end_to_end(settings, sizes, folder, report, out, deadline)
    finally:
        if broker is not None:
            broker.stop()
    report.write(out)
    print(report.markdown(), flush=True)
    return 0
