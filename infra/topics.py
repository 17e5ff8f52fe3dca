"""Topic specifications (docs/architecture.md: topics) and their creation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

from infra.exceptions import BrokerError
from infra.kafka import MAX_MESSAGE_BYTES, client_config
from infra.settings import TOPIC_NAMES, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    record: str
    partitions: int
    config: dict[str, str]


#: record carried by each topic
TOPIC_RECORDS = {
    "tweets": "Tweet",
    "images": "ImageEvent",
    "hashtags": "HashtagResult",
    "tweets.shed": "ShedRecord",
    "deadletter": "DeadLetter",
    "capacity": "CapacityReport",
}


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics with the partition counts settings ask for (capacity and deadletter: 1)."""
    specs = []
    for name in TOPIC_NAMES:
        partitions = 1 if name in ("capacity", "deadletter") else settings.topic_partitions
        config = {"cleanup.policy": "compact"} if name == "capacity" else {}
        if name in ("images", "hashtags", "deadletter"):
            # Photos, thumbnails and dead letters with their bytes: what our producers
            # allow, so that a cluster's 1 MB default never refuses a photo.
            config["max.message.bytes"] = str(MAX_MESSAGE_BYTES)
        specs.append(TopicSpec(settings.topic(name), TOPIC_RECORDS[name], partitions, config))
    return specs


def ensure_topics(settings: Settings, *, timeout_s: float = 10.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""

    admin = AdminClient(client_config(settings))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [spec for spec in topic_specs(settings) if spec.name not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, 1, config=s.config) for s in wanted],
        operation_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" in str(exc):
                continue
            raise BrokerError(f"could not create topic {name}: {exc}") from exc
    log.info("created topics %s", ", ".join(created))
    return created
