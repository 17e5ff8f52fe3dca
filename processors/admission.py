"""Admission by rate: a token bucket and a meter of the arrival rate.

The seed "shed" by sleeping, which only backed the stream up. Here a tweet over
the admitted rate is dropped on purpose and recorded (a ShedRecord carrying the
rates at that moment), so that downstream latency stays bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token admits one tweet."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, n: float = 1.0) -> bool:
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate


class RateMeter:
    """Exponentially weighted arrival rate (events/s) with time constant `tau_s`."""

    def __init__(self, *, tau_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tau_s = tau_s
        self._clock = clock
        self._rate = 0.0
        self._last = clock()

    def mark(self, n: int = 1) -> None:
        now = self._clock()
        elapsed = max(now - self._last, 1e-6)
        decay = math.exp(-elapsed / self.tau_s)
        # n events over `elapsed` seconds, blended with the history.
        self._rate = self._rate * decay + (n / self.tau_s)
        self._last = now

    @property
    def rate(self) -> float:
        elapsed = self._clock() - self._last
        return self._rate * math.exp(-max(elapsed, 0.0) / self.tau_s)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    admission_rate: float
    observed_rate: float
    tokens: float


class AdmissionController:
    """Decides, tweet by tweet, whether it goes on to fetch and inference."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
        self.meter = RateMeter(clock=clock)

    def admit(self) -> Admission:
        self.meter.mark()
        admitted = self.bucket.try_take()
        return Admission(admitted, self.bucket.rate, self.meter.rate, self.bucket.tokens)

    def snapshot(self) -> Admission:
        return Admission(False, self.bucket.rate, self.meter.rate, self.bucket.tokens)
