"""`tagstream evaluate`: replay an archive or a topic range through the pipeline, once per
model, and write one report with the models side by side.

For each model in turn (sequential runs: on two cores, models run side by side would
slow each other down), on fresh topics of their own (a new topic prefix on the embedded
broker, or on the cluster of TAGSTREAM_KAFKA_BOOTSTRAP):

1. start the Faust worker and an inference consumer on that model, as `tagstream up`
   starts them (tagstream/up.py: `ProcessGroup`), and warm them up: a tweet without a
   photo must come back shed and a photo must come back classified, so that the replay
   is timed on a running pipeline, not on its start;
2. replay the input under the run's own id (producers/replay.py: `ReplaySource`,
   pumped by producers/source.py: `pump`), at the speed asked for, through the producer
   the warm-up used: a fresh idempotent producer took up to a second to deliver its
   first record on the embedded broker (measured), which would otherwise be counted in
   the ingest time of every tweet sent meanwhile;
3. collect the run's outcomes from `hashtags`, `tweets.shed` and `deadletter` (only
   records of this run: results and shed records by their ``replay_run_id``, dead
   letters by the run's tweet ids and media keys, and the replay's own for input lines
   that are no tweet) with a progress bar, until every tweet is accounted for or nothing
   new has come for `wait_s` seconds (the bounded wait for stragglers);
4. stop the processes and delete the run's topics (on a cluster).

The truth comes from a labels file or the tweets' matching rules; the numbers from
models/evaluation.py; the report from models/evaluation_report.py.

By default the runs shed nothing for load (fixed admission, a ceiling no replay
reaches, no result cache), so that every photo is classified and a replay at ``max`` of
a fixed archive gives the same accuracy table every time; ``admission="configured"``
evaluates the pipeline as configured instead (shed photos are counted, and accuracy is
over what was classified).

Delivery: read-only on the input (an archive, or a topic read by `assign()` without a
group). The collector reads the run's topics from their start without a group and
commits nothing; it sees what the pipeline delivered at least once, and counts repeats
as duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from PIL import Image
from tqdm import tqdm

from infra.broker import EmbeddedBroker, free_port
from infra.exceptions import CodecError, ConfigurationError, EvaluationError
from infra.kafka import client_config, consumed, consumer_config, wait_for_broker
from infra.record_producer import RecordProducer
from infra.settings import Settings
from infra.topics import ensure_topics
from models.evaluation import (
    Labels,
    Truth,
    account,
    accuracy,
    busy_rate,
    latency,
    throughput,
    truth_from_rules,
)
from models.evaluation_report import Evaluation, ModelRun, write_report
from models.manifest import Manifest
from producers.archive import archive_files
from producers.replay import Bound, ReplaySource, parse_speed
from producers.source import pump
from schemas.codec import Codec
from schemas.records import Tweet, image_event, media, now_ms, photos, tweet
from tagstream.up import ProcessGroup, child_env, faust_argv, tagstream_argv

log = logging.getLogger(__name__)

#: How an evaluation admits: "none" sheds nothing for load; "configured" as the settings say.
ADMISSION_KINDS = ("none", "configured")

#: Settings that shape a run, shown in the report (never secrets or addresses).
REPORTED_SETTINGS = (
    "topic_partitions",
    "session_timeout_ms",
    "fetch_wait_max_ms",
    "latency_target_ms",
    "admission_mode",
    "admission_rate",
    "admission_burst",
    "admission_fallback_rate",
    "admission_queue_share",
    "admission_drain_s",
    "result_cache_size",
    "fetch_concurrency",
    "fetch_per_host",
    "fetch_connect_timeout_s",
    "fetch_read_timeout_s",
    "fetch_max_bytes",
    "fetch_retries",
    "agent_max_in_flight",
    "batch_max_size",
    "batch_max_wait_ms",
    "decode_workers",
    "ort_provider",
    "ort_intra_op_threads",
    "thumbnail_px",
    "infer_throttle_images_per_s",
)


# The input -----------------------------------------------------------------------------


@dataclass
class ReplayInput:
    """What is replayed: an archive or a topic range, and the tweets it holds."""

    archive: Path | None
    topic: str | None
    start: Bound | None
    stop: Bound | None
    tweets: list[Tweet] = field(default_factory=list)
    not_tweets: int = 0
    files_sha256: str | None = None

    @property
    def source(self) -> str:
        """Where the replay's own dead letters say they came from."""
        return f"archive:{self.archive}" if self.archive is not None else str(self.topic)

    def tweets_sha256(self) -> str:
        """A hash of the tweets as replayed, without what each replay stamps anew."""
        digest = hashlib.sha256()
        for t in self.tweets:
            kept = {k: v for k, v in t.items() if k not in ("ingested_at_ms", "replay_run_id")}
            digest.update(json.dumps(kept, sort_keys=True, default=str).encode() + b"\n")
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "archive" if self.archive is not None else "topic",
            "where": str(self.archive if self.archive is not None else self.topic),
            "tweets": len(self.tweets),
            "not_tweets": self.not_tweets,
            "tweets_sha256": self.tweets_sha256(),
        }
        if self.files_sha256 is not None:
            out["sha256"] = self.files_sha256
        for name, bound in (("from", self.start), ("to", self.stop)):
            if bound is not None:
                out[name] = bound.isoformat() if isinstance(bound, datetime) else bound
        return out


