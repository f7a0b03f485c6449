"""What the admin commands print: the admin API's JSON answers as a few lines for people.

Pure functions, JSON in and lines out, so that ``cli.py`` only fetches and
prints, and each form is tested on answers taken from a running proxy. The
full answer stays one ``--json`` away; a table keeps what an operator acts
on (as ``kubectl get`` or HAProxy's ``show servers state``). Colour is a
flag: the caller decides it from the terminal and ``NO_COLOR``, and a colour
never changes a column's width.

An answer from another version of the proxy may lack a field: it shows as
``-``, never as a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

__all__ = [
    "Cell",
    "Outcome",
    "duration",
    "error_text",
    "module_outcome",
    "modules_table",
    "node_outcome",
    "nodes_table",
    "reload_outcome",
    "restart_outcome",
    "status_lines",
    "table",
    "workers_table",
]

GOOD = "green"
SOSO = "yellow"
BAD = "red"

# Out of service nodes named per cluster in `pitcher status` before "and N more".
_STATUS_NODES = 3


@dataclass(frozen=True, slots=True)
class Cell:
    text: str
    colour: str | None = None
    right: bool = False  # numbers line up on the right


@dataclass(slots=True)
class Outcome:
    """What a change printed: lines for stdout, and each problem as one line for stderr."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]], colour: bool) -> list[str]:
    """Aligned columns two spaces apart, a header first; no trailing spaces."""
    right = [any(row[i].right for row in rows) for i in range(len(header))]
    widths = [
        max([len(title)] + [len(row[i].text) for row in rows]) for i, title in enumerate(header)
    ]
    head = [Cell(title, None, right[i]) for i, title in enumerate(header)]
    lines = [_line(head, widths, "bold" if colour else None)]
    lines += [_line(row, widths, "cells" if colour else None) for row in rows]
    return lines


def _line(cells: Sequence[Cell], widths: Sequence[int], style: str | None) -> str:
    parts: list[str] = []
    last = len(cells) - 1
    for i, cell in enumerate(cells):
        text = cell.text
        if style == "bold":
            text = click.style(text, bold=True)
        elif style == "cells" and cell.colour:
            text = click.style(text, fg=cell.colour)
        pad = " " * (widths[i] - len(cell.text))
        if cell.right:
            parts.append(pad + text)
        else:
            parts.append(text if i == last else text + pad)
    return "  ".join(parts).rstrip()


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    return click.style(text, fg=colour) if enabled and colour else text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def duration(seconds: object) -> str:
    """0.0005 -> 0.5ms, 0.168 -> 168ms, 4.46 -> 4.5s; anything else -> -."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"


def _number(value: object) -> Cell:
    if isinstance(value, int) and not isinstance(value, bool):
        return Cell(str(value), None, True)
    return Cell("-", None, True)


def error_text(status: int, answer: object, text: str) -> str:
    """The admin API's own words for a refusal, else its status and the start of its answer."""
    if isinstance(answer, Mapping) and isinstance(answer.get("error"), str):
        return str(answer["error"])
    first = text.strip().splitlines()[0][:200] if text.strip() else "an empty answer"
    return f"the admin API answered {status}: {first}"


