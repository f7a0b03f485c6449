"""Rate limits shared by a fleet of proxies through Redis: tokens in batches, spent locally.

Each worker of each proxy holds a :class:`~pitcher_rpc.degrade.limits.FleetBucket`
per shared rate. A request spends a token it holds (no I/O, no wait); the
:class:`RedisLimits` of the worker takes more from Redis in the background
when what it holds falls below a low-water mark, one round trip for all its
buckets. The bucket itself lives in Redis: one Lua script (:data:`SCRIPT`)
refills it on the server's clock (TIME), grants what it has up to the batch
asked for, and lets the key expire (PEXPIRE) once it would be full again.

Batches follow demand: a worker asks for the tokens it spent over the last
:data:`HORIZON` seconds, between a quarter of and a whole ``max_batch``
(``HORIZON`` seconds of the fleet's rate, never more than its burst), and
never holds more than two batches. So over any time T the fleet admits at
most ``rate * T + burst + 2 * max_batch * workers`` (docs/fleet-limits.md).

Until Redis first answers, and while it is down, refusing or slower than
``timeout``, every bucket is in its fail mode (admit everything, or enforce
this proxy's share of the rate locally); a failure is logged once per
streak, and the refiller tries again with a backoff; the first answer puts
the buckets on the fleet's tokens. The fleet's size, for that share, is
counted in Redis: each worker says every second which part of its proxy's
traffic it has (the master's share), and those parts add up to the number
of proxies.

redis-py is imported when the first refill runs, never by a proxy without
a fleet limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..degrade.limits import FAIL_CLOSED, FLEET, STATE_NAMES, FleetBucket

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("pitcher.fleet")

# Seconds of demand a batch covers, and of the fleet's rate the largest batch is.
HORIZON = 0.05
# Seconds between two heartbeats (presence in the fleet; a probe while Redis is away).
HEARTBEAT = 1.0
# A worker not heard from for this long no longer counts in the fleet (ms).
MEMBER_TTL_MS = 5000
# Backoff between attempts while Redis is away (seconds), doubling.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 0.5
INSTALL = "pip install 'pitcher-rpc[fleet]'"

SCRIPT = """
-- KEYS: the buckets to refill, then the fleet's member hash if ARGV[1] is not ''.
-- ARGV[1] this worker's member name ('' for no heartbeat), ARGV[2] its share of
-- its proxy (0..1), ARGV[3] ms a member counts without a heartbeat; then per
-- bucket: rate (tokens per second), burst, tokens wanted.
-- Answers {granted, ms until the missing tokens are there} per bucket, then
-- {proxies * 1000, workers} for a heartbeat.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local member = ARGV[1]
local buckets = #KEYS
if member ~= '' then buckets = buckets - 1 end
local answer = {}
for i = 1, buckets do
  local at = 3 + (i - 1) * 3
  local rate = tonumber(ARGV[at + 1])
  local burst = tonumber(ARGV[at + 2])
  local want = tonumber(ARGV[at + 3])
  local state = redis.call('HMGET', KEYS[i], 't', 's')
  local tokens = tonumber(state[1])
  local stamp = tonumber(state[2])
  if tokens == nil or stamp == nil then
    tokens = burst
  elseif now > stamp then
    tokens = tokens + (now - stamp) * rate / 1000
  end
  if tokens > burst then tokens = burst end
  local granted = math.floor(tokens)
  if granted > want then granted = want end
  if granted < 0 then granted = 0 end
  tokens = tokens - granted
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 's', tostring(now))
  -- A missing key is a full bucket: it may go once it would be full again.
  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - tokens) * 1000 / rate) + 1000)
  local wait = 0
  if granted < want then wait = math.ceil((want - granted - tokens) * 1000 / rate) end
  answer[i] = {granted, wait}
