"""The admin commands' tables and outcome lines, from answers a real proxy gave.

The answers below were taken with curl from ``pitcher serve`` (2 workers)
on a configuration with three clusters: node health, a dead node ejected,
then back through probation and slow start, a panic, DNS discovery of a name
that does not resolve, nodes added and drained at run time. Only the GC and
metrics histograms are cut (nothing here reads them). The end-to-end tests
(tests/test_cli_admin.py) run the same functions on live answers.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from pitcher_rpc import cli_output
from pitcher_rpc.cli_output import (
    duration,
    error_text,
    module_outcome,
    modules_table,
    node_outcome,
    nodes_table,
    reload_outcome,
    restart_outcome,
    status_lines,
    workers_table,
)


def _answer(text: str) -> dict[str, Any]:
    return dict(json.loads(text))


WORKERS = _answer(
    """
{"workers": [{"index": 0, "pid": 17632, "generation": 3,
"checksum": "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4",
"requests": 191, "connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000,
"share": 0.5, "paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0},
"draining": false, "gc": {"collected": 332, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 191, "dropped": 0, "buffered": 0}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0006, "shed": [],
"would_shed": []}, "restarts": 0}, {"index": 1, "pid": 17633, "generation": 3,
"checksum": "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4",
"requests": 244, "connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000,
"share": 0.5, "paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0},
"draining": false, "gc": {"collected": 332, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 244, "dropped": 0, "buffered": 0}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.001, "shed": [],
"would_shed": []}, "restarts": 0}]}
"""
)


CONFIG = _answer(
    """
{"source": "/tmp/h2cli/cap.toml",
"checksum": "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4", "reloads": 1,
"workers": [{"index": 0, "generation": 3,
"checksum": "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4"}, {"index": 1,
"generation": 3,
"checksum": "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4"}]}
"""
)


MODULES = _answer(
    """
{"workers": [{"index": 0, "modules": [{"name": "request_id", "priority": 1000,
"essential": true, "enabled": true, "shed": false, "hooks": ["BEFORE_CLUSTER"], "failures": 0,
"stats": {}}, {"name": "metrics", "priority": 20, "essential": true, "enabled": true,
"shed": false, "hooks": ["REQUEST_FINISH"], "failures": 0, "stats": {}}, {"name": "access_log",
"priority": 10, "essential": false, "enabled": true, "shed": false,
"hooks": ["REQUEST_FINISH"], "failures": 0, "stats": {"written": 37, "dropped": 0,
"buffered": 0}}]}, {"index": 1, "modules": [{"name": "request_id", "priority": 1000,
"essential": true, "enabled": true, "shed": false, "hooks": ["BEFORE_CLUSTER"], "failures": 0,
"stats": {}}, {"name": "metrics", "priority": 20, "essential": true, "enabled": true,
"shed": false, "hooks": ["REQUEST_FINISH"], "failures": 0, "stats": {}}, {"name": "access_log",
"priority": 10, "essential": false, "enabled": true, "shed": false,
"hooks": ["REQUEST_FINISH"], "failures": 0, "stats": {"written": 23, "dropped": 0,
"buffered": 0}}]}]}
"""
)


CLUSTERS_EJECTED = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18490",
"weight": 1}, {"uri": "tcp://127.0.0.1:18491", "weight": 3}, {"uri": "tcp://127.0.0.1:18499",
"weight": 1}], "draining": [], "health": {"panic": false, "in_service_share": 0.8,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18490": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "ejected", "factor": 0.0, "ejected_for": 1.863}},
"events": {"ejected": 1}}}, "web": {"balance": "round_robin",
"nodes": [{"uri": "tcp://127.0.0.1:18492", "weight": 1}, {"uri": "tcp://127.0.0.1:18493",
"weight": 1}], "draining": [], "health": null, "discovery": [{"source": "dns",
"target": "tcp://localhost:18493", "state": "ok", "since": 1796324502.637, "error": "",
"failures": 0, "updates": 1, "nodes": 1, "metadata": {}, "skipped": {}, "resolutions": 3}]}},
"changes": []}
"""
)


