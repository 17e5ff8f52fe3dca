"""`tagstream bench --overload`: does admission hold the latency target under overload?

On the embedded stack (a broker, the Faust worker, one inference consumer, the demo image
server and the synthetic producer, every tweet with one photo), each run offers tweets at
a multiple of the pipeline's capacity for a fixed time, once with the fixed-rate
admission (``admission_mode=fixed``, its rate set by hand with headroom, at twice the
capacity) and once with the closed loop, on fresh topics each. It prints, per run:
offered, admitted and shed per second, goodput (results within the latency target per
second), p50/p99 latency of the admitted photos, the backlog in front of the consumer at
the end, and the peak RSS of each process; and draws offered, admitted and p99 latency
over time as a PNG.

On a machine of two cores the consumer is throttled (``--throttle``, default 40 images/s),
so that the producer, the broker and the Faust worker, at 10x, do not take its CPU away:
the throttle stands for a device with compute of its own, a GPU. Timings are printed,
never asserted.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from PIL import Image

from infra.broker import EmbeddedBroker, free_port
from infra.image_server import start_image_server
from infra.kafka import consumed, consumer_config
from infra.settings import Settings
from infra.topics import ensure_topics
from models.demo import ensure_demo_model
from models.plots import line_chart_png
from schemas.codec import Codec
from tagstream.up import ProcessGroup, child_env, faust_argv, tagstream_argv

FACTORS = (0.5, 1.0, 2.0, 5.0, 10.0)
PROCESSES = ("faust", "infer", "producer")
#: Seconds of offered load before the measured window (see `run_once`).
WARM_UP_S = 5.0
MODES = ("fixed", "closed_loop")


@dataclass
class Run:
    """One run: a mode, an offered multiple of capacity, and what came of it."""

    mode: str
    factor: float
    offered_rate: float  # tweets/s offered (one photo each)
    seconds: float
    produced: int = 0
    shed: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # of admitted photos' results
    good: int = 0  # results within the latency target
    completed: int = 0  # results produced during the offered period, whatever their age
    backlog: int = 0  # images waiting for the consumer at the end of the offered period
    rss_mb: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # MB per
    # process: at the start of the measured window, at its end, and the peak
    per_second: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def admitted(self) -> int:
        return self.produced - sum(self.shed.values())

    def rate(self, n: float) -> float:
        return n / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident set (VmRSS) or its peak so far (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class _RssSampler:
    """Samples every process of a group once a second: first, last and peak resident set."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for name, process in list(self.group.processes.items()):
                if process.poll() is not None:
                    continue
                rss = _rss_mb(process.pid)
                self.first.setdefault(name, rss)
                self.last[name] = rss
                self.peak[name] = max(self.peak.get(name, 0.0), _rss_mb(process.pid, "VmHWM"))


class _Outcomes:
    """Reads tweets, results and shed records of one run's topics, from their start."""

    TOPICS = {"tweets": "Tweet", "hashtags": "HashtagResult", "tweets.shed": "ShedRecord"}

    def __init__(self, settings: Settings) -> None:
        self.codec = Codec.from_settings(settings)
        self.consumer = Consumer(consumer_config(settings, "overload-bench-unused"))
        self.names = {settings.topic(t): t for t in self.TOPICS}
        self.consumer.assign(
            [
                TopicPartition(topic, p, 0)
                for topic in self.names
                for p in self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ]
        )
        self.ingested: list[float] = []  # per tweet, epoch ms
        self.shed: list[tuple[float, str]] = []  # (ingested ms, reason)
        self.results: list[tuple[float, float]] = []  # (ingested ms, produced ms)
        self._ingested_by_id: dict[str, float] = {}

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        by_id = self._ingested_by_id
        while time.monotonic() < deadline:
            for message in consumed(self.consumer, 2000, 0.2):
                short = self.names[message.topic()]
                value = self.codec.decode(self.TOPICS[short], message.value())
                if short == "tweets":
                    self.ingested.append(value["ingested_at_ms"])
                    by_id[value["id"]] = value["ingested_at_ms"]
                elif short == "tweets.shed":
                    self.shed.append(
                        (by_id.get(value["tweet_id"], value["shed_at_ms"]), value["reason"])
                    )
                elif not value["retraction"]:
                    stamps = value["timestamps"]
                    self.results.append((stamps["ingested"], stamps["produced"]))

    def close(self) -> None:
        self.consumer.close()


