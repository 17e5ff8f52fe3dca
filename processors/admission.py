"""Admission: which tweets go on to fetch and inference, so that admitted photos meet a
latency target whatever the load.

Dropping on purpose, on record (a ShedRecord with the reason and the controller's state),
keeps the queue in front of the inference consumers short; sleeping instead (as the
ELEN 6889 report's pipeline did) only backs the stream up, and admitting a fixed rate
either wastes capacity or lets the queue, and every photo's latency, grow without bound.

The controller (`AdmissionController`) closes the loop on the queueing delay:

- **Capacity** C (images/s): the sum of what the live inference consumers report on the
  `capacity` topic (images per busy second); a consumer that stops reporting stops
  counting after `stale_after_s`.
- **Backlog** B (images): what the consumers reported waiting on `images`, plus what was
  admitted since (this worker's own admissions, scaled up by its share of the tweets'
  partitions, for the other workers' like it), plus the photos still being fetched, less
  what C has drained since.
- **Queueing delay** of a photo admitted now: W = B / C.
- **Rate**: the controller aims the delay at W* = `queue_share` x target (the rest of the
  target is left for the fetch, the Kafka hops, decoding and the model) and admits
  ``rate = C + (C W* - B) / drain_s`` images/s in all: capacity fed forward, plus a
  proportional term that drains the backlog above C W* in about `drain_s` (or fills it
  when below). With the capacity known this is a first-order system: the backlog error
  decays as exp(-t / drain_s), without overshoot while drain_s is well above the
  reports' period (1 s); tests/unit/test_admission.py shows it on a simulated queue whose
  capacity steps down 4x and back. A consumer's backlog counts what waits on `images`
  and what it has consumed and not yet delivered (a pipelined consumer holds batches).
- **Share**: each Faust worker admits rate x (its partitions of `tweets` / all of them),
  so the sum stays right when a worker joins or leaves (a rebalance moves partitions).
- **Ceiling**: the fixed `admission_rate` (tweets/s) still caps everything (`over_rate`);
  with ``admission_mode = "fixed"`` it is the only rule, as before.
- **Fallback**: with no live capacity report (no consumer yet, or one too old to report)
  the controller admits a conservative `fallback_rate` and says so, once, in the log and
  in its state.

Priorities: a tweet that matched a targeted rule (one tagged with a class of the model)
outranks one that matched only a general rule: the low-priority tweets may not take the
last `reserve` of the tokens. And a tweet whose latency is already lost (its age, plus
the time a fetch takes, plus W, plus one batch's time in the model, already passes the
target) is shed as `deadline`, which sheds the oldest first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Why a tweet is shed (ShedRecord.reason).
NO_PHOTO = "no_photo"
OVER_RATE = "over_rate"  # the fixed ceiling (admission_rate, tweets/s)
OVER_CAPACITY = "over_capacity"  # the controller's rate
DEADLINE = "deadline"  # its latency is already lost

#: Controller modes (ShedRecord.controller_mode).
CLOSED_LOOP = "closed_loop"
FALLBACK = "fallback"
FIXED = "fixed"


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token admits one unit."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError("rate must be >= 0 and burst > 0")
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

    def try_take(self, n: float = 1.0, *, keep: float = 0.0) -> bool:
        """Take `n` tokens if at least one (or `n`, if less) is there above `keep`.

        The bucket may go into debt for a large request, repaid by the refill before
        anything else gets in: a tweet of four photos is not starved by a stream of
        one-photo tweets that never let four tokens gather, and the long-run rate holds."""
        self._refill()
        if self._tokens - keep >= min(n, 1.0) - 1e-9:
            self._tokens -= n
            return True
        return False

    def set(self, *, rate: float, burst: float) -> None:
        self._refill()
        self.rate = rate
        self.burst = max(burst, 1e-9)
        self._tokens = min(self._tokens, self.burst)


class RateMeter:
    """Exponentially weighted arrival rate (events/s) with time constant `tau_s`."""

    def __init__(self, *, tau_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tau_s = tau_s
        self._clock = clock
        self._rate = 0.0
        self._last = clock()

    def mark(self, n: float = 1) -> None:
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


@dataclass(frozen=True, slots=True)
class ControllerState:
    """What the controller knew and decided at one moment (carried on shed records)."""

    mode: str  # closed_loop, fallback or fixed
    capacity: float  # images/s of the live inference consumers
    backlog: float  # images admitted and not yet done (estimated)
    delay_s: float  # queueing delay a photo admitted now would meet
    service_s: float  # and then its own batch's time in the model
    rate: float  # images/s this worker admits now
    share: float  # this worker's share of the tweets' partitions
    consumers: int  # live consumers


@dataclass(frozen=True, slots=True)
class Admission:
    """One decision, and the state it was made in."""

    admitted: bool
    reason: str  # "" when admitted
    detail: str
    tweet_rate: float  # the fixed ceiling, tweets/s
    observed_rate: float  # tweets/s arriving
    tokens: float  # controller tokens (images) left; ceiling tokens in fixed mode
    state: ControllerState


@dataclass
class _Consumer:
    capacity: float  # images per busy second
    backlog: float  # images waiting, as reported
    batch_s: float  # how long one of its batches takes: a photo's own service time
    seen_at: float  # our clock when the report arrived
    admitted_then: float  # this worker's admitted images (running total) at that moment


class AdmissionController:
    """Decides, tweet by tweet, whether it goes on to fetch and inference."""

    def __init__(
        self,
        *,
        target_s: float,
        ceiling_rate: float,
        ceiling_burst: float,
        mode: str = CLOSED_LOOP,
        fallback_rate: float = 5.0,
        queue_share: float = 0.25,
        drain_s: float = 2.0,
        burst_s: float = 0.25,
        reserve: float = 0.5,
        stale_after_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in (CLOSED_LOOP, FIXED):
            raise ValueError(f"mode must be {CLOSED_LOOP!r} or {FIXED!r}, got {mode!r}")
        if not (target_s > 0 and 0 < queue_share < 1 and drain_s > 0 and 0 <= reserve < 1):
            raise ValueError(
                "need target_s > 0, 0 < queue_share < 1, drain_s > 0, 0 <= reserve < 1"
            )
        self.mode = mode
        self.target_s = target_s
        self.fallback_rate = fallback_rate
        self.queue_share = queue_share
        self.drain_s = drain_s
        self.burst_s = burst_s
        self.reserve = reserve
        self.stale_after_s = stale_after_s
        self._clock = clock
        self.ceiling = TokenBucket(rate=ceiling_rate, burst=ceiling_burst, clock=clock)
        # Room for a token above the reserve at any rate, or low-priority tweets would
        # never get in at small rates (the fallback's few images/s).
        self._min_burst = 2.0 / (1.0 - reserve)
        self.bucket = TokenBucket(rate=fallback_rate, burst=self._min_burst, clock=clock)
        self.meter = RateMeter(clock=clock)
        self.share = 1.0
        self.classes: frozenset[str] = frozenset()
        self._consumers: dict[str, _Consumer] = {}
        self.admitted_images = 0.0  # running total of images this worker admitted
        self.fetching = 0  # photos admitted and still being fetched
        self.fetch_s = 0.0  # how long a fetch takes (moving average)
        self._state = self._compute(clock())
        self._said_fallback: bool | None = None

    # Inputs ------------------------------------------------------------------------

    def observe_capacity(
        self,
        consumer_id: str,
        *,
        images_per_s: float,
        queue_depth: float,
        batch_size: float = 1.0,
    ) -> None:
        """A CapacityReport from an inference consumer, as it arrives."""
        now = self._clock()
        capacity = max(0.0, images_per_s)
        batch_s = max(1.0, batch_size) / capacity if capacity > 0 else 0.0
        self._consumers[consumer_id] = _Consumer(
            capacity, max(0.0, queue_depth), batch_s, now, self.admitted_images
        )
        self._update(now)

    def observe_fetch(self, seconds: float) -> None:
        """How long one photo's fetch took: part of every admitted photo's latency."""
        self.fetch_s += 0.1 * (seconds - self.fetch_s)

    def set_share(self, share: float) -> None:
        """This worker's share of the tweets' partitions (0..1), after a rebalance."""
        self.share = min(1.0, max(0.0, share))
        self._update(self._clock())

    def set_classes(self, classes: Iterable[str]) -> None:
        """The model's classes: a tweet whose rules name one is high priority."""
        self.classes = frozenset(classes)

    # Decisions ---------------------------------------------------------------------

    def high_priority(self, rule_tags: Iterable[str]) -> bool:
        """Whether a tweet matched a targeted rule (a class). All are, until the model's
        classes are known."""
        return not self.classes or any(tag in self.classes for tag in rule_tags)

    def admit(self, *, photos: int, rule_tags: Iterable[str] = (), age_s: float = 0.0) -> Admission:
        """Admit a tweet with `photos` photos (that need fetch and inference), or not."""
        self.meter.mark()
        now = self._clock()
        state = self._update(now)
        if not self.ceiling.try_take(1.0):
            return self._decision(False, OVER_RATE, "fixed ceiling (admission_rate)", state)
        if self.mode == FIXED:
            return self._decision(True, "", "", state)
        ahead = self.fetch_s + state.delay_s + state.service_s
        if state.mode == CLOSED_LOOP and age_s + ahead > self.target_s:
            return self._decision(
                False,
                DEADLINE,
                f"age {age_s:.2f} s + fetch {self.fetch_s:.2f} s + queue {state.delay_s:.2f} s "
                f"+ batch {state.service_s:.2f} s > target {self.target_s:g} s",
                state,
            )
        high = self.high_priority(rule_tags)
        keep = 0.0 if high else self.reserve * self.bucket.burst
        if not self.bucket.try_take(photos, keep=keep):
            detail = "controller rate" if high else "controller rate (low priority)"
            return self._decision(False, OVER_CAPACITY, detail, state)
        self.admitted_images += photos
        return self._decision(True, "", "", state)

    def snapshot(self) -> Admission:
        """The state now, for records made without a decision (no_photo)."""
        return self._decision(False, "", "", self._update(self._clock()))

    @property
    def state(self) -> ControllerState:
        return self._state

    # The loop ----------------------------------------------------------------------

    def _live(self, now: float) -> dict[str, _Consumer]:
        stale = [cid for cid, c in self._consumers.items() if now - c.seen_at > self.stale_after_s]
        for cid in stale:
            log.warning("inference consumer %s stopped reporting: no longer counted", cid)
            del self._consumers[cid]
        return self._consumers

    def _compute(self, now: float) -> ControllerState:
        live = self._live(now)
        capacity = sum(c.capacity for c in live.values())
        if self.mode == FIXED:
            return ControllerState(
                FIXED, capacity, 0.0, 0.0, 0.0, self.ceiling.rate, self.share, len(live)
            )
        if not live or capacity <= 0:
            rate = self.fallback_rate * self.share
            return ControllerState(FALLBACK, capacity, 0.0, 0.0, 0.0, rate, self.share, len(live))
        backlog = self._backlog(now, live) + self.fetching / max(self.share, 1e-9)
        delay = backlog / capacity
        wanted = capacity * self.queue_share * self.target_s
        rate = max(0.0, capacity + (wanted - backlog) / self.drain_s)
        service = max(c.batch_s for c in live.values())
        return ControllerState(
            CLOSED_LOOP, capacity, backlog, delay, service, rate * self.share, self.share, len(live)
        )

    def _backlog(self, now: float, live: Mapping[str, _Consumer]) -> float:
        """Images waiting for the consumers now: each consumer's reported queue, plus
        what the workers admitted since its report (this worker's admissions over its
        share, spread evenly over the consumers, as Kafka spreads partitions), less what
        it has drained since."""
        scale = 1.0 / (max(self.share, 1e-9) * len(live))
        backlog = 0.0
        for consumer in live.values():
            since = (self.admitted_images - consumer.admitted_then) * scale
            drained = consumer.capacity * (now - consumer.seen_at)
            backlog += max(0.0, consumer.backlog + since - drained)
        return backlog

    def _update(self, now: float) -> ControllerState:
        state = self._compute(now)
        self._state = state
        if state.mode != FIXED:
            self.bucket.set(rate=state.rate, burst=max(self._min_burst, state.rate * self.burst_s))
            fallback = state.mode == FALLBACK
            if fallback != self._said_fallback:
                if fallback:
                    log.warning(
                        "no capacity reports from the inference consumers: admitting a "
                        "conservative %g images/s until one reports",
                        self.fallback_rate,
                    )
                elif self._said_fallback is not None:
                    log.warning(
                        "capacity reports back (%d consumers, %.0f images/s): closed loop",
                        state.consumers,
                        state.capacity,
                    )
                self._said_fallback = fallback
        return state

    def _decision(
        self, admitted: bool, reason: str, detail: str, state: ControllerState
    ) -> Admission:
        tokens = self.ceiling.tokens if self.mode == FIXED else self.bucket.tokens
        return Admission(
            admitted, reason, detail, self.ceiling.rate, self.meter.rate, tokens, state
        )
