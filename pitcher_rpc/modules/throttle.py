"""``throttle``: proxy-wide rate and concurrency limits, and per-business quotas.

    [modules.throttle]
    rate = 1000            # requests per second for the whole proxy
    burst = 200            # requests that may come at once above the rate (default: rate)
    concurrency = 500      # requests in flight in the whole proxy
    mode = "enforce"       # or "detect": count what would be refused, refuse nothing

    [modules.throttle.business.shop]      # routes say `business = "shop"`
    rate = 300
    burst = 50
    concurrency = 100
    reserved = 0.2         # a share of the proxy-wide rate only this business may use

Every key is optional; a limit that is not set is not enforced. A request
passes, in order: its business's concurrency, the proxy's concurrency (a
request refused there costs no token), its business's rate, then the
proxy's rate, where a business with a
``reserved`` share first draws on its own reserve and then on the common
pool (the proxy-wide rate minus every reserve). So a business flooding the
proxy exhausts its own quota and at most the common pool; another business's
quota and reserve stay whole.

A refusal is cheap and happens before any backend work (after routing, which
tells the business): 429 with ``Retry-After`` (seconds until the bucket has a
token) for a rate, 503 with ``Retry-After: 1`` for concurrency.

With several workers every limit holds for the proxy as a whole: each worker
enforces a share, and the master moves the shares with the load every 0.1 s
(pitcher_rpc.degrade.shares). A concurrency limit is at least 1 per worker.

A rate may hold for a fleet of proxies instead, shared through Redis:

    [modules.throttle]
    rate = 1000
    scope = "fleet"        # "proxy" (the default) or "fleet"
    redis = "redis://127.0.0.1:6379/0"
    fail = "open"          # Redis down or slow: "open" admits, "closed" enforces
                           # this proxy's share of the rate locally
    batch = 50             # most tokens a worker takes at once (default: 50 ms of
                           # the rate, at most the burst); the fleet's bound grows with it
    redis_prefix = "pitcher"   # the keys' prefix (a hash tag: {pitcher}:rate)
    redis_timeout = 0.25   # seconds; a refill not answered by then is a failure

    [modules.throttle.business.shop]
    rate = 300
    scope = "fleet"        # a business takes the module's scope and fail unless it says

Tokens are taken from Redis in batches in the background and spent locally;
a request never waits for Redis (pitcher_rpc.fleet.redis_limits,
docs/fleet-limits.md). Concurrency limits always hold per proxy.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from ..degrade.limits import Bucket, FleetBucket, Gate, TokenBucket
from .base import Answer, AnyRecord, Module

log = logging.getLogger("pitcher.throttle")
# Final: compiled, a C static rather than a look-up in the module's dict.
_monotonic: Final = time.monotonic

_LIMIT_KEYS: Final = ("rate", "burst", "concurrency")
_SCOPE_KEYS: Final = ("scope", "fail", "batch")
_REDIS_KEYS: Final = ("redis", "redis_prefix", "redis_timeout")
_NAME: Final = "throttle"
_INSTALL: Final = "pip install 'pitcher-rpc[fleet]'"


def _number(settings: Mapping[str, Any], key: str, where: str, integer: bool = False) -> Any:
    value = settings.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ValueError(f"{where}{key} must be a {'whole ' if integer else ''}number")
    if value <= 0:
        raise ValueError(f"{where}{key} must be positive, got {value}")
    return value


def _limits(section: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = set(section) - set(allowed)
    if unknown:
        raise ValueError(f"{where}unknown key {sorted(unknown)[0]!r}")
    checked: dict[str, Any] = {
        "rate": _number(section, "rate", where),
        "burst": _number(section, "burst", where),
        "concurrency": _number(section, "concurrency", where, integer=True),
    }
    if checked["burst"] is not None and checked["rate"] is None:
        raise ValueError(f"{where}burst needs a rate")
    if checked["rate"] is not None and checked["burst"] is None:
        checked["burst"] = max(1.0, float(checked["rate"]))
    if checked["burst"] is not None and checked["burst"] < 1:
        raise ValueError(f"{where}burst must be at least 1")
    return checked


def _choice(section: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> Any:
    value = section.get(key)
    if value is not None and value not in allowed:
        spelled = " or ".join(f'"{choice}"' for choice in allowed)
        raise ValueError(f"{where}{key} must be {spelled}, got {value!r}")
    return value


def _batch(section: Mapping[str, Any], where: str, limits: Mapping[str, Any]) -> int | None:
    batch = _number(section, "batch", where, integer=True)
    if batch is not None:
        if limits["scope"] != "fleet":
            raise ValueError(f'{where}batch applies to scope = "fleet" only')
        if limits["burst"] is not None and batch > limits["burst"]:
            raise ValueError(f"{where}batch must not exceed the burst ({limits['burst']:g})")
    return batch


def _redis(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The module's Redis settings, checked (the client is looked for, not imported)."""
    url = settings.get("redis")
    if url is None:
        raise ValueError('scope = "fleet" needs redis = "redis://HOST:PORT/DB"')
    if not isinstance(url, str):
        raise ValueError("redis must be a URL string")
    prefix = settings.get("redis_prefix", "pitcher")
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{} \t\n"):
        raise ValueError("redis_prefix must be a non-empty string without braces or spaces")
    timeout = settings.get("redis_timeout", 0.25)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 10:
        raise ValueError(f"redis_timeout must be seconds in (0, 10], got {timeout!r}")
    # Imported only now: a proxy without a fleet limit never loads the fleet layer.
    from ..fleet.redis_limits import check_url

    check_url(url)
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f'scope = "fleet" needs the Redis client, not installed: {_INSTALL}')
    return {"redis": url, "redis_prefix": prefix, "redis_timeout": float(timeout)}