CLUSTERS_PROBATION = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18490",
"weight": 1}, {"uri": "tcp://127.0.0.1:18491", "weight": 3}, {"uri": "tcp://127.0.0.1:18499",
"weight": 1}], "draining": [], "health": {"panic": false, "in_service_share": 0.8,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18490": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "probation", "factor": 0.1, "ejected_for": 0.0}},
"events": {"ejected": 1, "probation": 2, "re-ejected": 1}}}, "web": {"balance": "round_robin",
"nodes": [{"uri": "tcp://127.0.0.1:18492", "weight": 1}, {"uri": "tcp://127.0.0.1:18493",
"weight": 1}], "draining": [], "health": null, "discovery": [{"source": "dns",
"target": "tcp://localhost:18493", "state": "ok", "since": 1796324502.637, "error": "",
"failures": 0, "updates": 1, "nodes": 1, "metadata": {}, "skipped": {}, "resolutions": 18}]}},
"changes": []}
"""
)


CLUSTERS_SLOW_START = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18490",
"weight": 1}, {"uri": "tcp://127.0.0.1:18491", "weight": 3}, {"uri": "tcp://127.0.0.1:18499",
"weight": 1}], "draining": [], "health": {"panic": false, "in_service_share": 1.0,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18490": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "slow_start", "factor": 0.419, "ejected_for": 0.0}},
"events": {"ejected": 1, "probation": 2, "re-ejected": 1, "restored": 1}}},
"web": {"balance": "round_robin", "nodes": [{"uri": "tcp://127.0.0.1:18492", "weight": 1},
{"uri": "tcp://127.0.0.1:18493", "weight": 1}], "draining": [], "health": null,
"discovery": [{"source": "dns", "target": "tcp://localhost:18493", "state": "ok",
"since": 1796324502.637, "error": "", "failures": 0, "updates": 1, "nodes": 1, "metadata": {},
"skipped": {}, "resolutions": 28}]}}, "changes": []}
"""
)


CLUSTERS_PANIC = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18490",
"weight": 1}, {"uri": "tcp://127.0.0.1:18491", "weight": 3}, {"uri": "tcp://127.0.0.1:18499",
"weight": 1}], "draining": [], "health": {"panic": true, "in_service_share": 0.2,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18490": {"state": "ejected", "factor": 1.0, "ejected_for": 1.93},
"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0}},
"events": {"ejected": 2, "probation": 2, "re-ejected": 1, "restored": 1, "ejection_refused": 1,
"panic": 1}}}, "web": {"balance": "round_robin", "nodes": [{"uri": "tcp://127.0.0.1:18492",
"weight": 1}, {"uri": "tcp://127.0.0.1:18493", "weight": 1}], "draining": [], "health": null,
"discovery": [{"source": "dns", "target": "tcp://localhost:18493", "state": "ok",
"since": 1796324502.637, "error": "", "failures": 0, "updates": 1, "nodes": 1, "metadata": {},
"skipped": {}, "resolutions": 42}]}}, "changes": []}
"""
)


CLUSTERS_DNS_DOWN = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18490",
"weight": 1}, {"uri": "tcp://127.0.0.1:18491", "weight": 3}, {"uri": "tcp://127.0.0.1:18499",
"weight": 1}], "draining": [], "health": {"panic": true, "in_service_share": 0.2,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18490": {"state": "probation", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0}},
"events": {"ejected": 2, "probation": 4, "re-ejected": 2, "restored": 1, "ejection_refused": 1,
"panic": 1}}}, "web": {"balance": "round_robin", "nodes": [{"uri": "tcp://127.0.0.1:18492",
"weight": 1}, {"uri": "tcp://127.0.0.1:18493", "weight": 1}], "draining": [], "health": null,
"discovery": [{"source": "dns", "target": "tcp://no-such-name.invalid:18493",
"state": "unreachable", "since": 1796324555.201,
"error": "cannot resolve no-such-name.invalid: [Errno -2] Name or service not known",
"failures": 6, "updates": 0, "nodes": null, "metadata": {}, "skipped": {},
"resolutions": 0}]}}, "changes": []}
"""
)


