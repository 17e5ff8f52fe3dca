"""Helpers shared by the integration tests: child-process settings, topic readers, loops."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable

from infra.kafka import consumed
from infra.settings import Settings


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The TAGSTREAM_ variables that make a child process see `settings`."""
    return settings.to_env(**extra)


class KafkaReader:
    """Reads and decodes whole topics (from the beginning) with a fresh consumer group."""

    def __init__(self, settings: Settings, topics: dict[str, str]) -> None:
        from confluent_kafka import Consumer

        from infra.kafka import consumer_config
        from schemas.codec import Codec

        self.codec = Codec.from_settings(settings)
        self.records = {topic: record for topic, record in topics.items()}
        self.found: dict[str, list[dict]] = {topic: [] for topic in topics}
        self.consumer = Consumer(consumer_config(settings, f"reader-{uuid.uuid4().hex[:8]}"))
        self.consumer.subscribe([settings.topic(t) for t in topics])
        self.names = {settings.topic(t): t for t in topics}

    def read_until(
        self, done: Callable[[dict[str, list[dict]]], bool], *, timeout_s: float
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not done(self.found):
            for message in consumed(self.consumer, 500, 0.5):
                short = self.names[message.topic()]
                value = self.codec.decode(self.records[short], message.value())
                value["_key"] = message.key()
                value["_partition"], value["_offset"] = message.partition(), message.offset()
                self.found[short].append(value)
        return self.found

    def close(self) -> None:
        self.consumer.close()


class BackgroundLoop:
    """An asyncio loop in a thread, for the aiohttp servers the tests start."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def run_cli(monkeypatch, env: dict[str, str], *argv: str) -> int:
    """`tagstream ARGV` in this process, with `env` set and the settings read afresh."""
    from infra.settings import get_settings
    from tagstream.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        return main(list(argv))
    finally:
        get_settings.cache_clear()


async def serve_locally(app, *, port: int | None = None, **runner_options):
    """Start aiohttp `app` on 127.0.0.1 (a free port unless given): (runner, base url)."""
    from aiohttp import web

    from infra.broker import free_port

    runner = web.AppRunner(app, handle_signals=False, **runner_options)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


class Sleeps:
    """A no-op sleep that records the delays asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class RecordingProducer:
    """A stand-in for RecordProducer in unit tests: encodes each record (so a value that
    does not fit its schema fails here too) and keeps what would have been produced."""

    def __init__(self) -> None:
        from infra.settings import Settings
        from infra.topics import TOPIC_RECORDS
        from schemas.codec import Codec

        self.codec = Codec()
        self.records = TOPIC_RECORDS
        self.settings = Settings()
        self.sent: list[tuple[str, str | bytes | None, dict]] = []
        self.flushed = 0

    def send(self, topic: str, value: dict, *, key: str | bytes | None, on_delivery=None) -> None:
        record = self.records[topic]
        self.sent.append((topic, key, self.codec.decode(record, self.codec.encode(record, value))))
        if on_delivery is not None:
            on_delivery(None)

    def dead_letter(self, source, stage: str, error: BaseException, *, on_delivery=None, **ids):
        from infra.record_producer import RecordProducer

        letter = RecordProducer.dead_letter_outgoing(source, stage, error, **ids)
        self.send("deadletter", letter.value, key=letter.key, on_delivery=on_delivery)

    async def deliver(self, outgoing) -> None:
        for o in outgoing:
            self.send(o.topic, dict(o.value), key=o.key)

    def of(self, topic: str) -> list[dict]:
        return [value for t, _, value in self.sent if t == topic]

    def poll(self, timeout_s: float = 0.0) -> int:
        return 0

    def raise_if_failed(self) -> None:
        pass

    def flush(self, timeout_s: float = 30.0) -> None:
        self.flushed += 1

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)


def doc_snippets(path) -> dict[str, dict]:
    """Each ```python block of a Markdown file, run, by the first name it defines."""
    import re

    text = path.read_text(encoding="utf-8")
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        namespace: dict = {}
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - our own docs
        name = re.search(r"^(?:def|class) (\w+)", block, flags=re.M)
        assert name, f"{path}: a python block defines nothing to test:\n{block}"
        found[name.group(1)] = namespace
    return found


class MetricDeltas:
    """How the process's Prometheus samples (infra/metrics.py) moved since this was made:
    metrics are process-wide, so tests compare before and after their own work."""

    def __init__(self) -> None:
        self.before = self.read()

    @staticmethod
    def read() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        # Every metric, exposed by this process or not.
        from infra.metrics import ALL

        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in ALL
            for family in metric.collect()
            for sample in family.samples
        }

    def now(self, name: str, **labels: str) -> float:
        """The sample's value now (0 when it does not exist)."""
        return self.read().get((name, tuple(sorted(labels.items()))), 0.0)

    def delta(self, name: str, **labels: str) -> float:
        """How much one sample (a name with exactly these labels) grew."""
        key = (name, tuple(sorted(labels.items())))
        return self.read().get(key, 0.0) - self.before.get(key, 0.0)

    def delta_sum(self, name: str, **labels: str) -> float:
        """How much the samples of `name` whose labels include `labels` grew, together."""
        want = set(labels.items())

        def total(samples: dict) -> float:
            return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))

        return total(self.read()) - total(self.before)