def _files_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in archive_files(path):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def scan_input(
    settings: Settings,
    *,
    archive: Path | None = None,
    topic: str | None = None,
    start: Bound | None = None,
    stop: Bound | None = None,
) -> ReplayInput:
    """Read the input once, as the replay will, without producing: its tweets (for the
    accounting and the truth) and the lines that are no tweet."""
    if (archive is None) == (topic is None):
        raise ConfigurationError("evaluate needs exactly one of --archive and --topic")
    found = ReplayInput(archive, topic, start, stop)
    if archive is not None:
        if not Path(archive).exists():
            raise ConfigurationError(f"no archive at {archive}")
        if not archive_files(Path(archive)):
            raise ConfigurationError(f"archive folder {archive} holds no archive file")
        found.files_sha256 = _files_sha256(Path(archive))
    source = ReplaySource(settings, archive=archive, topic=topic, start=start, stop=stop)

    async def read() -> None:
        async for item in source.items():
            if item.tweet is not None:
                found.tweets.append(item.tweet)
            elif item.rejected is not None:
                found.not_tweets += 1

    asyncio.run(read())
    if not found.tweets:
        raise ConfigurationError(f"nothing to evaluate: {found.describe()['where']} holds no tweet")
    return found


# The collector -------------------------------------------------------------------------


@dataclass
class RunRecords:
    """What one run delivered: its tweets read back, results, shed records, dead letters."""

    tweets: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    shed: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)