CLUSTERS_CHANGED = _answer(
    """
{"clusters": {"api": {"balance": "weighted", "nodes": [{"uri": "tcp://127.0.0.1:18491",
"weight": 3}, {"uri": "tcp://127.0.0.1:18499", "weight": 1}],
"draining": ["tcp://127.0.0.1:18490"], "health": {"panic": true, "in_service_share": 0.25,
"admitted_share": 1.0, "detect_only": false,
"nodes": {"tcp://127.0.0.1:18491": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0},
"tcp://127.0.0.1:18499": {"state": "healthy", "factor": 1.0, "ejected_for": 0.0}},
"events": {"ejected": 2, "probation": 4, "re-ejected": 2, "restored": 1, "ejection_refused": 1,
"panic": 1}}}, "web": {"balance": "round_robin", "nodes": [{"uri": "tcp://127.0.0.1:18492",
"weight": 1}, {"uri": "tcp://127.0.0.1:18493", "weight": 1}, {"uri": "tcp://127.0.0.1:18494",
"weight": 1}], "draining": [], "health": null, "discovery": [{"source": "dns",
"target": "tcp://no-such-name.invalid:18493", "state": "unreachable", "since": 1796324555.201,
"error": "cannot resolve no-such-name.invalid: [Errno -2] Name or service not known",
"failures": 33, "updates": 0, "nodes": null, "metadata": {}, "skipped": {},
"resolutions": 0}]}}, "changes": [{"action": "add", "cluster": "web",
"uri": "tcp://127.0.0.1:18494", "weight": 1, "keep": true}, {"action": "drain",
"cluster": "api", "uri": "tcp://127.0.0.1:18490", "weight": 1, "keep": false}]}
"""
)


RELOAD = _answer(
    """
{"path": "/tmp/h2cli/proxy.toml",
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277",
"workers": [{"index": 0, "pid": 7833, "generation": 2,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 37,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 37, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0058, "shed": [],
"would_shed": []}}, {"index": 1, "pid": 7834, "generation": 2,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 23,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 23, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0004, "shed": [],
"would_shed": []}}], "complete": true}
"""
)


NODE_ADDED = _answer(
    """
{"cluster": "web", "nodes": ["tcp://127.0.0.1:18492", "tcp://127.0.0.1:18493"], "draining": [],
"workers": [{"index": 0, "pid": 7833, "generation": 3,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 37,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 37, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0014, "shed": [],
"would_shed": []}}, {"index": 1, "pid": 7834, "generation": 3,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 23,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 23, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0012, "shed": [],
"would_shed": []}}], "complete": true}
"""
)


NODE_DRAINED = _answer(
    """
{"cluster": "web", "nodes": ["tcp://127.0.0.1:18492"], "draining": ["tcp://127.0.0.1:18493"],
"workers": [{"index": 0, "pid": 7833, "generation": 4,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 37,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 37, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0032, "shed": [],
"would_shed": []}}, {"index": 1, "pid": 7834, "generation": 4,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 23,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 23, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0012, "shed": [],
"would_shed": []}}], "complete": true}
"""
)


NODE_REMOVED = _answer(
    """
{"cluster": "web", "nodes": ["tcp://127.0.0.1:18492"], "draining": [], "workers": [{"index": 0,
"pid": 7833, "generation": 5,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 37,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 37, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0033, "shed": [],
"would_shed": []}}, {"index": 1, "pid": 7834, "generation": 5,
"checksum": "8c10f9d9ee92e0414191d4bcb3d83a11e817ee3701def0ba1eda70ec41bab277", "requests": 23,
"connections": 0, "connection_cap": {"open": 0, "waiting": 0, "limit": 5000, "share": 0.5,
"paused": false, "pauses": 0, "paused_seconds": 0.0, "idle_closed": 0}, "draining": false,
"gc": {"collected": 0, "uncollectable": 0, "callback_errors": 0},
"modules": {"access_log": {"written": 23, "dropped": 0, "buffered": 0}, "metrics": {}},
"overload": {"mode": "enforce", "overloaded": false, "lag": 0.0013, "shed": [],
"would_shed": []}}], "complete": true}
"""
)


