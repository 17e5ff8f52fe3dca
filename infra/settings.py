"""The one settings object of tagstream.

Every process reads its configuration here, once, from the environment (prefix
``TAGSTREAM_``) or a ``.env`` file; nothing else in the code base reads
``os.environ``. Validators fail fast on values that cannot work.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.exceptions import ConfigurationError

#: Topic names (docs/architecture.md), before the optional prefix.
TOPIC_NAMES = ("tweets", "images", "hashtags", "tweets.shed", "deadletter", "capacity")


class Settings(BaseSettings):
    """Configuration shared by the producers, the Faust worker, inference and the sink."""

    model_config = SettingsConfigDict(
        env_prefix="TAGSTREAM_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    # Kafka ------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="host:port list of an existing cluster; unset starts the embedded broker"
    )
    schema_registry_url: str | None = Field(
        None, description="Confluent schema registry; unset uses Avro single-object encoding"
    )
    topic_prefix: str = Field("", description="prepended to every topic name (tests, tenants)")
    topic_partitions: int = Field(4, ge=1, description="partitions of topics we create")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="consumer group session timeout; tansu waits half on first join"
    )
    fetch_wait_max_ms: int = Field(
        10,
        ge=0,
        description="consumer fetch.wait.max.ms; tansu holds every fetch this long, so keep it low",
    )
    broker_wait_s: float = Field(
        60.0, ge=0, description="how long a process waits for Kafka at start before it stops"
    )
    kafka_extra: dict[str, str] = Field(
        default_factory=dict, description="extra librdkafka settings (security.protocol, sasl.*)"
    )

    # Paths -------------------------------------------------------------------
    data_dir: Path = Field(Path(".tagstream"), description="caches, models and sink output")
    model_dir: Path | None = Field(
        None, description="folder with manifest.json; unset uses the cached demo model"
    )

    # Shedding and fetch --------------------------------------------------------
    latency_target_ms: float = Field(
        2000.0, gt=0, description="what admitted photos should take from tweet to hashtag"
    )
    admission_mode: Literal["closed_loop", "fixed"] = Field(
        "closed_loop",
        description="closed_loop: admit what the inference consumers can finish within the "
        "latency target (processors/admission.py); fixed: admission_rate alone",
    )
    admission_rate: float = Field(
        1000.0, gt=0, description="tweets/s admitted at most (the ceiling; all of it in fixed mode)"
    )
    admission_burst: float = Field(2000.0, ge=1, description="token bucket of the ceiling")
    admission_fallback_rate: float = Field(
        5.0, gt=0, description="images/s admitted while no inference consumer reports capacity"
    )
    admission_queue_share: float = Field(
        0.25, gt=0, lt=1, description="share of the latency target left for queueing"
    )
    admission_drain_s: float = Field(
        2.0, gt=0, description="time in which the controller drains a backlog above its aim"
    )
    result_cache_size: int = Field(
        20_000, ge=0, description="results kept to answer repeated photos (0: no cache)"
    )
    result_cache_ttl_s: float = Field(3600.0, gt=0, description="how long a cached result serves")
    fetch_concurrency: int = Field(32, ge=1, description="image fetches in flight overall")
    fetch_per_host: int = Field(8, ge=1, description="image fetches in flight per host")
    fetch_connect_timeout_s: float = Field(3.0, gt=0)
    fetch_read_timeout_s: float = Field(5.0, gt=0)
    fetch_max_bytes: int = Field(
        8_000_000,
        ge=1024,
        le=15_000_000,  # an image event must stay under the topics' 16 MB record limit
        description="bytes of one photo read before giving up",
    )
    fetch_retries: int = Field(2, ge=0, description="retries for transient fetch errors")
    fetch_allow_hosts: list[str] = Field(
        default_factory=list,
        description="hosts or IPs fetched even if private/loopback (the demo image server)",
    )
    agent_max_in_flight: int = Field(
        256, ge=1, description="tweets the Faust agent works on at once (its backpressure)"
    )
    agent_max_unacked: int = Field(
        4096,
        ge=1,
        description="finished tweets the Faust agent holds while an earlier one on their "
        "partition is still in flight (acks go in offset order)",
    )

    # Inference -----------------------------------------------------------------
    batch_max_size: int = Field(32, ge=1, description="images per model run, at most")
    batch_max_wait_ms: int = Field(
        50,
        ge=0,
        description="longest a batch holds its first image while the model is busy; never "
        "waited when the model is idle",
    )
    pipeline_depth: int = Field(
        3,
        ge=2,
        description="batches in flight between consume and the model (each has its own "
        "preallocated input buffer): bounds memory under any backlog",
    )
    commit_interval_ms: int = Field(
        1000, ge=100, description="how often delivered offsets are committed (librdkafka)"
    )
    decode_workers: int = Field(2, ge=1, description="threads decoding and resizing images")
    decode_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where JPEGs are decoded: cuda decodes batches with nvJPEG on the GPU "
        "(torchvision); auto does so when the model really runs on CUDA or TensorRT",
    )
    ort_provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    ort_precision: Literal["model", "fp16", "int8"] = Field(
        "model",
        description="model: the model file's own precision; fp16/int8 ask TensorRT to build "
        "its engine in that precision (tensorrt only; int8 needs a QDQ INT8 model)",
    )
    ort_allow_fallback: bool = Field(
        False,
        description="run on the CPU when the CUDA/TensorRT provider cannot start, instead of "
        "refusing to start",
    )
    ort_intra_op_threads: int = Field(0, ge=0, description="0 lets ONNX Runtime choose")
    thumbnail_px: int = Field(160, ge=0, description="thumbnail edge carried on results; 0: none")
    consumer_id: str | None = Field(None, description="inference consumer id; default host-pid")
    infer_throttle_images_per_s: float = Field(
        0.0,
        ge=0,
        description="cap an inference consumer at this rate, to simulate a slower "
        "device in tests and demos (0: no cap)",
    )

    # Sink and gallery ------------------------------------------------------------
    sink_dir: Path | None = Field(None, description="sink output; default <data_dir>/sink")
    sink_window_s: float = Field(10.0, gt=0, description="reservoir window length")
    sink_per_window: int = Field(12, ge=1, description="results kept per window")
    sink_host: str = "127.0.0.1"
    sink_port: int = Field(8088, ge=0, le=65535)

    # Demo ------------------------------------------------------------------------
    image_server_host: str = "127.0.0.1"
    image_server_port: int = Field(8089, ge=0, le=65535)
    faust_web_port: int = Field(6066, ge=0, le=65535)

    # Metrics ---------------------------------------------------------------------
    metrics_host: str = Field(
        "127.0.0.1",
        description="where /metrics and /healthz listen: the inference consumer's and the "
        "sources' own server, and the Faust worker's web server (0.0.0.0 in containers)",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of /metrics and /healthz of the processes without a web server of "
        "their own (inference consumer, sources); 0: a free one, logged. The sink serves "
        "them on sink_port, the Faust worker on faust_web_port",
    )
    metrics_final_scrape_s: float = Field(
        20.0,
        ge=0,
        description="a source that ends on its own (a --count reached) waits at most this "
        "long for one more scrape, so Prometheus sees its last figures (0: no wait)",
    )
    prometheus_url: str | None = Field(
        None,
        description="a Prometheus that scrapes the pipeline: the gallery's status strip "
        "queries it (unset: the strip shows what the sink sees itself)",
    )

    # X API -----------------------------------------------------------------------
    x_bearer_token: SecretStr | None = None
    x_api_base_url: str = "https://api.x.com"

    # Bluesky and Mastodon ----------------------------------------------------------
    bluesky_jetstream_url: str = Field(
        "wss://jetstream2.us-east.bsky.network/subscribe",
        description="a Jetstream instance's subscribe endpoint (ws:// or wss://)",
    )
    bluesky_cdn_url: str = Field(
        "https://cdn.bsky.app", description="where Bluesky photos are fetched from"
    )
    mastodon_token: SecretStr | None = Field(
        None, description="access token, for instances whose public streams need one"
    )

    @field_validator("bluesky_jetstream_url")
    @classmethod
    def _jetstream_is_a_websocket(cls, value: str) -> str:
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("bluesky_jetstream_url must start with ws:// or wss://")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_a_topic_fragment(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError("topic_prefix may hold only letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _session_timeout_allows_batches(self) -> Settings:
        if self.batch_max_wait_ms >= self.session_timeout_ms:
            raise ValueError("batch_max_wait_ms must be well below session_timeout_ms")
        return self

    @model_validator(mode="after")
    def _precision_needs_tensorrt(self) -> Settings:
        if self.ort_precision != "model" and self.ort_provider != "tensorrt":
            raise ValueError(
                f"ort_precision={self.ort_precision} is a TensorRT build option: set "
                "ort_provider=tensorrt, or serve a model exported in that precision"
            )
        return self

    def topic(self, name: str) -> str:
        """The full topic name for one of our topics (docs/architecture.md)."""
        if name not in TOPIC_NAMES:
            raise KeyError(f"unknown topic {name!r}; known: {', '.join(TOPIC_NAMES)}")
        return f"{self.topic_prefix}{name}"

    def to_env(self, **extra: str) -> dict[str, str]:
        """The TAGSTREAM_ variables under which a child process reads these settings as
        they are: every field that is set, lists and dicts as JSON, secrets as their value
        (a child started by us may hold them as we do), and `extra` on top."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, list | dict):
                text = json.dumps(value)
            else:
                text = str(value)
            env[f"TAGSTREAM_{name.upper()}"] = text
        return env | extra

    @property
    def resolved_sink_dir(self) -> Path:
        return self.sink_dir or self.data_dir / "sink"

    def bootstrap(self) -> str:
        """The bootstrap servers; raises if neither set nor started by `tagstream up`."""
        if not self.kafka_bootstrap:
            raise ConfigurationError(
                "TAGSTREAM_KAFKA_BOOTSTRAP is not set: start a broker with `tagstream broker` "
                "or `tagstream up`, or point it at a cluster"
            )
        return self.kafka_bootstrap


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