class Collector:
    """Reads a run's topics from their start, in a thread, without a consumer group, and
    keeps the records by ``replay_run_id`` (dead letters, which carry none, all)."""

    TOPICS = {
        "tweets": "Tweet",
        "hashtags": "HashtagResult",
        "tweets.shed": "ShedRecord",
        "deadletter": "DeadLetter",
    }

    def __init__(self, settings: Settings) -> None:
        self.codec = Codec.from_settings(settings)
        self.names = {settings.topic(short): short for short in self.TOPICS}
        self.consumer = Consumer(consumer_config(settings, f"tagstream-evaluate-{uuid.uuid4()}"))
        assignment = []
        for full in self.names:
            info = self.consumer.list_topics(full, timeout=10).topics[full]
            assignment += [TopicPartition(full, p, OFFSET_BEGINNING) for p in info.partitions]
        self.consumer.assign(assignment)
        self._lock = threading.Lock()
        self._runs: dict[str | None, RunRecords] = {}
        self._dead: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluate-collector", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> Collector:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for message in consumed(self.consumer, 500, 0.2):
                    self._take(message)
        except BaseException as e:  # surfaced to the caller by `records`
            self._error = e

    def _take(self, message: Any) -> None:
        short = self.names[message.topic()]
        try:
            record = self.codec.decode(self.TOPICS[short], message.value())
        except CodecError:  # not a record a run of ours wrote
            return
        record.pop("thumbnail", None)
        record.pop("payload", None)
        with self._lock:
            if short == "deadletter":
                self._dead.append(record)
                return
            run = self._runs.setdefault(record.get("replay_run_id"), RunRecords())
            {"tweets": run.tweets, "hashtags": run.results, "tweets.shed": run.shed}[short].append(
                record
            )

    def records(self, run_id: str, *, dead_letter_of: Callable[[dict], bool]) -> RunRecords:
        """A copy of what run `run_id` delivered so far; dead letters those that
        `dead_letter_of` attributes to it."""
        if self._error is not None:
            raise EvaluationError(f"reading the run's topics failed: {self._error}")
        with self._lock:
            run = self._runs.get(run_id, RunRecords())
            return RunRecords(
                list(run.tweets),
                list(run.results),
                list(run.shed),
                [d for d in self._dead if dead_letter_of(d)],
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


# Running one model ---------------------------------------------------------------------


def _warmup_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _log_tail(group: ProcessGroup, name: str, lines: int = 5) -> str:
    if group.log_dir is None:
        return ""
    path = group.log_dir / f"{name}.log"
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return "; last lines: " + " / ".join(line.strip() for line in tail)


def _check_alive(group: ProcessGroup) -> None:
    exited = group.exited()
    if exited:
        name, code = next(iter(exited.items()))
        raise EvaluationError(
            f"the {name} process exited (code {code}) during the evaluation; its log is "
            f"{group.log_dir}/{name}.log" + _log_tail(group, name)
        )


def _warm_up(
    producer: RecordProducer,
    collector: Collector,
    group: ProcessGroup,
    run_id: str,
    timeout_s: float,
) -> None:
    """Send a tweet without a photo (the Faust agent sheds it) and a photo straight to
    `images` (an inference consumer classifies it), and wait for both: the pipeline is
    then consuming, with its groups joined."""
    warm = f"{run_id}-warmup"
    post = tweet(id=warm, text="", source="evaluate", ingested_at_ms=now_ms(), replay_run_id=warm)
    photo = media(media_key=warm, type="photo", url=f"warmup://{warm}")
    event = image_event(
        tweet=post,
        photo=photo,
        position=0,
        content_type="image/jpeg",
        image=_warmup_jpeg(),
        timestamps={"ingested": now_ms()},
    )
    producer.send("tweets", post, key=warm)
    producer.send("images", event, key=warm)
    producer.flush()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(group)
        got = collector.records(warm, dead_letter_of=lambda d: d.get("media_key") == warm)
        if got.shed and (got.results or got.dead_letters):
            return
        time.sleep(0.2)
    raise EvaluationError(
        f"the pipeline did not answer a warm-up tweet and photo within {timeout_s:g} s; "
        f"see the logs in {group.log_dir}"
    )


def _delete_topics(settings: Settings, prefix: str) -> None:
    """Delete the run's topics (ours and the Faust app's own), best effort."""
    try:
        admin = AdminClient(client_config(settings))
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
        for name, future in admin.delete_topics(names, operation_timeout=10).items():
            try:
                future.result(10)
            except Exception as e:  # left behind: say so, the report is still right
                log.warning("could not delete topic %s: %s", name, e)
    except Exception as e:
        log.warning("could not delete the topics of prefix %s: %s", prefix, e)


@dataclass
class Plan:
    """Everything one evaluation needs, checked before anything starts."""

    settings: Settings
    source: ReplayInput
    speed: str
    folders: list[Path]
    manifests: list[Manifest]
    labels: Labels | None
    admission: str
    wait_s: float
    out: Path
    demo_images: bool
    progress: bool
    start_timeout_s: float
    evaluation_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    delete_topics: bool = False

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(c for m in self.manifests for c in m.classes))

    def truth_of(self, post: dict, photo: dict) -> Truth | None:
        if self.labels is not None:
            return self.labels.truth(post["id"], photo["media_key"])
        return truth_from_rules(post, self.classes)

    def run_settings(self, n: int, folder: Path) -> Settings:
        update: dict[str, Any] = {
            "topic_prefix": f"{self.settings.topic_prefix}eval-{self.evaluation_id}-m{n}-",
            "model_dir": folder.resolve(),
            "data_dir": (self.out / ".work").resolve(),
            "faust_web_port": free_port(),
            "consumer_id": f"evaluate-m{n}",
        }
        if self.admission == "none":
            update |= {
                "admission_mode": "fixed",
                "admission_rate": 1e9,
                "admission_burst": 1e9,
                "result_cache_size": 0,
            }
        if self.demo_images:
            host = self.settings.image_server_host
            update["fetch_allow_hosts"] = sorted({*self.settings.fetch_allow_hosts, host})
        return self.settings.model_copy(update=update)


