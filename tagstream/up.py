"""`tagstream up`: the whole pipeline on one machine, and the process group that runs it.

Starts (unless TAGSTREAM_KAFKA_BOOTSTRAP names a cluster) the embedded broker,
then the topics, the demo model, and one process each for the demo image
server, the Faust worker, an inference consumer, the sink with its gallery and
the synthetic producer, each of the last four serving its metrics on a port of its own;
and, when
the ``prometheus`` binary is on PATH, a Prometheus scraping them all (its
configuration and data under ``<data_dir>/prometheus``), which the gallery's status
strip reads. It prints where everything is. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra import prometheus
from infra.broker import EmbeddedBroker, die_with_parent, free_port
from infra.settings import Settings
from infra.topics import ensure_topics
from models.demo import ensure_demo_model

log = logging.getLogger(__name__)


class ProcessGroup:
    """Child processes started together and stopped together (SIGTERM, then SIGKILL)."""

    def __init__(self, *, env: dict[str, str], log_dir: Path | None = None) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list = []

    def start(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` as `name`, with the group's environment plus `env`."""
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all
            self._logs.append(out)
        process = subprocess.Popen(
            argv,
            env=self.env if env is None else {**self.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # our Ctrl-C handling, not the terminal's, stops children
            preexec_fn=die_with_parent,
        )
        self.processes[name] = process
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def exited(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}

    def stop_all(self, *, timeout_s: float = 15.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                process.kill()
                process.wait()
        for handle in self._logs:
            handle.close()
        self._logs.clear()


def tagstream_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tagstream.cli", *args]


def faust_argv(settings: Settings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "faust",
        "-A",
        "processors",
        "worker",
        "-l",
        "info",
        "--web-port",
        str(settings.faust_web_port),
    ]


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    """The environment of our children: ours plus the TAGSTREAM_ settings they must share."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **overrides}


#: How often `tagstream up`'s Prometheus scrapes (the status strip's rates need two).
SCRAPE_INTERVAL_S = 2.0


def metrics_targets(ports: dict[str, int], host: str = "127.0.0.1") -> list[prometheus.Target]:
    """One scrape target per process of `up`, by name (faust, infer, sink, producer)."""
    return [prometheus.Target(name, f"{host}:{port}") for name, port in ports.items()]


def start_prometheus(
    settings: Settings, ports: dict[str, int], *, port: int
) -> prometheus.PrometheusServer | None:
    """A Prometheus scraping `ports`, or None (after saying how to get one) without the
    binary or when it does not start."""
    if prometheus.binary() is None:
        print(f"prometheus: not on PATH; {prometheus.INSTALL_HINT}", flush=True)
        return None
    server = prometheus.PrometheusServer(
        settings.data_dir / "prometheus",
        metrics_targets(ports),
        port=port,
        interval_s=SCRAPE_INTERVAL_S,
    )
    try:
        return server.start()
    except prometheus.PrometheusError as exc:
        print(f"prometheus: {exc}; going on without it", file=sys.stderr, flush=True)
        return None


def up(settings: Settings, *, rate: float, count: int, open_ports: bool = True) -> int:

    # Explicit handlers: a process started in the background inherits SIGINT ignored,
    # and `docker stop`, systemd and `kill` send SIGTERM; either must stop everything.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # raises KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    broker: EmbeddedBroker | None = None
    log_dir = settings.data_dir / "logs"
    if not settings.kafka_bootstrap:
        broker = EmbeddedBroker(log_path=log_dir / "broker.log").start()
        print(f"embedded broker (tansu) on {broker.bootstrap}", flush=True)
        settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
    group: ProcessGroup | None = None
    server: prometheus.PrometheusServer | None = None
    try:
        ensure_topics(settings)
        model_dir = settings.model_dir or ensure_demo_model(settings.data_dir)
        image_port = free_port() if open_ports else settings.image_server_port
        sink_port = settings.sink_port or free_port()
        # Each process serves /metrics on a port of its own: the Faust worker on its web
        # server, the sink beside its gallery, the others on their metrics port.
        ports = {
            "faust": free_port(),
            "infer": free_port(),
            "sink": sink_port,
            "producer": free_port(),
        }
        prometheus_port = free_port()
        server = start_prometheus(settings, ports, port=prometheus_port)
        overrides = {
            "TAGSTREAM_KAFKA_BOOTSTRAP": settings.bootstrap(),
            "TAGSTREAM_MODEL_DIR": str(Path(model_dir).resolve()),
            "TAGSTREAM_DATA_DIR": str(settings.data_dir.resolve()),
            "TAGSTREAM_FETCH_ALLOW_HOSTS": f'["{settings.image_server_host}"]',
            "TAGSTREAM_SINK_PORT": str(sink_port),
            "TAGSTREAM_IMAGE_SERVER_PORT": str(image_port),
            "TAGSTREAM_FAUST_WEB_PORT": str(ports["faust"]),
            "TAGSTREAM_METRICS_HOST": "127.0.0.1",
            # A producer that reaches --count hands its last figures to one more scrape.
            "TAGSTREAM_METRICS_FINAL_SCRAPE_S": str(3 * SCRAPE_INTERVAL_S),
        }
        if server is not None:
            overrides["TAGSTREAM_PROMETHEUS_URL"] = server.url
        env = child_env(overrides)
        group = ProcessGroup(env=env, log_dir=log_dir)
        image_url = f"http://{settings.image_server_host}:{image_port}"
        group.start("images", tagstream_argv("serve-images", "--port", str(image_port)))
        group.start(
            "faust", faust_argv(settings.model_copy(update={"faust_web_port": ports["faust"]}))
        )
        group.start(
            "infer", tagstream_argv("infer"), env={"TAGSTREAM_METRICS_PORT": str(ports["infer"])}
        )
        group.start("sink", tagstream_argv("sink"))
        if server is not None:
            # Prometheus takes up its targets a few seconds after it starts; the producer
            # waits for that (the others are still starting), so that the figures of a
            # short run (--count) are all there from its first tweet.
            try:
                server.wait_for_targets()
            except prometheus.PrometheusError as exc:
                print(f"prometheus: {exc}", file=sys.stderr, flush=True)
        group.start(
            "producer",
            tagstream_argv(
                "produce",
                "synthetic",
                "--rate",
                str(rate),
                "--count",
                str(count),
                "--image-base-url",
                image_url,
            ),
            env={"TAGSTREAM_METRICS_PORT": str(ports["producer"])},
        )
        gallery = f"http://{settings.sink_host}:{sink_port}/"
        print(
            f"gallery: {gallery}  (logs in {log_dir}; Ctrl-C stops)\n"
            + "metrics: "
            + ", ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in ports.items()),
            flush=True,
        )
        if server is not None:
            print(
                f"prometheus: {server.url}/  (scraping every {SCRAPE_INTERVAL_S:g} s; "
                f"configuration {server.config_path}); the gallery's status strip reads it",
                flush=True,
            )
        while True:
            time.sleep(1.0)
            dead = {n: c for n, c in group.exited().items() if not (n == "producer" and c == 0)}
            if dead:
                print(f"stopping: process(es) exited: {dead}; see {log_dir}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        if group is not None:
            group.stop_all()
        if server is not None:
            server.stop()
        if broker is not None:
            broker.stop()
