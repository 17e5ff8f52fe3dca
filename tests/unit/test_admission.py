"""Token bucket and rate meter, on an injected clock."""

from __future__ import annotations

import pytest

from processors.admission import AdmissionController, RateMeter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=5.0, clock=clock)
    assert [bucket.try_take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now = 0.5  # 5 tokens refilled
    assert sum(bucket.try_take() for _ in range(10)) == 5
    clock.now = 100.0  # never more than the burst
    assert bucket.tokens == pytest.approx(5.0)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5)


def test_meter_converges_to_arrival_rate() -> None:
    clock = Clock()
    meter = RateMeter(tau_s=2.0, clock=clock)
    for _ in range(400):  # 20 events/s for 20 s
        clock.now += 0.05
        meter.mark()
    assert meter.rate == pytest.approx(20.0, rel=0.05)
    clock.now += 10.0  # silence decays the estimate
    assert meter.rate < 1.0


def test_controller_sheds_over_rate_and_reports_rates() -> None:
    clock = Clock()
    controller = AdmissionController(rate=2.0, burst=2.0, clock=clock)
    decisions = []
    for _ in range(40):  # 20 tweets/s against 2 admitted/s
        clock.now += 0.05
        decisions.append(controller.admit())
    admitted = sum(d.admitted for d in decisions)
    assert 2 <= admitted <= 2 + 2 * 2.0 + 1  # the burst plus two seconds of refill
    shed = [d for d in decisions if not d.admitted]
    assert all(d.admission_rate == 2.0 and d.tokens < 1.0 for d in shed)
    assert shed[-1].observed_rate > 5.0
