"""Shared fixtures: the real embedded broker, per-module topics, the demo model, helpers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra.broker import EmbeddedBroker, free_port
from infra.settings import Settings
from tests.helpers import BackgroundLoop
from tests.registry import FakeSchemaRegistry

REPO = Path(__file__).resolve().parents[1]
#: The demo model is cached here, shared with `make demo` (trained once per clone).
DATA_DIR = REPO / ".tagstream"


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers of a broker: TAGSTREAM_KAFKA_BOOTSTRAP if set, else our embedded tansu."""
    existing = Settings().kafka_bootstrap
    if existing:
        yield existing
        return
    with EmbeddedBroker(log_path=DATA_DIR / "logs" / "test-broker.log") as embedded:
        yield embedded.bootstrap


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from models.demo import ensure_demo_model

    return ensure_demo_model(DATA_DIR, progress=False)


@pytest.fixture
def make_settings(broker: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the test broker with a fresh topic prefix (so fresh topics and groups)."""
    from infra.topics import ensure_topics

    def make(**overrides) -> Settings:
        values = {
            "kafka_bootstrap": broker,
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}-",
            "data_dir": tmp_path / "data",
            "session_timeout_ms": 6000,
            "topic_partitions": 2,
        } | overrides
        settings = Settings(**values)
        ensure_topics(settings)
        return settings

    return make


@pytest.fixture
def schema_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSchemaRegistry]:
    """A local Confluent schema registry (tests/registry.py); ``.url`` is its address."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the fake is local: never through a proxy
    fake = FakeSchemaRegistry().start()
    yield fake
    fake.close()


@pytest.fixture
def image_server() -> Iterator[str]:
    """The demo image server on a free loopback port; yields its base URL."""
    from infra.image_server import start_image_server

    background = BackgroundLoop()
    runner, url = background.run(start_image_server("127.0.0.1", free_port()))
    yield url
    background.run(runner.cleanup())
    background.close()
