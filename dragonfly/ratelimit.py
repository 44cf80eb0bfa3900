"""
Token buckets for download and upload rate limits.

A bucket lets a burst of up to one second's worth of bytes through, then
answers how long the caller must pause: the caller owes the debt rather than
being refused, which suits byte streams that cannot be split after the fact.
"""

from twisted.internet.interfaces import IReactorTime


class TokenBucket:
    """
    Rate limit at C{rate} bytes per second; a rate of 0 means unlimited.
    """

    def __init__(self, rate: int, clock: IReactorTime) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = float(rate)
        self._stamp = clock.seconds()

    def consume(self, count: int) -> float:
        """
        Take C{count} bytes from the bucket.

        @return: how many seconds to wait before moving more bytes (0.0 when
            under the limit).
        """
        if self.rate <= 0:
            return 0.0
        now = self._clock.seconds()
        self._tokens = min(
            float(self.rate), self._tokens + (now - self._stamp) * self.rate
        )
        self._stamp = now
        self._tokens -= count
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


def delay_for(buckets: "list[TokenBucket]", count: int) -> float:
    """
    Charge C{count} bytes to every bucket and return the longest wait.
    """
    return max((bucket.consume(count) for bucket in buckets), default=0.0)
