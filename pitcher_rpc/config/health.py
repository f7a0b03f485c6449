"""The thresholds and timings of node health, as a configuration states them.

:class:`HealthPolicy` is the value of a cluster's ``[clusters.NAME.health]``
table; the rules it sets (detectors, ejection, probation, slow start, the
cluster cap) are applied by :mod:`pitcher_rpc.degrade.health`, whose docstring
describes them. It lives here, beside the rest of the configuration, because
the configuration is built and validated below the code that applies it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["HealthPolicy"]

# key -> (wording of the rule, test); types come from the dataclass annotations.
_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "window_requests": (">= 0", lambda v: v >= 0),
    "window_seconds": (">= 0", lambda v: v >= 0),
    "min_requests": (">= 1", lambda v: v >= 1),
    "min_failures": (">= 1", lambda v: v >= 1),
    "failure_ratio": ("in (0, 1]", lambda v: 0 < v <= 1),
    "consecutive_failures": (">= 0", lambda v: v >= 0),
    "ejection_time": ("> 0", lambda v: v > 0),
    "max_ejection_time": ("> 0", lambda v: v > 0),
    "probation_requests": (">= 0", lambda v: v >= 0),
    "slow_start": (">= 0", lambda v: v >= 0),
    "min_weight_percent": ("in (0, 100]", lambda v: 0 < v <= 100),
    "aggression": ("> 0", lambda v: v > 0),
    "max_ejection_percent": ("in [0, 100]", lambda v: 0 <= v <= 100),
}
_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool}


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Thresholds and timings of node health; pitcher_rpc.degrade.health states the rules.

    Times are seconds, percents 0-100. Zero disables ``window_requests``,
    ``window_seconds``, ``consecutive_failures``, ``probation_requests`` and
    ``slow_start``. Construction validates every field and raises one
    ValueError naming each bad key.
    """

    window_requests: int = 100
    window_seconds: float = 10.0
    min_requests: int = 20
    min_failures: int = 5
    failure_ratio: float = 0.3
    consecutive_failures: int = 5
    ejection_time: float = 5.0
    max_ejection_time: float = 60.0
    probation_requests: int = 5
    slow_start: float = 10.0
    min_weight_percent: float = 10.0
    aggression: float = 1.0
    max_ejection_percent: float = 50.0
    detect_only: bool = False

    def __post_init__(self) -> None:
        problems = []
        for field in fields(self):
            value = getattr(self, field.name)
            kind = _TYPES[str(field.type)]
            # bool is an int to Python, never to a config file; ints are fine as floats.
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            ok = ok or (kind is float and type(value) is int)
            if not ok or (kind is float and not math.isfinite(value)):
                problems.append(f"{field.name}: must be {kind.__name__}, got {value!r}")
            elif field.name in _RULES and not _RULES[field.name][1](value):
                problems.append(f"{field.name}: must be {_RULES[field.name][0]}, got {value!r}")
        if not problems and self.max_ejection_time < self.ejection_time:
            problems.append("max_ejection_time: must be >= ejection_time")
        if not problems and 0 < self.window_requests < self.min_requests:
            problems.append("min_requests: must be <= window_requests, or the window never fires")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> HealthPolicy:
        """A policy from a mapping of field names (e.g. a TOML table); missing keys keep defaults.

        Raises ValueError naming every unknown key, wrong type or out-of-range value.
        """
        known = [field.name for field in fields(cls)]
        problems = []
        for key in settings:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{key}: unknown key{hint}")
        try:
            policy = cls(**{key: value for key, value in settings.items() if key in known})
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return policy

    def window_bad(self, requests: int, failures: int) -> bool:
        """Whether a window holding these counts is bad: all three thresholds met."""
        return (
            requests >= self.min_requests
            and failures >= self.min_failures
            and failures >= self.failure_ratio * requests
        )

    def ramp(self, elapsed: float) -> float:
        """Slow-start weight factor ``elapsed`` seconds into the ramp, in [min, 1]."""
        if self.slow_start <= 0 or elapsed >= self.slow_start:
            return 1.0
        share = max(elapsed, 0.0) / self.slow_start
        return max(self.min_weight_percent / 100, math.pow(share, 1 / self.aggression))
