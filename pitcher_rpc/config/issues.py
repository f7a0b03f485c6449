"""Configuration problems and how they are worded.

Every problem becomes a :class:`ConfigIssue` (source, line, dotted key,
message); a refused file raises one :class:`ConfigError` holding them all,
ordered by line. The message helpers show values as they are written in TOML.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "kind_of",
    "one_of_message",
    "show",
    "type_message",
    "unknown_key_message",
]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration file; ``line`` is None when it has no place."""

    source: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


def _issue_order(issue: ConfigIssue) -> tuple[bool, int]:
    # Issues without a line are about the file as a whole; list them last.
    return (issue.line is None, issue.line or 0)


class ConfigError(Exception):
    """A configuration was refused; ``errors`` holds every issue, ordered by line."""

    errors: list[ConfigIssue]

    def __init__(self, errors: Iterable[ConfigIssue]) -> None:
        self.errors = sorted(errors, key=_issue_order)
        super().__init__("\n".join(str(issue) for issue in self.errors))


def kind_of(value: object) -> str:
    # Ordered: bool before int (a bool is an int), datetime before date.
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
        (datetime, "a date-time"),
        (date, "a date"),
        (time, "a time"),
    )
    for types, name in kinds:
        if isinstance(value, types):
            return name
    return type(value).__name__


def show(value: object) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float | date | time):
        return str(value)
    return kind_of(value)


def type_message(expected: str, value: object) -> str:
    if isinstance(value, list | dict):
        return f"expected {expected}, got {kind_of(value)}"
    return f"expected {expected}, got {kind_of(value)} {show(value)}"


def unknown_key_message(key: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key (expected one of: " + ", ".join(sorted(allowed)) + ")"


def one_of_message(value: str, allowed: Collection[str]) -> str:
    choices = ", ".join(show(choice) for choice in allowed)
    close = difflib.get_close_matches(value, list(allowed), n=1)
    hint = f"; did you mean {show(close[0])}?" if close else ""
    return f"must be one of {choices}, got {show(value)}{hint}"
