"""Admission limits: a token bucket and a concurrency gate, each a share of a proxy-wide limit.

With several workers, a proxy-wide limit is split between them by demand
(see :mod:`pitcher_rpc.degrade.shares`): each worker enforces its share
locally, on the hot path, with no lock and no message; the master moves the
shares every tick as the load between workers shifts. The shares always add
up to 1, so the sum of what workers admit stays within the proxy-wide limit.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per request.

    ``share`` scales both for this process's part of a proxy-wide bucket.
    """

    __slots__ = ("_burst", "_rate", "asked", "burst", "rate", "share", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float, share: float = 1.0) -> None:
        self.rate = rate
        self.burst = burst
        self.share = share
        self._rate = rate * share
        # Never below one token: a worker with a small share can still pass one.
        self._burst = max(1.0, burst * share)
        self.tokens = self._burst
        self.stamp = now
        # Requests that asked for a token since the last demand report.
        self.asked = 0

    def set_share(self, share: float) -> None:
        self.share = share
        self._rate = self.rate * share
        self._burst = max(1.0, self.burst * share)
        if self.tokens > self._burst:
            self.tokens = self._burst

    def take(self, now: float) -> bool:
        self.asked += 1
        tokens = self.tokens + (now - self.stamp) * self._rate
        burst = self._burst
        if tokens > burst:
            tokens = burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def give_back(self) -> None:
        """Return a token taken for a request another limit then refused."""
        self.tokens = min(self.tokens + 1.0, self._burst)

    def retry_after(self) -> int:
        """Whole seconds until a token is there again (at least 1), for Retry-After."""
        rate = self._rate
        if rate <= 0:
            return 1
        return max(1, math.ceil((1.0 - self.tokens) / rate))


class Gate:
    """At most ``limit`` requests in flight (times this process's ``share``, at least 1)."""

    __slots__ = ("_limit", "in_flight", "limit", "peak", "reason", "refused", "share")

    def __init__(self, limit: int, reason: str = "concurrency", share: float = 1.0) -> None:
        self.limit = limit
        # What a refusal by this gate is counted as.
        self.reason = reason
        self.in_flight = 0
        # Highest in flight and requests refused since the last demand report.
        self.peak = 0
        self.refused = 0
        self.share = share
        self._limit = limit
        self.set_share(share)

    def set_share(self, share: float) -> None:
        self.share = share
        # Never zero: a worker with a tiny share still serves one at a time.
        self._limit = max(1, math.floor(self.limit * share + 1e-9))

    @property
    def local_limit(self) -> int:
        return self._limit

    def enter(self, force: bool = False) -> bool:
        """Take a place if there is one (``force``: count it even if there is none)."""
        if self.in_flight >= self._limit:
            self.refused += 1
            if not force:
                return False
        self.in_flight += 1
        if self.in_flight > self.peak:
            self.peak = self.in_flight
        return self.in_flight <= self._limit

    def leave(self) -> None:
        self.in_flight -= 1

    def demand(self) -> float:
        """What this gate was asked to hold since the last call: peak plus refusals."""
        demand = float(self.peak + self.refused)
        self.peak = self.in_flight
        self.refused = 0
        return demand