MODULE_DISABLED = _answer(
    """
{"module": "access_log", "enabled": false, "complete": true, "workers": [{"index": 0,
"modules": [{"name": "request_id", "priority": 1000, "essential": true, "enabled": true,
"shed": false, "hooks": ["BEFORE_CLUSTER"], "failures": 0, "stats": {}}, {"name": "metrics",
"priority": 20, "essential": true, "enabled": true, "shed": false, "hooks": ["REQUEST_FINISH"],
"failures": 0, "stats": {}}, {"name": "access_log", "priority": 10, "essential": false,
"enabled": false, "shed": false, "hooks": ["REQUEST_FINISH"], "failures": 0,
"stats": {"written": 37, "dropped": 0, "buffered": 0}}]}, {"index": 1,
"modules": [{"name": "request_id", "priority": 1000, "essential": true, "enabled": true,
"shed": false, "hooks": ["BEFORE_CLUSTER"], "failures": 0, "stats": {}}, {"name": "metrics",
"priority": 20, "essential": true, "enabled": true, "shed": false, "hooks": ["REQUEST_FINISH"],
"failures": 0, "stats": {}}, {"name": "access_log", "priority": 10, "essential": false,
"enabled": false, "shed": false, "hooks": ["REQUEST_FINISH"], "failures": 0,
"stats": {"written": 23, "dropped": 0, "buffered": 0}}]}]}
"""
)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHECKSUM = "1e7f8010739e7c05112ca1163e912702a78ed585c47c5b20c314446f5fc4ecd4"


def test_workers_table() -> None:
    assert workers_table(WORKERS) == [
        "WORKER  PID    GEN  CONNECTIONS  REQUESTS    LAG  RESTARTS  STATE",
        "0       17632    3            0       191  0.6ms         0  serving",
        "1       17633    3            0       244  1.0ms         0  serving",
    ]


@pytest.mark.parametrize(
    ("change", "state"),
    [
        ({"draining": True}, "draining"),
        (
            {"overload": {"overloaded": True, "lag": 0.168, "shed": ["access_log"]}},
            "overloaded (shedding access_log)",
        ),
        ({"connection_cap": {"paused": True}}, "at connection limit"),
    ],
)
def test_a_worker_state_says_what_is_wrong_first(change: dict[str, Any], state: str) -> None:
    answer = copy.deepcopy(WORKERS)
    answer["workers"][1].update(change)
    lines = workers_table(answer)
    assert lines[1].endswith("  serving")
    assert lines[2].endswith(f"  {state}"), lines


def test_a_worker_the_master_cannot_reach_is_a_row_not_a_crash() -> None:
    # What the master answers for a slot whose worker is being replaced.
    answer = {
        "workers": [WORKERS["workers"][0], {"index": 1, "error": "not running", "restarts": 2}]
    }
    assert (
        workers_table(answer)[2]
        == "1       -        -            -         -      -         2  down: not running"
    )


def test_modules_table_sums_the_workers() -> None:
    assert modules_table(MODULES) == [
        "MODULE      PRIORITY  ESSENTIAL  STATE  FAILURES  HOOKS",
        "request_id      1000  yes        on            0  BEFORE_CLUSTER",
        "metrics           20  yes        on            0  REQUEST_FINISH",
        "access_log        10  no         on            0  REQUEST_FINISH",
    ]
    off = modules_table(MODULE_DISABLED)
    assert off[3] == "access_log        10  no         off           0  REQUEST_FINISH"


def test_modules_table_shows_workers_that_disagree_and_those_that_failed() -> None:
    answer = copy.deepcopy(MODULES)
    log = answer["workers"][0]["modules"][2]
    log.update(shed=True, failures=3)
    answer["workers"].append({"index": 2, "error": "not running"})
    lines = modules_table(answer)
    assert lines[3] == (
        "access_log        10  no         on in 1/2, shed in 1/2         3  REQUEST_FINISH"
    )
    assert lines[-1] == "worker 2: not running"


