"""
Token buckets on a fake clock.
"""

import pytest
from twisted.internet.task import Clock

from dragonfly.ratelimit import TokenBucket, delay_for


def test_rate_zero_is_unlimited() -> None:
    """
    A rate of 0 never asks the caller to wait, whatever the amount.
    """
    bucket = TokenBucket(0, Clock())
    assert bucket.consume(10**12) == 0.0
    assert bucket.consume(10**12) == 0.0


def test_burst_of_one_second() -> None:
    """
    A fresh bucket lets one second's worth through at once; the next byte
    must wait 1/rate seconds.
    """
    bucket = TokenBucket(1000, Clock())
    assert bucket.consume(1000) == 0.0
    assert bucket.consume(1) == pytest.approx(0.001)


def test_debt_gives_the_right_wait() -> None:
    """
    Taking more than is in the bucket puts it in debt; the wait is the debt
    divided by the rate.
    """
    bucket = TokenBucket(1000, Clock())
    assert bucket.consume(3500) == pytest.approx(2.5)


def test_refill_with_time_and_debt_repaid() -> None:
    """
    Tokens come back at the rate as the clock advances; after waiting the
    announced time the debt is gone.
    """
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    wait = bucket.consume(3000)
    assert wait == pytest.approx(2.0)
    clock.advance(wait)
    assert bucket.consume(0) == 0.0
    clock.advance(0.5)
    assert bucket.consume(500) == 0.0
    assert bucket.consume(250) == pytest.approx(0.25)


def test_idle_time_does_not_bank_more_than_one_second() -> None:
    """
    However long the bucket sits idle, the burst stays one second's worth.
    """
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    clock.advance(3600)
    assert bucket.consume(1000) == 0.0
    assert bucket.consume(100) == pytest.approx(0.1)


def test_steady_stream_at_rate_never_waits() -> None:
    """
    Moving exactly rate * elapsed bytes keeps the caller unthrottled.
    """
    clock = Clock()
    bucket = TokenBucket(1000, clock)
    bucket.consume(1000)
    for _ in range(10):
        clock.advance(0.125)
        assert bucket.consume(125) == 0.0


def test_delay_for_charges_every_bucket_and_returns_longest() -> None:
    """
    With several limits (per task and global), every bucket is charged and
    the slowest decides.
    """
    clock = Clock()
    slow, fast = TokenBucket(100, clock), TokenBucket(1000, clock)
    assert delay_for([slow, fast], 300) == pytest.approx(2.0)
    # the fast bucket was charged as well: 700 left
    assert fast.consume(700) == 0.0
    assert fast.consume(100) == pytest.approx(0.1)
    assert delay_for([], 10**9) == 0.0