def _workers(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    workers = answer.get("workers")
    return [w for w in workers if isinstance(w, Mapping)] if isinstance(workers, list) else []


def _worker_problems(workers: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"worker {w.get('index', '?')}: {w['error']}" for w in workers if "error" in w]


def _generation(workers: Sequence[Mapping[str, Any]]) -> str:
    """The generation the workers run: "7", or "6-7" while they disagree."""
    seen = sorted({w["generation"] for w in workers if isinstance(w.get("generation"), int)})
    if not seen:
        return "-"
    return str(seen[0]) if len(seen) == 1 else f"{seen[0]}-{seen[-1]}"


def _in_workers(done: int, total: int) -> str:
    if done == total:
        return f"in {_count(total, 'worker')}"
    return f"in {done} of {_count(total, 'worker')}"


# ------------------------------------------------------------------ workers


def _worker_state(worker: Mapping[str, Any]) -> Cell:
    if "error" in worker:
        return Cell(f"down: {worker['error']}", BAD)
    if worker.get("draining"):
        return Cell("draining", SOSO)
    overload = worker.get("overload")
    if isinstance(overload, Mapping) and overload.get("overloaded"):
        shed = overload.get("shed") or overload.get("would_shed") or []
        detail = f" (shedding {', '.join(map(str, shed))})" if shed else ""
        return Cell(f"overloaded{detail}", BAD)
    cap = worker.get("connection_cap")
    if isinstance(cap, Mapping) and cap.get("paused"):
        return Cell("at connection limit", SOSO)
    return Cell("serving", GOOD)


def _worker_row(worker: Mapping[str, Any]) -> list[Cell]:
    overload = worker.get("overload")
    lag = overload.get("lag") if isinstance(overload, Mapping) else None
    return [
        Cell(str(worker.get("index", "?"))),
        Cell(str(worker.get("pid", "-"))),
        _number(worker.get("generation")),
        _number(worker.get("connections")),
        _number(worker.get("requests")),
        Cell(duration(lag), None, True),
        _number(worker.get("restarts")),
        _worker_state(worker),
    ]


_WORKER_HEADER = (
    "WORKER",
    "PID",
    "GEN",
    "CONNECTIONS",
    "REQUESTS",
    "LAG",
    "RESTARTS",
    "STATE",
)


def workers_table(answer: Mapping[str, Any], colour: bool = False) -> list[str]:
    """``GET /admin/workers``: one row per worker."""
    workers = _workers(answer)
    if not workers:
        return ["no workers"]
    return table(_WORKER_HEADER, [_worker_row(w) for w in workers], colour)


# ------------------------------------------------------------------ modules


def modules_table(answer: Mapping[str, Any], colour: bool = False) -> list[str]:
    """``GET /admin/modules``: one row per module, its state across the workers."""
    workers = _workers(answer)
    running = [w for w in workers if "error" not in w]
    order: list[str] = []
    found: dict[str, list[Mapping[str, Any]]] = {}
    for worker in running:
        for module in worker.get("modules") or ():
            name = str(module.get("name", "?"))
            if name not in found:
                order.append(name)
                found[name] = []
            found[name].append(module)
    rows: list[list[Cell]] = []
    for name in order:
        copies = found[name]
        first = copies[0]
        failures = [m.get("failures") for m in copies]
        total = (
            sum(f for f in failures if isinstance(f, int))
            if any(isinstance(f, int) for f in failures)
            else None
        )
        rows.append(
            [
                Cell(name),
                _number(first.get("priority")),
                Cell("yes" if first.get("essential") else "no"),
                _module_state(copies, len(running)),
                _number(total),
                Cell(",".join(map(str, first.get("hooks") or ())) or "-"),
            ]
        )
    lines = (
        table(("MODULE", "PRIORITY", "ESSENTIAL", "STATE", "FAILURES", "HOOKS"), rows, colour)
        if rows
        else ["no modules"]
    )
    return lines + _worker_problems(workers)


def _module_state(copies: Sequence[Mapping[str, Any]], workers: int) -> Cell:
    states: dict[str, int] = {}
    for module in copies:
        state = "off" if not module.get("enabled") else "shed" if module.get("shed") else "on"
        states[state] = states.get(state, 0) + 1
    if len(states) == 1 and len(copies) == workers:
        state = next(iter(states))
        return Cell(state, {"on": GOOD, "shed": BAD}.get(state, SOSO))
    # Workers disagree (one shed under its own load, or one missed a switch).
    text = ", ".join(f"{state} in {n}/{workers}" for state, n in sorted(states.items()))
    return Cell(text, SOSO)


def module_outcome(answer: Mapping[str, Any]) -> Outcome:
    """``POST /admin/modules/NAME/enable|disable``."""
    workers = _workers(answer)
    done = sum(1 for w in workers if "error" not in w)
    verb = "enabled" if answer.get("enabled") else "disabled"
    line = f"{verb} {answer.get('module', '?')} {_in_workers(done, len(workers))}"
    return Outcome([line], _worker_problems(workers))


# ------------------------------------------------------------------ clusters and nodes


def _node_state(uri: str, health: Mapping[str, Any] | None) -> Cell:
    if health is None:
        return Cell("in service", GOOD)
    nodes = health.get("nodes")
    node = nodes.get(uri) if isinstance(nodes, Mapping) else None
    if not isinstance(node, Mapping):
        return Cell("in service", GOOD)
    state = str(node.get("state", "?"))
    if state == "ejected":
        return Cell(f"ejected, back in {duration(node.get('ejected_for'))}", BAD)
    if state == "slow_start":
        factor = node.get("factor")
        share = f" {factor * 100:.0f}%" if isinstance(factor, int | float) else ""
        return Cell(f"slow start{share}", SOSO)
    if state == "probation":
        return Cell("probation", SOSO)
    return Cell(state, GOOD if state == "healthy" else SOSO)


@dataclass(frozen=True, slots=True)
class _Node:
    cluster: str
    uri: str
    weight: object
    state: Cell
    note: str
    in_service: bool


def _cluster_nodes(answer: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], list[_Node]]]:
    clusters = answer.get("clusters")
    if not isinstance(clusters, Mapping):
        return []
    changes = [c for c in answer.get("changes") or () if isinstance(c, Mapping)]
    result: list[tuple[str, Mapping[str, Any], list[_Node]]] = []
    for name, cluster in clusters.items():
        if not isinstance(cluster, Mapping):
            continue
        health = cluster.get("health") if isinstance(cluster.get("health"), Mapping) else None
        added = {
            str(c.get("uri")): bool(c.get("keep"))
            for c in changes
            if c.get("cluster") == name and c.get("action") == "add"
        }
        nodes: list[_Node] = []
        for node in cluster.get("nodes") or ():
            uri = str(node.get("uri", "?"))
            note = ""
            if uri in added:
                note = "added at run time" + (", kept over reloads" if added[uri] else "")
            state = _node_state(uri, health)
            # Ejected and probation nodes are out (a probation trickle decides their return).
            out = state.text.startswith(("ejected", "probation"))
            nodes.append(_Node(name, uri, node.get("weight"), state, note, not out))
        for uri in cluster.get("draining") or ():
            nodes.append(_Node(name, str(uri), None, Cell("draining", SOSO), "", False))
        result.append((name, cluster, nodes))
    return result


