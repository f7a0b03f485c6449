"""The live status page on the master's admin listener, and the JSON it polls.

    GET /               the page: one self-contained HTML document, no token needed
                        (it holds no data; it asks for the token the JSON needs)
    GET /admin/status   everything the page shows, as JSON (docs/status.md lists the fields)

The numbers come from what the master already has: each worker's ``status``
and ``modules`` answers, the health book, the run-time node changes and the
configuration. Rates and percentiles are worked out in
:mod:`.status_book`, which the sampler here feeds every ``SAMPLE_INTERVAL``
seconds for the page's sparklines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from transports.native import describe as describe_build

from .admin import AdminRequest, AdminResponse, AdminServer
from .status_book import Delta, StatusBook, microseconds, percentile, table

if TYPE_CHECKING:
    from .master import Master

__all__ = ["build_report", "page", "register"]

log = logging.getLogger("pitcher.master")

_PAGE_HEADERS = (
    ("content-type", "text/html; charset=utf-8"),
    # The page loads nothing from elsewhere; saying so means an injected string could not either.
    (
        "content-security-policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
        " img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
)
# Health book states as an operator says them.
_STATES = {"healthy": "in_service", "slow_start": "ramping"}


def page() -> bytes:
    """The page, shipped inside the package (setup.py's package_data)."""
    return resources.files("pitcher_rpc.process").joinpath("status_page.html").read_bytes()


def register(admin: AdminServer, master: Master) -> None:
    """Serve the page and /admin/status, and start sampling (the task ends with the master)."""
    book = StatusBook()
    started = time.time()

    async def sample() -> None:
        while not (master.stopping.is_set() or master.draining):
            try:
                book.record(await master._each("status"), time.monotonic(), time.time())
            except Exception:  # a missed sample is a gap in a chart, never a stopped ring
                log.exception("status sample failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(book.interval):
                    await master.stopping.wait()

    task = asyncio.get_running_loop().create_task(sample(), name="pitcher-status-sampler")
    # The master cancels its watchers when it shuts down; the sampler is one of them.
    master._watchers.add(task)
    task.add_done_callback(master._watchers.discard)

    async def shell(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, page(), _PAGE_HEADERS)

    async def status(request: AdminRequest) -> AdminResponse:
        statuses, modules = await asyncio.gather(master._each("status"), master._each("modules"))
        now = time.monotonic()
        seconds, delta = book.window(statuses, now)
        report = build_report(master, statuses, modules, seconds, delta, now)
        report["proxy"].update(pid=os.getpid(), started=round(started, 3), build=describe_build())
        report["history"] = book.history()
        return AdminResponse(200, report)

    admin.route("GET", "/", shell, "the status page (HTML; its data comes from /admin/status)")
    admin.route(
        "GET", "/admin/status", status, "what the status page shows, with five minutes of trends"
    )


def build_report(
    master: Master,
    statuses: Sequence[Mapping[str, Any]],
    modules: Sequence[Mapping[str, Any]],
    seconds: float,
    delta: Delta,
    now: float,
) -> dict[str, Any]:
    """The JSON of /admin/status but its history (see docs/status.md)."""
    config = master.config
    per = 1.0 / seconds if seconds > 0 else 0.0
    alive = [s for s in statuses if "error" not in s]
    host, port = master.admin.address
    routes = [_route(name, delta, per) for name in _route_names(config, delta)]
    by_name = {route["name"]: route for route in routes}
    for route in config.routes:
        by_name[route.name].update(
            prefix=route.prefix, host=route.host, cluster=route.cluster, business=route.business
        )
    return {
        "time": round(time.time(), 3),
        "window": round(seconds, 3),
        "proxy": {
            "address": master.address,
            "admin": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "draining": master.draining,
            "workers": len(master.slots),
            "workers_answering": len(alive),
            "rps": round(delta.requests * per, 3),
            "gc_pauses_per_second": round(delta.gc_count * per, 3),
        },
        "config": {
            "path": master.config_path,
            "checksum": config.checksum,
            "generation": master.generation,
            "reloads": master.generation - 1,
            "run_time_changes": len(master.overlay.changes_json()),
            "workers_current": sum(1 for s in alive if s.get("checksum") == config.checksum),
        },
        "routes": routes,
        "clusters": _clusters(master, alive, delta, per, now),
        "throttle": _throttle(config, alive, delta, per, by_name),
        "workers": _workers(master, statuses, delta, per),
        "modules": _modules(modules),
    }


def _route_names(config: Any, delta: Delta) -> list[str]:
    names = [route.name for route in config.routes]
    # Requests no route took (404s) and routes a reload removed, while they still count.
    return names + sorted(name for name in delta.routes if name not in names)


def _route(name: str, delta: Delta, per: float) -> dict[str, Any]:
    total, client, server, counts = delta.routes.get(name, (0, 0, 0, []))
    row: dict[str, Any] = {
        "name": name,
        "prefix": None,
        "host": None,
        "cluster": None,
        "business": None,
        "rps": round(total * per, 3),
        "error_rate": round(server / total, 4) if total else 0.0,
        "client_error_rate": round(client / total, 4) if total else 0.0,
    }
    for key, quantile in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        row[key] = microseconds(percentile(delta.bounds, counts, quantile) if counts else None)
    return row


def _clusters(
    master: Master,
    statuses: Sequence[Mapping[str, Any]],
    delta: Delta,
    per: float,
    now: float,
) -> list[dict[str, Any]]:
    config = master.config
    live = _node_gauges(statuses)
    health = master.coordination.health.describe(now)
    draining = master.overlay.draining(config)
    wall = time.time()
    described = []
    for name, cluster in config.clusters.items():
        routed = [r.name for r in config.routes if r.cluster == name]
        total = server = 0
        counts: list[int] = []
        for route in routed:
            numbers = delta.routes.get(route)
            if numbers is None:
                continue
            total += numbers[0]
            server += numbers[2]
            counts = _added(counts, numbers[3])
        book = health.get(name)
        book_nodes: Mapping[str, Any] = book["nodes"] if book else {}
        nodes = []
        for node in cluster.nodes:
            known = book_nodes.get(node.uri)
            state = "in_service"
            factor = 1.0
            ejected_for = 0.0
            if known is not None:
                state = _STATES.get(known["state"], known["state"])
                factor = float(known["factor"])
                ejected_for = float(known["ejected_for"])
            if node.uri in draining.get(name, ()):
                state = "draining"
            nodes.append(
                {
                    "uri": node.uri,
                    "weight": node.weight,
                    "state": state,
                    "factor": factor,
                    "ejected_for": ejected_for,
                    "ejected_until": round(wall + ejected_for, 3) if ejected_for else None,
                    **_node_numbers(name, node.uri, delta, per, live),
                }
            )
        # A drained node has left the cluster's nodes; its calls in flight finish.
        listed = {node["uri"] for node in nodes}
        for uri in draining.get(name, ()):
            if uri not in listed:
                nodes.append(
                    {
                        "uri": uri,
                        "weight": 0,
                        "state": "draining",
                        "factor": 0.0,
                        "ejected_for": 0.0,
                        "ejected_until": None,
                        **_node_numbers(name, uri, delta, per, live),
                    }
                )
        described.append(
            {
                "name": name,
                "balance": cluster.balance,
                "routes": routed,
                "rps": round(total * per, 3),
                "error_rate": round(server / total, 4) if total else 0.0,
                "p99": microseconds(percentile(delta.bounds, counts, 0.99) if counts else None),
                "health": book is not None,
                "panic": bool(book and book["panic"]),
                "detect_only": bool(book and book["detect_only"]),
                "in_service_share": book["in_service_share"] if book else 1.0,
                "events": dict(book["events"]) if book else {},
                "nodes": nodes,
            }
        )
    return described


def _node_gauges(statuses: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """(cluster, node URI) -> [calls in flight, open connections], all workers, as reported now."""
    gauges: dict[tuple[str, str], list[int]] = {}
    for status in statuses:
        nodes = table(table(table(status, "modules"), "metrics"), "nodes")
        for cluster, by_uri in nodes.items():
            for uri, numbers in by_uri.items():
                into = gauges.setdefault((str(cluster), str(uri)), [0, 0])
                into[0] += int(numbers.get("in_flight", 0))
                into[1] += int(numbers.get("connections", 0))
    return gauges


def _node_numbers(
    cluster: str,
    uri: str,
    delta: Delta,
    per: float,
    live: Mapping[tuple[str, str], list[int]],
) -> dict[str, Any]:
    """A node's calls per second, failures in the window, calls in flight and connections:
    null where the workers report no node numbers (the metrics module is off)."""
    gauges = live.get((cluster, uri))
    if gauges is None:
        return {"rps": None, "failures": None, "in_flight": None, "connections": None}
    calls, failures = delta.nodes.get((cluster, uri), (0, 0))
    return {
        "rps": round(calls * per, 3),
        "failures": failures,
        "failure_rate": round(failures / calls, 4) if calls else 0.0,
        "in_flight": gauges[0],
        "connections": gauges[1],
    }


def _throttle(
    config: Any,
    alive: Sequence[Mapping[str, Any]],
    delta: Delta,
    per: float,
    routes: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any] | None:
    settings = next((m.settings for m in config.modules if m.name == "throttle"), None)
    if settings is None:
        return None
    stats = [
        s["modules"]["throttle"]
        for s in alive
        if isinstance(table(s, "modules").get("throttle"), Mapping)
    ]
    in_flight: dict[str, int] = {}
    would_refuse: dict[str, int] = {}
    for report in stats:
        for key, count in (report.get("in_flight") or {}).items():
            in_flight[key] = in_flight.get(key, 0) + int(count)
        for key, count in (report.get("would_refuse") or {}).items():
            would_refuse[key] = would_refuse.get(key, 0) + int(count)

    def refused(owner: str) -> float:
        prefix = owner + ":"
        return round(sum(n for k, n in delta.refused.items() if k.startswith(prefix)) * per, 3)

    def would(owner: str) -> int:
        prefix = owner + ":"
        return sum(n for k, n in would_refuse.items() if k.startswith(prefix))

    businesses = []
    for name, limits in sorted((settings.get("business") or {}).items()):
        # Admitted is not counted per business by the module: its routes' answers less refusals.
        answered = sum(r["rps"] for r in routes.values() if r.get("business") == name)
        businesses.append(
            {
                "name": name,
                "rate": limits.get("rate"),
                "burst": limits.get("burst"),
                "concurrency": limits.get("concurrency"),
                "reserved": limits.get("reserved"),
                "in_flight": in_flight.get(f"{name}.concurrency"),
                "admitted_rps": round(max(0.0, answered - refused(name)), 3),
                "refused_rps": refused(name),
                "would_refuse": would(name),
            }
        )
    return {
        "mode": settings.get("mode", "enforce"),
        "enabled": any(report for report in stats),
        "admitted_rps": round(delta.admitted * per, 3),
        "refused_rps": round(sum(delta.refused.values()) * per, 3),
        "proxy": {
            "rate": settings.get("rate"),
            "burst": settings.get("burst"),
            "concurrency": settings.get("concurrency"),
            "in_flight": in_flight.get("concurrency"),
            "refused_rps": refused("proxy"),
            "would_refuse": would("proxy"),
        },
        "businesses": businesses,
    }


def _workers(
    master: Master, statuses: Sequence[Mapping[str, Any]], delta: Delta, per: float
) -> list[dict[str, Any]]:
    workers = []
    for slot, status in zip(master.slots, statuses, strict=True):
        row: dict[str, Any] = {"index": slot.index, "restarts": slot.restarts}
        if "error" in status:
            row["error"] = status["error"]
            workers.append(row)
            continue
        pid = int(status.get("pid", 0))
        requests, gc_count, gc_sum = delta.workers.get(pid, (0, 0, 0.0))
        overload, cap, gc = (table(status, key) for key in ("overload", "connection_cap", "gc"))
        pauses = [float(g.get("max", 0.0)) for g in gc.get("generations", ())]
        row.update(
            pid=pid,
            generation=status.get("generation"),
            config_current=status.get("checksum") == master.config.checksum,
            draining=bool(status.get("draining")),
            requests=int(status.get("requests", 0)),
            rps=round(requests * per, 3),
            connections=int(status.get("connections", 0)),
            connection_limit=cap.get("limit"),
            accept_paused=bool(cap.get("paused")),
            lag=float(overload.get("lag", 0.0)),
            overloaded=bool(overload.get("overloaded")),
            shed=list(overload.get("shed", ())),
            would_shed=list(overload.get("would_shed", ())),
            gc_pauses_per_second=round(gc_count * per, 3),
            gc_paused_share=round(gc_sum * per, 6),
            gc_max_pause=max(pauses, default=0.0),
        )
        workers.append(row)
    return workers


def _added(counts: list[int], more: Sequence[int]) -> list[int]:
    if not counts:
        return list(more)
    return (
        [a + b for a, b in zip(counts, more, strict=True)] if len(more) == len(counts) else counts
    )


def _modules(answers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each module once: on in how many workers, shed in how many, failures added up."""
    merged: dict[str, dict[str, Any]] = {}
    for answer in answers:
        if "error" in answer:
            continue
        for module in answer.get("modules", ()):
            name = str(module.get("name"))
            row = merged.setdefault(
                name,
                {
                    "name": name,
                    "priority": module.get("priority"),
                    "essential": bool(module.get("essential")),
                    "hooks": list(module.get("hooks", ())),
                    "workers": 0,
                    "enabled_workers": 0,
                    "shed_workers": 0,
                    "failures": 0,
                },
            )
            row["workers"] += 1
            row["enabled_workers"] += int(bool(module.get("enabled")))
            row["shed_workers"] += int(bool(module.get("shed")))
            row["failures"] += int(module.get("failures", 0))
    for row in merged.values():
        row["enabled"] = row["enabled_workers"] == row["workers"] and row["workers"] > 0
    return sorted(merged.values(), key=lambda row: (-(row["priority"] or 0), row["name"]))
