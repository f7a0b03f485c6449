"""Admission limits: a token bucket and a concurrency gate, each a share of a proxy-wide limit.

With several workers, a proxy-wide limit is split between them by demand
(see :mod:`pitcher_rpc.degrade.shares`): each worker enforces its share
locally, on the hot path, with no lock and no message; the master moves the
shares every tick as the load between workers shifts. The shares always add
up to 1, so the sum of what workers admit stays within the proxy-wide limit.

A rate shared by a fleet of proxies is a :class:`FleetBucket`: tokens taken
from Redis in batches by :mod:`pitcher_rpc.fleet.redis_limits` and spent here,
on the hot path, just as locally.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class Bucket:
    """A rate limit a request takes one token from: local, or a fleet's."""

    __slots__ = ("asked", "burst", "rate", "share")

    def __init__(self, rate: float, burst: float, share: float) -> None:
        self.rate = rate
        self.burst = burst
        self.share = share
        # Requests that asked for a token since the last demand report.
        self.asked = 0

    def take(self, now: float) -> bool:
        raise NotImplementedError

    def give_back(self) -> None:
        """Return a token taken for a request another limit then refused."""
        raise NotImplementedError

    def set_share(self, share: float) -> None:
        raise NotImplementedError

    def retry_after(self) -> int:
        """Whole seconds until a token is there again (at least 1), for Retry-After."""
        raise NotImplementedError


class TokenBucket(Bucket):
    """``rate`` tokens per second, at most ``burst`` saved up; one token per request.

    ``share`` scales both for this process's part of a proxy-wide bucket.
    """

    __slots__ = ("_burst", "_rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float, share: float = 1.0) -> None:
        super().__init__(rate, burst, share)
        self._rate = rate * share
        # Never below one token: a worker with a small share can still pass one.
        self._burst = max(1.0, burst * share)
        self.tokens = self._burst
        self.stamp = now

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
        self.tokens = min(self.tokens + 1.0, self._burst)

    def retry_after(self) -> int:
        rate = self._rate
        if rate <= 0:
            return 1
        return max(1, math.ceil((1.0 - self.tokens) / rate))

    def refill_from(self, tokens: float, now: float) -> None:
        """Hold ``tokens`` as of ``now`` (at most the burst): what a fleet bucket held."""
        self.tokens = min(float(tokens), self._burst)
        self.stamp = now


# What a fleet bucket does: spend tokens Redis granted; or, Redis down or
# slow, admit everything (fail open) or enforce the local fallback (closed).
FLEET = 0
FAIL_OPEN = 1
FAIL_CLOSED = 2
STATE_NAMES = ("fleet", "open", "closed")


def _never() -> None:
    pass


class FleetBucket(Bucket):
    """A rate shared by every proxy on one Redis: tokens taken there in batches, spent here.

    ``rate`` and ``burst`` are the fleet's. The refiller
    (:class:`pitcher_rpc.fleet.redis_limits.RedisLimits`) owns the Redis side:
    it adds the tokens Redis grants to ``held``, and sets ``state`` when Redis
    fails (or is slower than its timeout) and when it answers again. take()
    never waits and never does I/O: when ``held`` falls below ``low_water``
    it calls ``wake`` once, and the refiller asks for more in the background,
    ahead of need.

    ``fallback`` is this process's part of the proxy's share of the rate,
    enforced in place of the fleet's while Redis is away and the fail mode is
    closed; ``share`` (the master's split between workers) applies to it.
    """

    __slots__ = (
        "fail_state",
        "fallback",
        "held",
        "key",
        "low_water",
        "max_batch",
        "requested",
        "retry",
        "state",
        "unchecked",
        "wake",
        "woken",
    )

    def __init__(
        self,
        key: str,
        rate: float,
        burst: float,
        now: float,
        fail_closed: bool = False,
        max_batch: int = 0,
    ) -> None:
        super().__init__(rate, burst, 1.0)
        self.key = key
        # The most tokens taken from Redis at once; 0: the refiller's default.
        self.max_batch = max_batch
        self.fail_state = FAIL_CLOSED if fail_closed else FAIL_OPEN
        # Until Redis first answers, nothing is known of the fleet: the fail mode
        # holds (for the first round trip, or for as long as Redis is away).
        self.state = self.fail_state
        self.fallback = TokenBucket(rate, burst, now)
        self.fallback.tokens = 0.0
        # Tokens granted by Redis and not spent yet.
        self.held = 0
        self.low_water = 1
        # A refill was asked for (wake called) and not answered yet.
        self.woken = False
        self.wake: Callable[[], None] = _never
        # Every request that asked, never reset: the refiller sizes batches from it.
        self.requested = 0
        # Requests admitted unchecked because Redis failed (fail open).
        self.unchecked = 0
        # Seconds the fleet said its bucket needs for the next batch (Retry-After).
        self.retry = 1

    def take(self, now: float) -> bool:
        self.asked += 1
        self.requested += 1
        state = self.state
        if state == FLEET:
            held = self.held
            if held >= 1:
                held -= 1
                self.held = held
                if held < self.low_water and not self.woken:
                    self.woken = True
                    self.wake()
                return True
            if not self.woken:
                self.woken = True
                self.wake()
            # The fleet's bucket is empty, or the refill is still on its way
            # (for at most the refiller's timeout; then the fail mode decides).
            return False
        if state == FAIL_OPEN:
            self.unchecked += 1
            return True
        return self.fallback.take(now)

    def give_back(self) -> None:
        if self.state == FLEET:
            self.held += 1
        elif self.state == FAIL_CLOSED:
            self.fallback.give_back()

    def set_share(self, share: float) -> None:
        self.share = share
        self.fallback.set_share(share)

    def set_proxies(self, proxies: float) -> None:
        """The fleet has this many proxies: the fallback is one proxy's part of the rate."""
        proxies = max(1.0, proxies)
        fallback = self.fallback
        fallback.rate = self.rate / proxies
        fallback.burst = max(1.0, self.burst / proxies)
        fallback.set_share(self.share)

    def retry_after(self) -> int:
        if self.state == FAIL_CLOSED:
            return self.fallback.retry_after()
        return self.retry


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
