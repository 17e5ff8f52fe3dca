"""The whole pipeline as child processes, and the accounting of every tweet taken in.

`RunningPipeline` starts the Faust worker, inference consumers, the sink and a
(resumable) synthetic producer as the commands a user runs, on the test broker, and can
kill -9 and restart any of them. `account()` reads `tweets`, `hashtags`, `tweets.shed`
and `deadletter` and says, for every tweet taken in, what it became: each ends as a
shed record, or each of its photos as a result or a dead letter (a record that is not a
tweet as a dead letter of its own); what is missing is listed, duplicates are counted.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from infra.kafka import consumed, consumer_config
from infra.settings import Settings
from schemas.codec import Codec
from schemas.records import photos
from tagstream.up import ProcessGroup, child_env, faust_argv, tagstream_argv
from tests.helpers import settings_env


class RunningPipeline:
    """Pipeline processes on `settings`, logs under `log_dir`; a context manager."""

    def __init__(self, settings: Settings, log_dir: Path, **env: str) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.group = ProcessGroup(env=child_env(settings_env(settings, **env)), log_dir=log_dir)
        self.argv: dict[str, list[str]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.kills: Counter[str] = Counter()

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `faust`, or `tagstream ARGS` under `name` (e.g. "infer", "sink"), with
        `env` on top of the pipeline's settings (a metrics port of its own, say)."""
        if name not in self.argv:
            argv = faust_argv(self.settings) if name == "faust" else tagstream_argv(*args)
            self.argv[name] = argv
            self.env[name] = env or {}
        return self.group.start(name, self.argv[name], env=self.env[name])

    def kill(self, name: str) -> None:
        """kill -9: no flush, no commit, no goodbye."""
        process = self.group.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.kills[name] += 1

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        return self.group.start(name, self.argv[name], env=self.env[name])

    def alive(self, name: str) -> bool:
        return self.group.processes[name].poll() is None

    def exited(self) -> dict[str, int]:
        return self.group.exited()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def log_of(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.group.stop_all()

    def __enter__(self) -> RunningPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Accounting:
    """What became of every tweet taken in (everything on `tweets`)."""

    tweets_in: int = 0
    not_tweets: int = 0  # records on `tweets` that do not decode
    photos: int = 0
    results: int = 0
    shed: int = 0
    dead_letters: int = 0
    missing_tweets: list[str] = field(default_factory=list)
    missing_photos: list[str] = field(default_factory=list)
    duplicates: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return len(self.missing_tweets) + len(self.missing_photos)

    def line(self) -> str:
        dups = ", ".join(f"{k} {v}" for k, v in sorted(self.duplicates.items())) or "none"
        return (
            f"tweets in {self.tweets_in} (+{self.not_tweets} not tweets), photos {self.photos}: "
            f"results {self.results}, shed {self.shed}, dead letters {self.dead_letters}; "
            f"lost {self.lost}; duplicates: {dups}"
        )


class Ledger:
    """Reads the pipeline's topics from the start (no group) and keeps the accounting."""

    TOPICS = {
        "tweets": "Tweet",
        "hashtags": "HashtagResult",
        "tweets.shed": "ShedRecord",
        "deadletter": "DeadLetter",
    }

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec.from_settings(settings)
        self.consumer = Consumer(consumer_config(settings, "ledger-unused"))
        assignment = []
        for short in self.TOPICS:
            topic = settings.topic(short)
            partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
            assignment += [TopicPartition(topic, p, 0) for p in partitions]
        self.consumer.assign(assignment)
        self.names = {settings.topic(t): t for t in self.TOPICS}
        self.tweets: dict[str, dict] = {}
        self.tweet_at: dict[str, set[tuple[str, int, int]]] = {}
        self.garbage: set[tuple[int, int]] = set()  # (partition, offset) on `tweets`
        self.result_keys: Counter[str] = Counter()
        self.shed_ids: Counter[str] = Counter()
        self.dead_keys: Counter[str] = Counter()
        self.dead_sources: set[tuple[str, int, int]] = set()
        self.dead_stages: Counter[str] = Counter()  # dead letters by the stage that failed
        self.tweet_copies: Counter[str] = Counter()
        self.results: list[dict] = []  # without thumbnails
        self.shed: list[dict] = []

    def read(self, seconds: float = 1.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in consumed(self.consumer, 1000, 0.2):
                self._take(message)

    def _take(self, message) -> None:
        short = self.names[message.topic()]
        value = message.value()
        if short == "tweets":
            try:
                tweet = self.codec.decode("Tweet", value)
            except Exception:
                self.garbage.add((message.partition(), message.offset()))
                return
            self.tweets[tweet["id"]] = tweet
            self.tweet_at.setdefault(tweet["id"], set()).add(
                (message.topic(), message.partition(), message.offset())
            )
            self.tweet_copies[tweet["id"]] += 1
            return
        record = self.codec.decode(self.TOPICS[short], value)
        if short == "deadletter":
            self.dead_stages[record["stage"]] += 1
        if short == "hashtags":
            self.result_keys[record["media_key"]] += 1
            record.pop("thumbnail", None)
            self.results.append(record)
        elif short == "tweets.shed":
            self.shed_ids[record["tweet_id"]] += 1
            self.shed.append(record)
        elif record["media_key"]:
            self.dead_keys[record["media_key"]] += 1
        else:  # a whole record dead-lettered: where it came from says which
            where = (record["source_topic"], record["source_partition"], record["source_offset"])
            self.dead_keys[f"{where}"] += 1
            self.dead_sources.add(where)

    def accounting(self) -> Accounting:
        acc = Accounting(tweets_in=len(self.tweets), not_tweets=len(self.garbage))
        tweets_topic = self.settings.topic("tweets")
        done = self.result_keys.keys() | self.dead_keys.keys()
        for tweet_id, tweet in self.tweets.items():
            keys = [p["media_key"] for p in photos(tweet)]
            acc.photos += len(keys)
            if self.shed_ids[tweet_id] or self.tweet_at[tweet_id] & self.dead_sources:
                continue
            acc.missing_photos += [k for k in keys if k not in done]
            if not keys:
                acc.missing_tweets.append(tweet_id)
        acc.missing_tweets += [
            f"{tweets_topic}[{p}]@{o}"
            for p, o in sorted(self.garbage)
            if (tweets_topic, p, o) not in self.dead_sources
        ]
        acc.results = sum(self.result_keys.values())
        acc.shed = sum(self.shed_ids.values())
        acc.dead_letters = sum(self.dead_keys.values())
        acc.duplicates = Counter(
            {
                "tweets": sum(n - 1 for n in self.tweet_copies.values()),
                "results": sum(n - 1 for n in self.result_keys.values()),
                "shed": sum(n - 1 for n in self.shed_ids.values()),
                "dead letters": sum(n - 1 for n in self.dead_keys.values()),
            }
        )
        acc.duplicates = +acc.duplicates  # drop zeros
        return acc

    def settle(
        self, *, want_tweets: int, timeout_s: float, quiet_s: float = 3.0, check=None
    ) -> Accounting:
        """Read until `want_tweets` are in and none is missing (then `quiet_s` more, for
        late duplicates), or until `timeout_s`; `check()` runs between reads."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.read(1.0)
            if check is not None:
                check()
            acc = self.accounting()
            if acc.tweets_in >= want_tweets and acc.lost == 0:
                self.read(quiet_s)
                return self.accounting()
        return self.accounting()

    def close(self) -> None:
        self.consumer.close()