def nodes_table(answer: Mapping[str, Any], colour: bool = False) -> list[str]:
    """``GET /admin/clusters``: one row per node (the cluster named on each, for grep)."""
    rows: list[list[Cell]] = []
    notes: list[str] = []
    for name, cluster, nodes in _cluster_nodes(answer):
        if not nodes:
            rows.append([Cell(name), Cell("(no nodes)", BAD), Cell("-", None, True), Cell("")])
        for node in nodes:
            state = node.state
            if node.note:
                state = Cell(f"{state.text} ({node.note})", state.colour)
            rows.append([Cell(name), Cell(node.uri), _number(node.weight), state])
        notes += _cluster_notes(name, cluster, colour)
    if not rows:
        return ["no clusters"]
    return table(("CLUSTER", "NODE", "WEIGHT", "STATE"), rows, colour) + notes


def _cluster_notes(name: str, cluster: Mapping[str, Any], colour: bool) -> list[str]:
    """What a row cannot say: panic, detect-only health, discovery sources."""
    notes: list[str] = []
    health = cluster.get("health")
    if isinstance(health, Mapping):
        if health.get("panic"):
            notes.append(
                _paint(
                    f"{name}: panic: too many nodes out of service, every node takes traffic",
                    BAD,
                    colour,
                )
            )
        if health.get("detect_only"):
            notes.append(f"{name}: health in detect-only mode: no node is taken out")
    for source in cluster.get("discovery") or ():
        if not isinstance(source, Mapping):
            continue
        state = str(source.get("state", "?"))
        text = f"{name}: nodes from {source.get('source', '?')} {source.get('target', '?')}: "
        text += state
        if source.get("error"):
            text += f" ({source['error']})"
        if isinstance(source.get("nodes"), int):
            text += f", {_count(source['nodes'], 'node')}"
        if state == "unreachable":
            text += "; the last known nodes stay"
        notes.append(_paint(text, None if state == "ok" else BAD, colour))
    return notes