def _expected_units(tweets: Sequence[Tweet]) -> int:
    return sum(max(1, len(photos(t))) if t.get("operation") != "delete" else 1 for t in tweets)


def run_model(plan: Plan, n: int, folder: Path, manifest: Manifest) -> ModelRun:
    """One model's pass over the replay: start, warm up, replay, collect, stop."""
    settings = plan.run_settings(n, folder)
    ensure_topics(settings)
    run_id = f"{plan.evaluation_id}-m{n}"
    ids = {t["id"] for t in plan.source.tweets}
    keys = {p["media_key"] for t in plan.source.tweets for p in photos(t)}
    replay_source = plan.source.source

    def dead_letter_of(letter: dict) -> bool:
        if letter.get("media_key") or letter.get("tweet_id"):
            return letter.get("media_key") in keys or letter.get("tweet_id") in ids
        return letter["stage"] == "replay" and letter["source_topic"] == replay_source

    group = ProcessGroup(env=child_env(settings.to_env()), log_dir=plan.out / "logs" / f"m{n}")
    collector = Collector(settings).start()
    producer = RecordProducer(settings)
    counts: dict[str, int] = {}
    waited = 0.0
    try:
        group.start("faust", faust_argv(settings))
        group.start("infer", tagstream_argv("infer", "--model-dir", str(folder.resolve())))
        _warm_up(producer, collector, group, run_id, plan.start_timeout_s)
        source = ReplaySource(
            settings,
            archive=plan.source.archive,
            topic=plan.source.topic,
            start=plan.source.start,
            stop=plan.source.stop,
            speed=plan.speed,
            run_id=run_id,
        )
        failure: list[BaseException] = []

        def run_replay() -> None:
            try:
                counts.update(asyncio.run(pump(source, producer)))
            except BaseException as e:  # raised again in the caller's thread
                failure.append(e)

        replaying = threading.Thread(target=run_replay, name="evaluate-replay", daemon=True)
        replaying.start()
        total = _expected_units(plan.source.tweets)
        with tqdm(
            total=total,
            desc=f"m{n} {manifest.name}",
            unit="outcome",
            disable=not plan.progress,
            leave=True,
        ) as bar:
            done_at: float | None = None
            last, last_change = -1, time.monotonic()
            while True:
                time.sleep(0.5)
                _check_alive(group)
                if failure:
                    raise failure[0]
                got = collector.records(run_id, dead_letter_of=dead_letter_of)
                acc = account(
                    plan.source.tweets,
                    tweets=got.tweets,
                    results=got.results,
                    shed=got.shed,
                    dead_letters=got.dead_letters,
                )
                progress = total - acc.missing
                bar.update(progress - bar.n)
                now = time.monotonic()
                if progress != last:
                    last, last_change = progress, now
                if replaying.is_alive():
                    continue
                if done_at is None:
                    done_at = now
                    last_change = now
                if acc.missing == 0:
                    time.sleep(0.5)  # a repeat delivered late would come now
                    break
                if now - last_change > plan.wait_s:
                    log.warning(
                        "m%d: %d outcomes still missing after %g s without a new one",
                        n,
                        acc.missing,
                        plan.wait_s,
                    )
                    break
            waited = time.monotonic() - done_at
        _check_alive(group)
        got = collector.records(run_id, dead_letter_of=dead_letter_of)
    finally:
        group.stop_all()
        collector.stop()
        producer.close()
        if plan.delete_topics:
            _delete_topics(settings, settings.topic_prefix)

    acc = account(
        plan.source.tweets,
        tweets=got.tweets,
        results=got.results,
        shed=got.shed,
        dead_letters=got.dead_letters,
        not_tweets=plan.source.not_tweets,
        truth_of=plan.truth_of,
    )
    kept = [o.result for o in acc.outcomes if o.result is not None]
    width, points = throughput(kept, start_ms=_first_ingest(got.tweets, kept))
    images, rate = busy_rate(kept)
    return ModelRun(
        folder=folder,
        manifest=manifest,
        size_bytes=manifest.model_path(folder).stat().st_size,
        run_id=run_id,
        accounting=acc,
        table=accuracy(
            acc.outcomes, classes=manifest.classes, no_hashtag=manifest.no_hashtag_classes
        ),
        latencies=latency(kept),
        throughput_width_s=width,
        throughput=points,
        busy_images=images,
        busy_rate=rate,
        replay_counts=dict(counts),
        waited_s=waited,
    )


