"""The checks every section of a configuration uses: each records an issue and goes on.

A check that finds a wrong value reports it with its key and line and returns
the default (or None), so validation carries on and every mistake of a file
is reported at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from typing import Any

from .issues import ConfigIssue, show, type_message, unknown_key_message
from .lines import KeyPath, LineIndex, format_key_path


class Checks:
    """The issues found so far in one document, and the checks that find them."""

    __slots__ = ("_index", "_source", "_text", "issues", "warnings")

    def __init__(self, text: str, source: str) -> None:
        self._text = text
        self._source = source
        self._index = LineIndex(text)
        self.issues: list[ConfigIssue] = []
        # Kept in the snapshot and shown, never a reason to refuse it.
        self.warnings: list[ConfigIssue] = []

    def report(self, path: KeyPath, message: str) -> None:
        line = self._index.line_of(path)
        self.issues.append(ConfigIssue(self._source, line, format_key_path(path), message))

    def warn(self, path: KeyPath, message: str) -> None:
        line = self._index.line_of(path)
        self.warnings.append(ConfigIssue(self._source, line, format_key_path(path), message))

    def relative_path(self, name: str) -> str:
        """A file the configuration names: relative to the configuration file's directory.

        As a service manager runs the proxy from "/", not from where the file is.
        """
        if not os.path.isabs(name) and os.path.isfile(self._source):
            return os.path.join(os.path.dirname(os.path.abspath(self._source)), name)
        return name

    def _check_keys(
        self, table: Mapping[str, Any], path: KeyPath, allowed: Collection[str]
    ) -> None:
        for key in table:
            if key not in allowed:
                self.report((*path, key), unknown_key_message(key, allowed))

    def _table(self, parent: Mapping[str, Any], path: KeyPath) -> Mapping[str, Any] | None:
        """The optional sub-table ``path[-1]`` of ``parent``; None if absent or not a table."""
        value = parent.get(str(path[-1]))
        if value is None:
            return None
        if not isinstance(value, dict):
            self.report(path, type_message("a table", value))
            return None
        return value

    def _string(self, table: Mapping[str, Any], path: KeyPath) -> str | None:
        value = table.get(str(path[-1]))
        if value is None:
            return None
        if not isinstance(value, str):
            self.report(path, type_message("a string", value))
            return None
        return value

    def _boolean(self, table: Mapping[str, Any], path: KeyPath) -> bool | None:
        value = table.get(str(path[-1]))
        if value is None:
            return None
        if not isinstance(value, bool):
            self.report(path, type_message("a boolean (true or false)", value))
            return None
        return value

    def _integer(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        default: int,
        minimum: int,
        maximum: int | None = None,
    ) -> int:
        value = table.get(str(path[-1]))
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(path, type_message("an integer", value))
            return default
        if maximum is None and value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"at least {minimum}"
            self.report(path, f"must be {wanted}, got {value}")
            return default
        if maximum is not None and not minimum <= value <= maximum:
            self.report(path, f"must be between {minimum} and {maximum}, got {value}")
            return default
        return value

    def _seconds(
        self, table: Mapping[str, Any], path: KeyPath, default: float, *, allow_zero: bool = False
    ) -> float:
        value = table.get(str(path[-1]))
        if value is None:
            return default
        # An integer is a fine number of seconds; a bool is not a number.
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.report(path, type_message("a number of seconds", value))
            return default
        seconds = float(value)
        if not math.isfinite(seconds):
            self.report(path, f"must be a finite number, got {show(value)}")
            return default
        wanted = "zero or a positive number" if allow_zero else "a positive number"
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.report(path, f"must be {wanted}, got {show(value)}")
            return default
        return seconds