def test_nodes_table_through_ejection_probation_and_slow_start() -> None:
    assert nodes_table(CLUSTERS_EJECTED) == [
        "CLUSTER  NODE                   WEIGHT  STATE",
        "api      tcp://127.0.0.1:18490       1  healthy",
        "api      tcp://127.0.0.1:18491       3  healthy",
        "api      tcp://127.0.0.1:18499       1  ejected, back in 1.9s",
        "web      tcp://127.0.0.1:18492       1  in service",
        "web      tcp://127.0.0.1:18493       1  in service",
        "web: nodes from dns tcp://localhost:18493: ok, 1 node",
    ]
    assert nodes_table(CLUSTERS_PROBATION)[3].endswith("  probation")
    assert nodes_table(CLUSTERS_SLOW_START)[3].endswith("  slow start 42%")


def test_nodes_table_notes_panic_and_an_unreachable_source() -> None:
    panic = nodes_table(CLUSTERS_PANIC)
    assert "api: panic: too many nodes out of service, every node takes traffic" in panic
    down = nodes_table(CLUSTERS_DNS_DOWN)[-1]
    assert down == (
        "web: nodes from dns tcp://no-such-name.invalid:18493: unreachable (cannot resolve"
        " no-such-name.invalid: [Errno -2] Name or service not known); the last known nodes stay"
    )


def test_nodes_table_shows_run_time_changes() -> None:
    lines = nodes_table(CLUSTERS_CHANGED)
    assert "api      tcp://127.0.0.1:18490       -  draining" in lines
    assert (
        "web      tcp://127.0.0.1:18494       1  in service (added at run time, kept over reloads)"
        in lines
    )


def test_outcomes_of_changes() -> None:
    assert reload_outcome(RELOAD).lines == [
        "reloaded /tmp/h2cli/proxy.toml: generation 2 in 2 workers (sha256 8c10f9d9ee92)"
    ]
    uri = "tcp://127.0.0.1:18493"
    added = node_outcome("add", uri, NODE_ADDED, weight=2, keep=False)
    assert added.ok and added.lines == [
        f"added {uri} to web in 2 workers (weight 2, until the next reload); web now has 2 nodes"
    ]
    drained = node_outcome("drain", uri, NODE_DRAINED, weight=None, keep=True)
    assert drained.lines == [
        f"draining {uri} in web in 2 workers (kept over reloads): it takes no new requests,"
        " those in flight finish; 1 node left in web"
    ]
    removed = node_outcome("remove", uri, NODE_REMOVED, weight=None, keep=False)
    assert removed.lines == [
        f"removed {uri} from web in 2 workers (until the next reload); web now has 1 node"
    ]
    assert module_outcome(MODULE_DISABLED).lines == ["disabled access_log in 2 workers"]
    assert restart_outcome("/etc/p.toml", {"new_master_pid": 10629}).lines == [
        "restarted /etc/p.toml: the new master (pid 10629) serves;"
        " the previous one drains its connections"
    ]


def test_a_change_some_workers_missed_names_them() -> None:
    answer = copy.deepcopy(RELOAD)
    answer["workers"][1] = {"index": 1, "error": "the file changed after the master checked it"}
    answer["complete"] = False
    outcome = reload_outcome(answer)
    assert not outcome.ok
    assert outcome.lines == [
        "reloaded /tmp/h2cli/proxy.toml: generation 2 in 1 of 2 workers (sha256 8c10f9d9ee92)"
    ]
    assert outcome.problems == ["worker 1: the file changed after the master checked it"]


def test_generations_that_differ_show_as_a_range() -> None:
    answer = copy.deepcopy(RELOAD)
    answer["workers"][0]["generation"] = 1
    assert "generation 1-2 in 2 workers" in reload_outcome(answer).lines[0]


def test_status_on_one_screen() -> None:
    lines = status_lines(
        {"status": "serving"},
        CONFIG,
        WORKERS,
        CLUSTERS_PANIC,
        admin="127.0.0.1:18481",
        path="cap.toml",
        file_checksum=CHECKSUM,
    )
    assert lines == [
        "proxy    serving, 2 workers",
        "admin    http://127.0.0.1:18481/ (the status page)",
        f"config   /tmp/h2cli/cap.toml: generation 3, sha256 {CHECKSUM[:12]}, 1 reload",
        "",
        *workers_table(WORKERS),
        "",
        "CLUSTER  IN SERVICE  OUT OF SERVICE",
        "api             2/3  tcp://127.0.0.1:18490 ejected, back in 1.9s",
        "web             2/2  -",
        "api: panic: too many nodes out of service, every node takes traffic",
        "web: nodes from dns tcp://localhost:18493: ok, 1 node",
    ]