def _first_ingest(tweets: Sequence[dict], results: Sequence[dict]) -> float | None:
    times = [t["ingested_at_ms"] for t in tweets] or [
        r["timestamps"]["ingested"] for r in results if "ingested" in r["timestamps"]
    ]
    return min(times) if times else None


# The evaluation ------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("tagstream")
    except metadata.PackageNotFoundError:
        return "unknown"


class _DemoImages:
    """The demo image server as a child process, where demo archives point."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.host, self.port = settings.image_server_host, settings.image_server_port
        self.group = ProcessGroup(env=child_env({}), log_dir=log_dir)

    def start(self, timeout_s: float = 30.0) -> None:
        self.group.start(
            "images", tagstream_argv("serve-images", "--host", self.host, "--port", str(self.port))
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.group.exited():
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.group.stop_all()
        raise EvaluationError(
            f"the demo image server did not start on {self.host}:{self.port} (is the port "
            "taken? TAGSTREAM_IMAGE_SERVER_PORT moves it)" + _log_tail(self.group, "images")
        )

    def warm(self, urls: Sequence[str]) -> None:
        """Fetch each demo photo of the input once: the server renders a photo on its
        first request, so the first model would otherwise meet a slower host than the
        others."""
        base = f"http://{self.host}:{self.port}/img/"
        wanted = sorted({u for u in urls if u.startswith(base)})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback

        def get(url: str) -> None:
            try:
                with opener.open(url, timeout=10) as response:
                    response.read()
            except OSError as e:  # the runs will meet the same failure, and count it
                log.debug("warming %s: %s", url, e)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(get, wanted))

    def stop(self) -> None:
        self.group.stop_all()


def plan_evaluation(
    settings: Settings,
    *,
    archive: Path | None = None,
    topic: str | None = None,
    start: Bound | None = None,
    stop: Bound | None = None,
    speed: str = "max",
    labels: Path | None = None,
    model_dirs: Sequence[Path] = (),
    out: Path,
    admission: str = "none",
    wait_s: float = 60.0,
    demo_images: bool = False,
    progress: bool = True,
    start_timeout_s: float = 180.0,
) -> Plan:
    """Check everything an evaluation needs, before anything starts: the speed, the input
    (read once), the models' manifests, the labels (which must name something of the
    replay). Raises a TagstreamError that says what is wrong."""
    parse_speed(speed)
    if admission not in ADMISSION_KINDS:
        raise ConfigurationError(f"admission must be one of {', '.join(ADMISSION_KINDS)}")
    if wait_s <= 0:
        raise ConfigurationError("the wait for the last outcomes must be positive")
    if topic is not None and not settings.kafka_bootstrap:
        raise ConfigurationError(
            "--topic reads a topic of a cluster: set TAGSTREAM_KAFKA_BOOTSTRAP to it"
        )
    if archive is not None and not Path(archive).exists():
        raise ConfigurationError(f"no archive at {archive}")
    folders = [Path(d) for d in model_dirs]
    manifests = [Manifest.load(folder) for folder in folders]  # ModelError: no manifest
    label_set = Labels.load(Path(labels)) if labels is not None else None
    if not folders:
        folder = settings.model_dir
        if folder is None:
            # Only without a model folder: the demo model is trained with torch.
            from models.demo import ensure_demo_model

            folder = ensure_demo_model(settings.data_dir, progress=progress)
        folders, manifests = [Path(folder)], [Manifest.load(Path(folder))]
    if topic is not None:
        wait_for_broker(settings)
    source = scan_input(settings, archive=archive, topic=topic, start=start, stop=stop)
    if label_set is not None and not label_set.names_any_of(source.tweets):
        first = next(iter(label_set.by_media_key or label_set.by_tweet_id))
        raise ConfigurationError(
            f"labels file {label_set.path}: none of its {len(label_set)} labels names a "
            f"tweet or photo of the replay (it labels {first!r}, the replay's first tweet "
            f"is {source.tweets[0]['id']!r})"
        )
    return Plan(
        settings=settings,
        source=source,
        speed=speed,
        folders=folders,
        manifests=manifests,
        labels=label_set,
        admission=admission,
        wait_s=wait_s,
        out=Path(out),
        demo_images=demo_images,
        progress=progress,
        start_timeout_s=start_timeout_s,
    )


def _admission_words(plan: Plan, settings: Settings) -> str:
    if plan.admission == "none":
        return (
            "none: nothing shed for load (fixed admission with a ceiling of "
            f"{settings.admission_rate:g} tweets/s, no result cache), every photo classified"
        )
    if settings.admission_mode == "fixed":
        return f"as configured: fixed, {settings.admission_rate:g} tweets/s"
    return (
        f"as configured: closed loop on a {settings.latency_target_ms:g} ms latency target "
        f"(ceiling {settings.admission_rate:g} tweets/s, result cache "
        f"{settings.result_cache_size} entries)"
    )


def run_evaluation(plan: Plan) -> tuple[Evaluation, dict[str, Path]]:
    """Run a checked `Plan`: the broker if none is given, the demo images if asked, each
    model in turn; then write the report into ``plan.out``."""
    plan.out.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    images: _DemoImages | None = None
    settings = plan.settings
    try:
        if not settings.kafka_bootstrap:
            broker = EmbeddedBroker(log_path=plan.out / "logs" / "broker.log").start()
            settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
            plan.settings = settings
        else:
            wait_for_broker(settings)
            plan.delete_topics = True  # a cluster outlives the evaluation: leave it clean
        if plan.demo_images:
            images = _DemoImages(settings, plan.out / "logs")
            images.start()
            images.warm([p["url"] for t in plan.source.tweets for p in photos(t)])
        runs = []
        for n, (folder, manifest) in enumerate(
            zip(plan.folders, plan.manifests, strict=True), start=1
        ):
            run = run_model(plan, n, folder, manifest)
            a = run.accounting
            print(
                f"m{n} {manifest.name}: {a.tweets_in} tweets, {a.photos} photos: "
                f"{a.results} results, {sum(a.shed_tweets.values())} tweets shed, "
                f"{sum(a.dead_letters.values())} dead letters, {a.missing} missing; "
                f"top-1 {run.table.top1:.4f} on {run.table.photos} photos",
                flush=True,
            )
            runs.append(run)
    finally:
        if images is not None:
            images.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(plan.out / ".work", ignore_errors=True)

    reported = plan.run_settings(1, plan.folders[0])
    evaluation = Evaluation(
        version=_version(),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        input=plan.source.describe(),
        speed=plan.speed,
        truth=(
            plan.labels.describe()
            if plan.labels is not None
            else "the tweets' matching rules (the tags of the rules that name a class)"
        ),
        truth_kind="labels" if plan.labels is not None else "rules",
        admission=_admission_words(plan, reported),
        admission_kind=plan.admission,
        broker="embedded tansu" if broker is not None else f"cluster at {settings.bootstrap()}",
        settings={k: getattr(reported, k) for k in REPORTED_SETTINGS}
        | {"codec": "schema registry" if reported.schema_registry_url else "single-object"},
        runs=runs,
        wait_s=plan.wait_s,
    )
    return evaluation, write_report(evaluation, plan.out)
