"""The gallery's status strip: the health of the run at a glance, without Grafana.

The figures (tweets in and results out per second, the share of tweets shed, dead
letters per second, p50 and p99 of the end-to-end latency, and the lag of each consumer
group) come from the pipeline's metrics (infra/metrics.py), read one of two ways:

- **from Prometheus** when ``prometheus_url`` is set (`tagstream up` sets it when it runs
  one; docker-compose.yml points the sink at its Prometheus): the queries in `QUERIES`,
  over the last `WINDOW`, every process's figures;
- **from the sink's own view** otherwise, or while that Prometheus does not answer: the
  results it reads (their rate, and their latency from their timestamps, over the last
  `LOCAL_WINDOW_S`) and its own consumer group's lag. The sink reads only `hashtags`, so
  the tweets in, the share shed and the other groups' lag are then unknown (None).

`source` in the answer says which it is.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from infra.prometheus import PrometheusError, by_label, query_value

log = logging.getLogger(__name__)

#: The range of Prometheus's rates and quantiles.
WINDOW = "1m"
#: The same, for the sink's own view.
LOCAL_WINDOW_S = 60.0

#: The strip's figures as PromQL over the metrics of infra/metrics.py.
QUERIES = {
    "tweets_in_per_s": f"sum(rate(tagstream_agent_tweets_consumed_total[{WINDOW}]))",
    "results_per_s": f"sum(rate(tagstream_end_to_end_seconds_count[{WINDOW}]))",
    "shed_fraction": (
        f"sum(rate(tagstream_agent_tweets_shed_total[{WINDOW}])) "
        f"/ sum(rate(tagstream_agent_tweets_consumed_total[{WINDOW}]))"
    ),
    "dead_letters_per_s": f"sum(rate(tagstream_dead_letters_total[{WINDOW}]))",
    "latency_p50_s": (
        "histogram_quantile(0.5, sum by (le) "
        f"(rate(tagstream_end_to_end_seconds_bucket[{WINDOW}])))"
    ),
    "latency_p99_s": (
        "histogram_quantile(0.99, sum by (le) "
        f"(rate(tagstream_end_to_end_seconds_bucket[{WINDOW}])))"
    ),
}
LAG_QUERY = "sum by (group) (tagstream_consumer_lag_messages)"


def _quantile(values: list[float], q: float) -> float | None:
    """The `q` quantile of `values` (nearest rank), or None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class SinkView:
    """What the sink sees itself: the results it reads, and its own group's lag."""

    def __init__(
        self, *, window_s: float = LOCAL_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._results: deque[tuple[float, float | None]] = deque()
        self._lag: dict[str, int] = {}

    def result(self, result: Mapping[str, Any]) -> None:
        """One result read (not a retraction)."""
        stamps = result.get("timestamps") or {}
        ingested, produced = stamps.get("ingested"), stamps.get("produced")
        latency = None
        if isinstance(ingested, int | float) and isinstance(produced, int | float):
            latency = max(0.0, (produced - ingested) / 1000.0)
        now = self._clock()
        with self._lock:
            self._results.append((now, latency))
            self._forget(now)

    def set_lag(self, group: str, lag: int) -> None:
        with self._lock:
            self._lag[group] = lag

    def _forget(self, now: float) -> None:
        while self._results and self._results[0][0] < now - self.window_s:
            self._results.popleft()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            self._forget(now)
            latencies = [latency for _, latency in self._results if latency is not None]
            seen = len(self._results)
            lag = dict(self._lag)
        span = min(self.window_s, max(now - self._started, 1e-9))
        return {
            "source": "sink",
            "tweets_in_per_s": None,
            "results_per_s": seen / span,
            "shed_fraction": None,
            "dead_letters_per_s": None,
            "latency_p50_s": _quantile(latencies, 0.5),
            "latency_p99_s": _quantile(latencies, 0.99),
            "lag": lag,
        }


class GalleryStatus:
    """The strip's figures: from Prometheus at `prometheus_url` when set and answering,
    from `view` otherwise; computed at most every `min_interval_s` (pages poll often)."""

    def __init__(
        self,
        view: SinkView,
        *,
        prometheus_url: str | None = None,
        min_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.prometheus_url = prometheus_url
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._said_unreachable = False

    def status(self) -> dict[str, Any]:
        """The figures now (blocking: Prometheus is asked over HTTP; call off the loop)."""
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self.min_interval_s:
                return self._cached[1]
            figures = self._compute()
            self._cached = (now, figures)
            return figures

    def _compute(self) -> dict[str, Any]:
        if self.prometheus_url is None:
            return self.view.status()
        try:
            figures: dict[str, Any] = {
                name: query_value(self.prometheus_url, expr, timeout_s=2.0)
                for name, expr in QUERIES.items()
            }
            lag = by_label(self.prometheus_url, LAG_QUERY, "group", timeout_s=2.0)
        except PrometheusError as exc:
            if not self._said_unreachable:
                log.warning("status strip: %s; showing the sink's own view", exc)
                self._said_unreachable = True
            figures = self.view.status()
            figures["note"] = f"Prometheus at {self.prometheus_url} did not answer"
            return figures
        if self._said_unreachable:
            log.info("status strip: Prometheus answers again")
            self._said_unreachable = False
        figures["lag"] = {group: int(value) for group, value in sorted(lag.items())}
        figures["source"] = "prometheus"
        return figures