def test_status_says_when_the_file_is_not_what_runs() -> None:
    lines = status_lines(
        {"status": "draining"},
        CONFIG,
        {"workers": [*WORKERS["workers"][:1], {"index": 1, "error": "not running"}]},
        CLUSTERS_CHANGED,
        admin="127.0.0.1:18481",
        path="cap.toml",
        file_checksum="0123456789abcdef",
    )
    assert lines[0] == "proxy    draining, 1 worker of 2"
    assert lines[3] == "         cap.toml differs (sha256 0123456789ab): reload to apply it"


def test_status_names_a_few_nodes_out_of_service_and_counts_the_rest() -> None:
    answer = copy.deepcopy(CLUSTERS_CHANGED)
    answer["clusters"]["api"]["draining"] = [f"tcp://10.0.0.{n}:7001" for n in range(1, 6)]
    row = next(
        line
        for line in status_lines(
            {"status": "serving"},
            CONFIG,
            WORKERS,
            answer,
            admin="a",
            path="p",
            file_checksum=CHECKSUM,
        )
        if line.startswith("api ")
    )
    assert row.endswith("tcp://10.0.0.3:7001 draining, and 2 more"), row
    assert " 2/7 " in row


def test_colour_changes_no_width() -> None:
    for render in (
        lambda colour: workers_table(WORKERS, colour),
        lambda colour: modules_table(MODULE_DISABLED, colour),
        lambda colour: nodes_table(CLUSTERS_PANIC, colour),
        lambda colour: status_lines(
            {"status": "serving"},
            CONFIG,
            WORKERS,
            CLUSTERS_DNS_DOWN,
            admin="a",
            path="p",
            file_checksum="x",
            colour=colour,
        ),
    ):
        plain, coloured = render(False), render(True)
        assert not any(ANSI.search(line) for line in plain)
        assert any(ANSI.search(line) for line in coloured)
        assert [ANSI.sub("", line) for line in coloured] == plain


def test_states_have_their_colours() -> None:
    lines = nodes_table(CLUSTERS_EJECTED, colour=True)
    assert "\x1b[32mhealthy\x1b[0m" in lines[1]
    assert "\x1b[31mejected, back in 1.9s\x1b[0m" in lines[3]
    assert "\x1b[33mdraining\x1b[0m" in nodes_table(CLUSTERS_CHANGED, colour=True)[3]


def test_answers_without_the_expected_fields_print_dashes() -> None:
    assert workers_table({}) == ["no workers"]
    assert modules_table({"workers": "nonsense"}) == ["no modules"]
    assert nodes_table({"clusters": []}) == ["no clusters"]
    assert workers_table({"workers": [{"index": 0}]})[1].split() == [
        "0",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "serving",
    ]
    assert nodes_table({"clusters": {"c": {"nodes": []}}})[1] == "c        (no nodes)       -"
    assert reload_outcome({}).lines == ["reloaded ?: generation - in 0 workers (sha256 -)"]


def test_error_text() -> None:
    assert error_text(404, {"error": "no cluster named 'nope'"}, "") == "no cluster named 'nope'"
    assert error_text(502, None, "<html>\nBad Gateway</html>") == (
        "the admin API answered 502: <html>"
    )
    assert error_text(500, None, "") == "the admin API answered 500: an empty answer"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0005, "0.5ms"),
        (0.0099, "9.9ms"),
        (0.168, "168ms"),
        (4.46, "4.5s"),
        (None, "-"),
        (True, "-"),
        ("1", "-"),
    ],
)
def test_duration(seconds: object, text: str) -> None:
    assert duration(seconds) == text


def test_table_aligns_numbers_right_and_leaves_no_trailing_space() -> None:
    Cell = cli_output.Cell
    lines = cli_output.table(
        ("NAME", "N", "NOTE"),
        [
            [Cell("a"), Cell("7", right=True), Cell("")],
            [Cell("bbb"), Cell("1234", right=True), Cell("x")],
        ],
        colour=False,
    )
    assert lines == ["NAME     N  NOTE", "a        7", "bbb   1234  x"]
