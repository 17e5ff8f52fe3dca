"""A real Prometheus beside the pipeline, and its HTTP query API.

`tagstream up` and the tests run Debian's ``prometheus`` binary (``apt-get install
prometheus``; no Docker) with a scrape configuration made here (`scrape_config`: one job
per process, static targets on loopback), its data in a folder of its own. `query`
reads an instant vector back through ``/api/v1/query``; the gallery's status strip and
the tests use it. docker-compose.yml has its own configuration (deploy/prometheus.yml),
which finds the scaled services through Docker's DNS.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.exceptions import ConfigurationError, TagstreamError

log = logging.getLogger(__name__)

#: Said where the binary is missing.
INSTALL_HINT = (
    "install it to get a Prometheus beside the pipeline: `apt-get install prometheus` "
    "(Debian, Ubuntu), or a release from https://prometheus.io/download/ on PATH"
)


class PrometheusError(TagstreamError):
    """Prometheus did not start, or a query failed."""


@dataclass(frozen=True, slots=True)
class Target:
    """One process to scrape: its job name, host:port and metrics path."""

    job: str
    address: str
    path: str = "/metrics"


def binary() -> str | None:
    """The ``prometheus`` executable on PATH, or None."""
    return shutil.which("prometheus")


def scrape_config(targets: list[Target], *, interval_s: float) -> dict[str, Any]:
    """A Prometheus configuration scraping `targets` every `interval_s` (JSON is YAML)."""
    interval = f"{max(1, round(interval_s * 1000))}ms"
    jobs: dict[tuple[str, str], list[str]] = {}
    for target in targets:
        jobs.setdefault((target.job, target.path), []).append(target.address)
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "scrape_timeout": interval,
                "static_configs": [{"targets": addresses}],
            }
            for (job, path), addresses in jobs.items()
        ],
    }


class PrometheusServer:
    """A Prometheus process scraping `targets`, its config and data under `folder`."""

    def __init__(
        self,
        folder: Path,
        targets: list[Target],
        *,
        port: int,
        interval_s: float = 1.0,
        host: str = "127.0.0.1",
        executable: str | None = None,
    ) -> None:
        found = executable or binary()
        if found is None:
            raise ConfigurationError(f"no `prometheus` on PATH: {INSTALL_HINT}")
        self.executable = found
        self.folder = Path(folder)
        self.targets = targets
        self.interval_s = interval_s
        self.url = f"http://{host}:{port}"
        self._listen = f"{host}:{port}"
        self.config_path = self.folder / "prometheus.yml"
        self.log_path = self.folder / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout_s: float = 30.0) -> PrometheusServer:
        """Write the configuration, start Prometheus on a fresh data folder, and wait until
        it is ready."""
        data = self.folder / "data"
        if data.exists():
            shutil.rmtree(data)  # a run's figures only: no series of an earlier run
        data.mkdir(parents=True)
        config = scrape_config(self.targets, interval_s=self.interval_s)
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address={self._listen}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                with _open(f"{self.url}/-/ready", timeout_s=1.0) as resp:
                    if resp.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout_s:g} s; see {self.log_path}")

    def wait_for_targets(self, *, timeout_s: float = 30.0) -> None:
        """Wait until Prometheus has tried every target once. It takes up its targets a
        few seconds after it is ready (its discovery updates are throttled to one per 5 s),
        so a process that lives only a few seconds may otherwise never be scraped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with _open(f"{self.url}/api/v1/targets", timeout_s=2.0) as resp:
                    active = json.loads(resp.read())["data"]["activeTargets"]
            except (OSError, ValueError, KeyError) as exc:
                raise PrometheusError(f"targets of {self.url}: {exc}") from None
            tried = [t for t in active if t.get("health") in ("up", "down")]
            if len(tried) >= len(self.targets):
                return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus took up no targets in {timeout_s:g} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _open(url: str, *, timeout_s: float) -> Any:
    # No proxy: Prometheus is ours, on loopback or the compose network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=timeout_s)


def query(url: str, expr: str, *, timeout_s: float = 5.0) -> list[tuple[dict[str, str], float]]:
    """The instant vector (or scalar) `expr` evaluates to now at the Prometheus at `url`:
    (labels, value) pairs. Raises PrometheusError when it cannot be read."""
    address = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with _open(address, timeout_s=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise PrometheusError(f"query {expr!r}: HTTP {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"query {expr!r} at {url}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"query {expr!r}: {body.get('error', body)}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [({}, float(data["result"][1]))]
    if data["resultType"] != "vector":
        raise PrometheusError(f"query {expr!r}: a {data['resultType']}, not a vector")
    return [(item["metric"], float(item["value"][1])) for item in data["result"]]


def query_value(url: str, expr: str, *, timeout_s: float = 5.0) -> float | None:
    """The one value of `expr` (None when it has none, or it is not a number)."""
    found = query(url, expr, timeout_s=timeout_s)
    if not found:
        return None
    if len(found) > 1:
        raise PrometheusError(f"query {expr!r}: {len(found)} series, wanted one")
    value = found[0][1]
    return value if math.isfinite(value) else None


def by_label(url: str, expr: str, label: str, *, timeout_s: float = 5.0) -> dict[str, float]:
    """The values of `expr` by one label (series without it under "")."""
    return {
        labels.get(label, ""): value
        for labels, value in query(url, expr, timeout_s=timeout_s)
        if math.isfinite(value)
    }


def targets_up(url: str) -> Mapping[str, int]:
    """Jobs and how many of their targets the last scrape reached."""
    return {job: int(v) for job, v in by_label(url, "sum by (job) (up)", "job").items()}