end
if member ~= '' then
  local key = KEYS[#KEYS]
  local ttl = tonumber(ARGV[3])
  redis.call('HSET', key, member, tostring(now) .. ' ' .. ARGV[2])
  local proxies = 0
  local workers = 0
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local seen, share = string.match(fields[j + 1], '^(%S+) (%S+)$')
    if seen == nil or now - tonumber(seen) > ttl then
      redis.call('HDEL', key, fields[j])
    else
      proxies = proxies + tonumber(share)
      workers = workers + 1
    end
  end
  redis.call('PEXPIRE', key, ttl)
  answer[buckets + 1] = {math.floor(proxies * 1000 + 0.5), workers}
end
return answer
"""


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs, stats and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def check_url(url: str) -> str:
    """The Redis URL if redis-py can use it; ValueError naming what is wrong."""
    parts = urlsplit(url)
    shown = redacted(url)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(f"redis: {shown!r} names no host (redis://HOST:PORT/DB)")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(f"redis: {shown!r} has a bad port") from None
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"redis: {shown!r}: the path is a database number")
        return url
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"redis: {shown!r} names no socket path (unix:///path?db=0)")
        return url
    raise ValueError(f"redis must be a redis://, rediss:// or unix:// URL, got {shown!r}")


def max_batch(rate: float, burst: float) -> int:
    """The most tokens a worker takes at once: HORIZON seconds of the rate, within the burst."""
    return max(1, min(math.floor(burst), math.ceil(rate * HORIZON)))


class _Refill:
    """What the refiller knows of one bucket between two refills."""

    __slots__ = ("bucket", "max_batch", "not_before", "refills", "requested_at", "stamp")

    def __init__(self, bucket: FleetBucket, now: float) -> None:
        self.bucket = bucket
        self.max_batch = bucket.max_batch or max_batch(bucket.rate, bucket.burst)
        # Redis said the fleet's bucket has too few tokens until then.
        self.not_before = 0.0
        self.refills = 0
        self.requested_at = bucket.requested
        self.stamp = now

    def want(self, now: float, round_trip: float) -> int:
        """Tokens to ask for: the demand of the last HORIZON seconds, within the batch limits.

        Also sets the low-water mark: half a batch, or what the demand spends
        in two round trips to Redis if that is more (at most a whole batch),
        so the next refill is back before the tokens run out.
        """
        bucket = self.bucket
        elapsed = max(now - self.stamp, 1e-3)
        demand = (bucket.requested - self.requested_at) / elapsed
        self.requested_at = bucket.requested
        self.stamp = now
        largest = self.max_batch
        batch = min(largest, max(largest // 4, 1, math.ceil(demand * HORIZON)))
        ahead = math.ceil(demand * 2 * round_trip)
        bucket.low_water = min(largest, max((batch + 1) // 2, ahead))
        # Never more than two whole batches held: the bound in the docstring above.
        return max(0, min(batch, 2 * largest - bucket.held))


class RedisLimits:
    """One worker's refiller for the fleet buckets of one throttle module."""

    def __init__(
        self,
        url: str,
        prefix: str,
        buckets: Sequence[FleetBucket],
        timeout: float,
    ) -> None:
        self.url = url
        # What logs and stats show: never the password.
        self.shown = redacted(url)
        self.timeout = timeout
        now = time.monotonic()
        self._refills = [_Refill(bucket, now) for bucket in buckets]
        self._keys = [f"{{{prefix}}}:{bucket.key}" for bucket in buckets]
        self._members_key = f"{{{prefix}}}:workers"
        self.member = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        for bucket in buckets:
            bucket.wake = self.wake
            # The first refill is asked for at once, before any request.
            bucket.woken = True
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None
        self._sha = ""
        self._closed = False
        self._next_heartbeat = 0.0
        # Redis failed and has not answered since: when, and the next attempt.
        self.down_since = 0.0
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST
        self.errors = 0
        self.last_error = ""
        self.outages = 0
        self.proxies = 0.0
        self.workers = 0
        # Smoothed seconds of a refill's round trip; when the call on its way was sent.
        self.round_trip = 0.001
        self._sent_at = 0.0
        # Redis has answered once (until then every bucket is in its fail mode).
        self.answered = False
        self.start()

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Start refilling, if an event loop runs (else at the first wake)."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="pitcher-fleet-limits")

    def wake(self) -> None:
        """A bucket fell below its low-water mark."""
        if self._task is None:
            self.start()
        self._event.set()

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end refills for good
                log.exception("fleet limits: the refill loop failed")
                self._failed(exc)
                await asyncio.sleep(BACKOFF_FIRST)

    async def _turn(self) -> None:
        """One refill, or a wait for the next reason to make one."""
        now = time.monotonic()
        heartbeat = now >= self._next_heartbeat
        due = [r for r in self._refills if r.bucket.woken and r.not_before <= now]
        if self.down_since:
            # Away: try again with everything, once the backoff has passed.
            due = self._refills if now >= self._retry_at else []
            heartbeat = bool(due)
        if due or heartbeat:
            await self._call(due, heartbeat)
            return
        wake_at = self._next_heartbeat
        if self.down_since:
            wake_at = min(wake_at, self._retry_at)
        for refill in self._refills:
            if refill.bucket.woken:
                wake_at = min(wake_at, refill.not_before)
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.001, wake_at - now))

    async def _call(self, due: Sequence[_Refill], heartbeat: bool) -> None:
        now = time.monotonic()
        wants = [refill.want(now, self.round_trip) for refill in due]
        keys = [self._keys[self._refills.index(refill)] for refill in due]
        args: list[Any] = [self.member if heartbeat else "", f"{self._share():.6f}", MEMBER_TTL_MS]
        for refill, want in zip(due, wants, strict=True):
            args += [repr(refill.bucket.rate), repr(refill.bucket.burst), want]
        if heartbeat:
            keys.append(self._members_key)
            self._next_heartbeat = now + HEARTBEAT
        self._sent_at = now
        try:
            answer = await asyncio.wait_for(self._evalsha(keys, args), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of Redis or the client is a fail-mode streak
            self._failed(exc)
            return
        finally:
            self._sent_at = 0.0
        sent, now = now, time.monotonic()
        self.round_trip += 0.2 * (now - sent - self.round_trip)
        if self.down_since:
            self._recovered(now)
        elif not self.answered:
            # The first answer: the fail mode held until now, the fleet's tokens from now on.
            for refill in self._refills:
                refill.bucket.state = FLEET
        self.answered = True
        for refill, want, (granted, wait_ms) in zip(due, wants, answer, strict=False):
            bucket = refill.bucket
            refill.refills += 1
            bucket.held += int(granted)
            if granted < want:
                wait = int(wait_ms) / 1000.0
                refill.not_before = now + wait
                # Retry-After: when the fleet has a token again (not a whole batch).
                bucket.retry = max(1, math.ceil(min(wait, 1.0 / bucket.rate)))
            else:
                refill.not_before = 0.0
                bucket.retry = 1
            bucket.woken = bucket.held < bucket.low_water
        if heartbeat and len(answer) > len(due):
            proxies, workers = answer[len(due)]
            self.proxies = int(proxies) / 1000.0
            self.workers = int(workers)
            for refill in self._refills:
                refill.bucket.set_proxies(self.proxies)

    def _share(self) -> float:
        # This worker's part of its proxy's traffic: the parts add up to the proxies.
        return self._refills[0].bucket.share if self._refills else 1.0

    async def _evalsha(self, keys: list[str], args: list[Any]) -> list[list[int]]:
        client = self._client
        if client is None:
            client = self._client = _connect(self.url, self.timeout)
        from redis.exceptions import NoScriptError

        if not self._sha:
            self._sha = str(await client.script_load(SCRIPT))
        try:
            answer = await client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): its script cache is empty.
            self._sha = str(await client.script_load(SCRIPT))
            answer = await client.evalsha(self._sha, len(keys), *keys, *args)
        return list(answer)

    # ------------------------------------------------------------------ fail modes

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.errors += 1
        self.last_error = _describe(exc)
        self._retry_at = now + self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if self.down_since:
            return
        self.down_since = now
        self.outages += 1
        modes = set()
        for refill in self._refills:
            bucket = refill.bucket
            if bucket.state == FLEET:
                bucket.fallback.refill_from(bucket.held, now)
            bucket.held = 0
            bucket.woken = False
            bucket.state = bucket.fail_state
            modes.add(
                f"closed (this proxy's share, 1/{max(1.0, self.proxies):.3g} of the rate)"
                if bucket.fail_state == FAIL_CLOSED
                else "open (admitting every request)"
            )
        log.warning(
            "fleet limits: Redis at %s failed (%s); fail %s until it answers again",
            self.shown,
            self.last_error,
            " and ".join(sorted(modes)),
        )

    def _recovered(self, now: float) -> None:
        away = now - self.down_since
        self.down_since = 0.0
        self._backoff = BACKOFF_FIRST
        unchecked = 0
        for refill in self._refills:
            bucket = refill.bucket
            unchecked += bucket.unchecked
            bucket.state = FLEET
            bucket.held = 0
            refill.not_before = 0.0
        log.warning(
            "fleet limits: Redis at %s answers again after %.1f s; the fleet's rate holds again"
            " (admitted unchecked so far: %d)",
            self.shown,
            away,
            unchecked,
        )

    # ------------------------------------------------------------------ reports

    def stats(self) -> dict[str, Any]:
        limits = {}
        for refill in self._refills:
            bucket = refill.bucket
            limits[bucket.key] = {
                "mode": STATE_NAMES[bucket.state],
                "fail": STATE_NAMES[bucket.fail_state],
                "held": bucket.held,
                "low_water": bucket.low_water,
                "max_batch": refill.max_batch,
                "refills": refill.refills,
                "unchecked": bucket.unchecked,
                "fallback_rate": round(bucket.fallback.rate * bucket.share, 3),
            }
        return {
            "redis": self.shown,
            "connected": not self.down_since and self._client is not None,
            "waiting": round(time.monotonic() - self._sent_at, 3) if self._sent_at else 0.0,
            "errors": self.errors,
            "last_error": self.last_error,
            "outages": self.outages,
            "proxies": self.proxies,
            "workers": self.workers,
            "limits": limits,
        }

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing a client whose server is gone
                log.debug("closing the Redis client failed", exc_info=True)


def _connect(url: str, timeout: float) -> Redis:
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:  # checked by validate(); a file changed under a running proxy
        raise RuntimeError(f'scope = "fleet" needs the Redis client: {INSTALL}') from exc
    # No retries inside the client: a failed call is a fail-mode decision here,
    # and the next attempt comes with the backoff, never blocking a request.
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        client_name="pitcher-fleet-limits",
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