def _bucket(
    key: str,
    rate: float,
    burst: float,
    now: float,
    fleet: bool,
    fail_closed: bool,
    fleet_buckets: list[FleetBucket],
    batch: int = 0,
) -> Bucket:
    if not fleet:
        return TokenBucket(rate, burst, now)
    bucket = FleetBucket(key, rate, burst, now, fail_closed, batch)
    fleet_buckets.append(bucket)
    return bucket


class _Business:
    __slots__ = ("bucket", "gate", "gates", "name", "rate_reason", "reserve")

    def __init__(self, name: str) -> None:
        self.name = name
        self.bucket: Bucket | None = None
        self.gate: Gate | None = None
        self.reserve: Bucket | None = None
        # The gates a request of this business passes, in order.
        self.gates: tuple[Gate, ...] = ()
        self.rate_reason = f"{name}:rate"


class Throttle(Module):
    name = _NAME
    # Early: a refused request should cost as little as possible.
    priority = 900
    essential = True

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        own = ("mode", "business", *_SCOPE_KEYS, *_REDIS_KEYS)
        checked = _limits(
            {k: v for k, v in settings.items() if k not in own},
            "",
            _LIMIT_KEYS,
        )
        mode = settings.get("mode", "enforce")
        if mode not in ("enforce", "detect"):
            raise ValueError(f'mode must be "enforce" or "detect", got {mode!r}')
        checked["mode"] = mode
        scope = _choice(settings, "scope", "", ("proxy", "fleet")) or "proxy"
        fail = _choice(settings, "fail", "", ("open", "closed")) or "open"
        checked["scope"], checked["fail"] = scope, fail
        checked["batch"] = _batch(settings, "", checked)
        fleet_rates = 0
        if scope == "fleet" and checked["rate"] is not None:
            fleet_rates += 1
        businesses = settings.get("business", {})
        if not isinstance(businesses, Mapping):
            raise ValueError("business must be a table of business names")
        checked_businesses = {}
        reserved_total = 0.0
        for name, section in businesses.items():
            where = f"business.{name}."
            if not isinstance(section, Mapping):
                raise ValueError(f"business.{name} must be a table")
            limits = _limits(
                {k: v for k, v in section.items() if k not in _SCOPE_KEYS},
                where,
                (*_LIMIT_KEYS, "reserved"),
            )
            limits["scope"] = _choice(section, "scope", where, ("proxy", "fleet")) or scope
            limits["fail"] = _choice(section, "fail", where, ("open", "closed")) or fail
            limits["batch"] = _batch(section, where, limits)
            if limits["scope"] == "fleet":
                if limits["rate"] is None:
                    raise ValueError(
                        f'{where}scope = "fleet" shares a rate: set rate'
                        " (concurrency limits hold per proxy)"
                    )
                fleet_rates += 1
            reserved = section.get("reserved")
            if reserved is not None:
                if isinstance(reserved, bool) or not isinstance(reserved, int | float):
                    raise ValueError(f"{where}reserved must be a number between 0 and 1")
                if not 0 < reserved < 1:
                    raise ValueError(f"{where}reserved must be between 0 and 1, got {reserved}")
                if checked["rate"] is None:
                    raise ValueError(f"{where}reserved is a share of the proxy's rate: set rate")
                reserved_total += reserved
            limits["reserved"] = reserved
            checked_businesses[name] = limits
        if reserved_total >= 1:
            raise ValueError(f"the reserved shares add up to {reserved_total:g}; must be below 1")
        checked["business"] = checked_businesses
        if scope == "fleet" and not fleet_rates:
            raise ValueError(
                'scope = "fleet" shares a rate: set rate (concurrency limits hold per proxy)'
            )
        if fleet_rates:
            checked.update(_redis(settings))
        elif any(settings.get(key) is not None for key in _REDIS_KEYS):
            raise ValueError('redis settings apply to scope = "fleet" only (set scope)')
        return checked

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = self.validate(settings)
        now = _monotonic()
        self.detect_only = checked["mode"] == "detect"
        concurrency = checked["concurrency"]
        self.gate = Gate(concurrency, "proxy:concurrency") if concurrency else None
        self._gates: tuple[Gate, ...] = (self.gate,) if self.gate is not None else ()
        rate, burst = checked["rate"], checked["burst"]
        common = 1.0 - sum(limits["reserved"] or 0.0 for limits in checked["business"].values())
        fleet: list[FleetBucket] = []
        proxy_fleet = checked["scope"] == "fleet"
        proxy_closed = checked["fail"] == "closed"
        self.pool = (
            _bucket(
                "rate",
                rate * common,
                max(1.0, burst * common),
                now,
                proxy_fleet,
                proxy_closed,
                fleet,
                checked["batch"] or 0,
            )
            if rate
            else None
        )
        self.businesses: dict[str, _Business] = {}
        for name, limits in checked["business"].items():
            business = self.businesses[name] = _Business(name)
            if limits["rate"]:
                business.bucket = _bucket(
                    f"{name}.rate",
                    limits["rate"],
                    limits["burst"],
                    now,
                    limits["scope"] == "fleet",
                    limits["fail"] == "closed",
                    fleet,
                    limits["batch"] or 0,
                )
            if limits["concurrency"]:
                business.gate = Gate(limits["concurrency"], f"{name}:concurrency")
            business.gates = (
                *((business.gate,) if business.gate is not None else ()),
                *self._gates,
            )
            if limits["reserved"]:
                share = limits["reserved"]
                business.reserve = _bucket(
                    f"{name}.reserve",
                    rate * share,
                    max(1.0, burst * share),
                    now,
                    proxy_fleet,
                    proxy_closed,
                    fleet,
                )
        # The refiller of the fleet's buckets; the fleet layer is imported only for one.
        self.fleet: Any = None
        if fleet:
            from ..fleet.redis_limits import RedisLimits

            self.fleet = RedisLimits(
                checked["redis"], checked["redis_prefix"], fleet, checked["redis_timeout"]
            )
        self.admitted = 0
        self.refused: Counter[str] = Counter()
        self.would_refuse: Counter[str] = Counter()
        self._logged = 0.0
        self._demand_at = now

    # the hot path ---------------------------------------------------------------------

    def after_cluster(self, exchange: AnyRecord) -> Answer | None:
        # AFTER_CLUSTER runs once a route has taken the request.
        route = exchange.route
        business = self.businesses.get(route.business) if route is not None else None
        detect = self.detect_only
        # Concurrency first (a refusal then costs no token), business then proxy.
        gates = self._gates if business is None else business.gates
        reason = ""
        entered = 0
        for gate in gates:
            # In detect mode a full gate still counts the request (force), so
            # the in-flight numbers stay true; the refusal is only counted.
            if not gate.enter(detect):
                reason = gate.reason
                if not detect:
                    break
            entered += 1
        refused_by: Bucket | None = None
        taken: Bucket | None = None
        if not reason:
            now = _monotonic()
            if business is not None and business.bucket is not None:
                if business.bucket.take(now):
                    taken = business.bucket
                else:
                    reason, refused_by = business.rate_reason, business.bucket
            pool = self.pool
            if not reason and pool is not None:
                reserve = business.reserve if business is not None else None
                if (reserve is None or not reserve.take(now)) and not pool.take(now):
                    reason, refused_by = "proxy:rate", pool
        if reason:
            if not detect:
                for gate in gates[:entered]:
                    gate.leave()
                if taken is not None:
                    taken.give_back()
                self.refused[reason] += 1
                return _answer(refused_by)
            self._would_refuse(reason)
        self.admitted += 1
        if gates:
            state = exchange.module_state
            if state is None:
                exchange.module_state = {_NAME: gates}
            else:
                state[_NAME] = gates
        return None

    def _would_refuse(self, reason: str) -> None:
        self.would_refuse[reason] += 1
        now = _monotonic()
        if now - self._logged >= 1.0:
            self._logged = now
            log.info("detect mode: would refuse a request (%s); counted, not refused", reason)

    def request_finish(self, exchange: AnyRecord) -> None:
        state = exchange.module_state
        if state is not None:
            # Typed: compiled, the loop and leave() are native calls.
            held: tuple[Gate, ...] | None = state.pop(_NAME, None)
            if held:
                for gate in held:
                    gate.leave()

    # proxy-wide shares ----------------------------------------------------------------

    def _limits(self) -> dict[str, Gate | Bucket]:
        limits: dict[str, Gate | Bucket | None] = {"rate": self.pool, "concurrency": self.gate}
        for name, business in self.businesses.items():
            limits[f"{name}.rate"] = business.bucket
            limits[f"{name}.reserve"] = business.reserve
            limits[f"{name}.concurrency"] = business.gate
        return {key: limit for key, limit in limits.items() if limit is not None}

    def demand(self) -> dict[str, tuple[float, float]]:
        now = _monotonic()
        elapsed = max(now - self._demand_at, 1e-3)
        self._demand_at = now
        demand = {}
        for key, limit in self._limits().items():
            if isinstance(limit, Gate):
                demand[key] = (limit.demand(), float(limit.limit))
            else:
                # Requests per second that asked, against the proxy-wide rate.
                demand[key] = (limit.asked / elapsed, limit.rate)
                limit.asked = 0
        return demand

    def set_shares(self, shares: Mapping[str, float]) -> None:
        default = shares.get("*")
        for key, limit in self._limits().items():
            share = shares.get(key, default)
            if share is not None:
                limit.set_share(share)

    def stats(self) -> dict[str, Any]:
        limits = self._limits()
        return {
            "mode": "detect" if self.detect_only else "enforce",
            "admitted": self.admitted,
            "refused": dict(self.refused),
            "would_refuse": dict(self.would_refuse),
            "in_flight": {k: g.in_flight for k, g in limits.items() if isinstance(g, Gate)},
            "shares": {key: round(limit.share, 4) for key, limit in limits.items()},
            **({"fleet": self.fleet.stats()} if self.fleet is not None else {}),
        }

    async def aclose(self) -> None:
        if self.fleet is not None:
            await self.fleet.aclose()


def _answer(bucket: Bucket | None) -> Answer:
    if bucket is None:
        return Answer(503, "too many requests in flight", ((b"retry-after", b"1"),))
    retry = str(bucket.retry_after()).encode()
    return Answer(429, "rate limit exceeded", ((b"retry-after", retry),))