def node_outcome(
    action: str, uri: str, answer: Mapping[str, Any], *, weight: int | None, keep: bool
) -> Outcome:
    """``POST|DELETE /admin/clusters/NAME/nodes[/drain]``."""
    workers = _workers(answer)
    done = _in_workers(sum(1 for w in workers if "error" not in w), len(workers))
    cluster = answer.get("cluster", "?")
    nodes = answer.get("nodes")
    left = _count(len(nodes), "node") if isinstance(nodes, list) else "? nodes"
    lasting = "kept over reloads" if keep else "until the next reload"
    if action == "add":
        line = f"added {uri} to {cluster} {done} (weight {weight or 1}, {lasting})"
        line += f"; {cluster} now has {left}"
    elif action == "drain":
        line = f"draining {uri} in {cluster} {done} ({lasting}): it takes no new requests,"
        line += f" those in flight finish; {left} left in {cluster}"
    else:
        line = f"removed {uri} from {cluster} {done} ({lasting}); {cluster} now has {left}"
    return Outcome([line], _worker_problems(workers))


# ------------------------------------------------------------------ reload, restart


def reload_outcome(answer: Mapping[str, Any]) -> Outcome:
    """``POST /admin/reload``: "reloaded FILE: generation 7 in 2 workers (sha256 ...)"."""
    workers = _workers(answer)
    running = [w for w in workers if "error" not in w]
    checksum = str(answer.get("checksum") or "")[:12] or "-"
    line = (
        f"reloaded {answer.get('path', '?')}: generation {_generation(running)}"
        f" {_in_workers(len(running), len(workers))} (sha256 {checksum})"
    )
    return Outcome([line], _worker_problems(workers))


def restart_outcome(path: str, answer: Mapping[str, Any]) -> Outcome:
    """``POST /admin/restart``: the new master's pid."""
    pid = answer.get("new_master_pid", "?")
    return Outcome(
        [
            f"restarted {path}: the new master (pid {pid}) serves;"
            " the previous one drains its connections"
        ]
    )


# ------------------------------------------------------------------ status


def status_lines(
    health: Mapping[str, Any],
    config: Mapping[str, Any],
    workers: Mapping[str, Any],
    clusters: Mapping[str, Any],
    *,
    admin: str,
    path: str,
    file_checksum: str,
    colour: bool = False,
) -> list[str]:
    """One screen from ``/healthz``, ``/admin/config``, ``/admin/workers`` and ``/admin/clusters``.

    ``path`` and ``file_checksum`` are the file the command was given, to say
    when the proxy runs something else (an edit not reloaded yet).
    """
    state = str(health.get("status", "?"))
    listed = _workers(workers)
    running = [w for w in listed if "error" not in w]
    lines = [
        "proxy    "
        + _paint(state, GOOD if state == "serving" else SOSO, colour)
        + f", {_count(len(running), 'worker')}"
        + ("" if len(running) == len(listed) else f" of {len(listed)}"),
        # The admin listener serves the live status page at its root.
        f"admin    http://{admin}/ (the status page)",
    ]
    checksum = str(config.get("checksum") or "")
    reloads = config.get("reloads")
    lines.append(
        f"config   {config.get('source', '?')}: generation {_generation(running)},"
        f" sha256 {checksum[:12] or '-'}"
        + (f", {_count(reloads, 'reload')}" if isinstance(reloads, int) else "")
    )
    if checksum and file_checksum != checksum:
        lines.append(
            _paint(
                f"         {path} differs (sha256 {file_checksum[:12]}): reload to apply it",
                SOSO,
                colour,
            )
        )
    lines.append("")
    lines += workers_table(workers, colour)
    lines.append("")
    rows: list[list[Cell]] = []
    notes: list[str] = []
    for name, cluster, nodes in _cluster_nodes(clusters):
        serving = [n for n in nodes if n.in_service]
        out = [n for n in nodes if not n.in_service]
        named = ", ".join(f"{n.uri} {n.state.text}" for n in out[:_STATUS_NODES])
        if len(out) > _STATUS_NODES:
            named += f", and {len(out) - _STATUS_NODES} more"
        rows.append(
            [
                Cell(name),
                Cell(f"{len(serving)}/{len(nodes)}", GOOD if serving else BAD, True),
                Cell(named or "-", BAD if out else None),
            ]
        )
        notes += _cluster_notes(name, cluster, colour)
    if rows:
        lines += table(("CLUSTER", "IN SERVICE", "OUT OF SERVICE"), rows, colour) + notes
    else:
        lines.append("no clusters")
    return lines