def _backlog(settings: Settings) -> int:
    """The latest capacity report's queue depth: images waiting for the consumer."""
    codec = Codec.from_settings(settings)
    consumer = Consumer(consumer_config(settings, "overload-bench-capacity-unused"))
    topic = settings.topic("capacity")
    consumer.assign([TopicPartition(topic, 0, 0)])
    depth = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for message in consumed(consumer, 1000, 0.2):
                depth = codec.decode("CapacityReport", message.value())["queue_depth"]
    finally:
        consumer.close()
    return depth


def run_once(
    base: Settings,
    *,
    mode: str,
    factor: float,
    capacity: float,
    seconds: float,
    image_url: str,
    log_dir: Path,
) -> Run:
    """Offer `factor` x `capacity` tweets/s for `seconds` through fresh topics and processes."""
    offered = factor * capacity
    settings = base.model_copy(
        update={
            "topic_prefix": f"ov{uuid.uuid4().hex[:8]}-",
            "admission_mode": mode,
            # Fixed: a ceiling set by hand with headroom, at twice the capacity; the closed
            # loop keeps a ceiling far above it, out of its way.
            "admission_rate": capacity * 2 if mode == "fixed" else capacity * 100,
            "admission_burst": max(2.0, capacity) if mode == "fixed" else capacity * 100,
            "faust_web_port": free_port(),
        }
    )
    ensure_topics(settings)
    run = Run(mode=mode, factor=factor, offered_rate=offered, seconds=seconds)
    group = ProcessGroup(env=child_env(settings.to_env()), log_dir=log_dir / f"{mode}-{factor:g}x")
    outcomes = _Outcomes(settings)
    try:
        group.start("faust", faust_argv(settings))
        group.start("infer", tagstream_argv("infer"))
        # Both up and the consumer's first capacity report out: then offer.
        deadline = time.monotonic() + 90
        logs = group.log_dir
        while time.monotonic() < deadline and not (
            "Worker]: Ready" in (logs / "faust.log").read_text(errors="replace")
            and "inference consumer" in (logs / "infer.log").read_text(errors="replace")
        ):
            time.sleep(0.5)
        time.sleep(2.0)
        # A warm-up before the measured window: a fresh producer on the embedded broker
        # takes a second or two to deliver its first record (the idempotent producer's
        # set-up), and the controller starts from a first estimate; neither is overload.
        count = int(offered * (WARM_UP_S + seconds))
        started = time.time() * 1000.0 + WARM_UP_S * 1000.0
        group.start(
            "producer",
            tagstream_argv(
                "produce", "synthetic", "--rate", f"{offered:g}", "--count", str(count),
                "--photos-only", "--seed", str(int(factor * 10)), "--image-base-url", image_url,
            ),
        )  # fmt: skip
        with _RssSampler(group) as rss:
            outcomes.read(WARM_UP_S)
            start_rss = dict(rss.last)
            outcomes.read(seconds)
        run.rss_mb = {
            name: (start_rss.get(name, float("nan")), rss.last[name], rss.peak[name])
            for name in rss.last
        }
        run.backlog = _backlog(settings)
        # Admitted photos still in flight either finish within the target or are late.
        outcomes.read(settings.latency_target_ms / 1000.0 + 2.0)
    finally:
        outcomes.close()
        group.stop_all()
    target = settings.latency_target_ms
    window = (started, started + seconds * 1000.0)
    run.produced = sum(window[0] <= t < window[1] for t in outcomes.ingested)
    run.shed = Counter(reason for t, reason in outcomes.shed if window[0] <= t < window[1])
    in_window = [(i, p) for i, p in outcomes.results if window[0] <= i < window[1]]
    run.latencies_ms = [p - i for i, p in in_window]
    run.good = sum(p - i <= target for i, p in in_window)
    run.completed = sum(window[0] <= p < window[1] for _, p in outcomes.results)

    def seconds_of(t: float) -> int:
        return int((t - started) // 1000)

    offered_s = Counter(seconds_of(t) for t in outcomes.ingested if window[0] <= t < window[1])
    shed_s = Counter(seconds_of(t) for t, _ in outcomes.shed if window[0] <= t < window[1])
    late: dict[int, list[float]] = {}
    for i, p in in_window:
        late.setdefault(seconds_of(i), []).append(p - i)
    steps = range(int(seconds))
    run.per_second = {
        "offered/s": [(s, offered_s[s]) for s in steps],
        "admitted/s": [(s, offered_s[s] - shed_s[s]) for s in steps],
        "p99 latency ms / 10": [
            (s, sorted(late[s])[int(0.99 * (len(late[s]) - 1))] / 10) for s in steps if late.get(s)
        ],
    }
    return run


def measure_capacity(base: Settings, *, image_url: str, log_dir: Path, seconds: float) -> float:
    """Results per second with the consumer saturated (fixed admission, a large offer)."""
    probe = run_once(
        base, mode="fixed", factor=1.0, capacity=base.infer_throttle_images_per_s * 3 or 600,
        seconds=seconds, image_url=image_url, log_dir=log_dir / "capacity",
    )  # fmt: skip
    return max(probe.completed / probe.seconds, 1.0)


def overload_bench(
    settings: Settings,
    *,
    seconds: float = 15.0,
    throttle: float = 40.0,
    factors: tuple[float, ...] = FACTORS,
    out_dir: Path | None = None,
) -> int:
    out_dir = out_dir or settings.data_dir / "bench-overload"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = settings.model_dir or ensure_demo_model(settings.data_dir)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner, image_url = asyncio.run_coroutine_threadsafe(start_image_server(), loop).result(30)
    broker = None
    try:
        if not settings.kafka_bootstrap:
            broker = EmbeddedBroker(log_path=out_dir / "broker.log").start()
            settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        base = settings.model_copy(
            update={
                "model_dir": Path(model_dir),
                "data_dir": out_dir / "data",
                "fetch_allow_hosts": ["127.0.0.1"],
                "infer_throttle_images_per_s": throttle,
                "result_cache_size": 0,  # every photo is new: measure admission alone
            }
        )
        print(f"overload bench: measuring the pipeline's capacity ({seconds:g} s)", flush=True)
        capacity = measure_capacity(base, image_url=image_url, log_dir=out_dir, seconds=seconds)
        print(f"capacity: {capacity:.1f} images/s (consumer throttle {throttle:g})", flush=True)
        runs: list[Run] = []
        for mode in MODES:
            for factor in factors:
                print(f"  {mode} at {factor:g}x for {seconds:g} s ...", flush=True)
                runs.append(
                    run_once(base, mode=mode, factor=factor, capacity=capacity,
                             seconds=seconds, image_url=image_url, log_dir=out_dir)
                )  # fmt: skip
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        if broker is not None:
            broker.stop()
    print_table(runs, capacity=capacity, target_ms=settings.latency_target_ms)
    png = plot(runs, out_dir / "overload.png")
    print(f"\nplot: {png}")
    return 0


def print_table(runs: list[Run], *, capacity: float, target_ms: float) -> None:
    print(
        f"\nlatency target {target_ms:g} ms, capacity {capacity:.1f} images/s; per second of "
        "the offered period; latency of admitted photos (tweet ingested to result produced)"
    )
    header = (
        "| mode | offered x | offered/s | admitted/s | shed/s | goodput/s | goodput/capacity "
        "| p50 ms | p99 ms | backlog at end | RSS MB start→end (peak): faust; infer; producer |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for run in runs:
        rss = "; ".join(
            f"{a:.0f}→{b:.0f} ({c:.0f})"
            for a, b, c in (run.rss_mb.get(n, (float("nan"),) * 3) for n in PROCESSES)
        )
        print(
            f"| {run.mode} | {run.factor:g} | {run.rate(run.produced):.1f} | "
            f"{run.rate(run.admitted):.1f} | {run.rate(sum(run.shed.values())):.1f} | "
            f"{run.rate(run.good):.1f} | {run.rate(run.good) / capacity:.2f} | "
            f"{run.percentile(0.5):.0f} | {run.percentile(0.99):.0f} | {run.backlog} | {rss} |"
        )


def plot(runs: list[Run], path: Path) -> Path:
    """One chart per run would be many: draw the 2x and the 10x runs (else the two largest
    factors run), of both modes."""
    factors = sorted({run.factor for run in runs})
    shown = [f for f in (2.0, 10.0) if f in factors] or factors[-2:]
    charts = []
    for run in runs:
        if run.factor not in shown:
            continue
        charts.append(
            line_chart_png(
                run.per_second,
                path.with_name(f"{path.stem}-{run.mode}-{run.factor:g}x.png"),
                title=f"{run.mode}, offered {run.factor:g}x capacity",
                x_label="seconds",
                y_label="per second (latency: ms / 10)",
            )
        )
    images = [Image.open(c) for c in charts]
    if not images:
        return path
    width = max(i.width for i in images) * 2
    rows = (len(images) + 1) // 2
    sheet = Image.new("RGB", (width, rows * images[0].height), "white")
    for n, image in enumerate(images):
        sheet.paste(image, ((n % 2) * images[0].width, (n // 2) * images[0].height))
    sheet.save(path)
    for chart in charts:
        chart.unlink()
    return path
