"""Where a key was written: a key path -> 1-based line number in TOML source.

``tomllib`` returns plain dicts without positions, so error messages need a
second look at the text. This is a small scanner, not a TOML parser: it
follows tables, arrays of tables, dotted and quoted keys, arrays and inline
tables, and skips strings and comments, recording the line where each key
path first appears. By the time it runs, ``tomllib`` has already accepted the
document, so the scanner can afford to be forgiving: on anything it does not
understand it resynchronises at the next line, and an exception inside it
only means fewer known positions, never a failed error report.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import re
from collections.abc import Iterable

PathPart = str | int
KeyPath = tuple[PathPart, ...]

__all__ = ["KeyPath", "LineIndex", "PathPart", "find_line", "format_key_path"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_WHITESPACE = " \t\r"
# A scalar (number, boolean, date-time) ends at the first of these; dates may
# contain a space, so whitespace alone does not end one.
_SCALAR_END = frozenset(",]}#\n")
_ESCAPES = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    '"': '"',
    "\\": "\\",
    "e": "\x1b",
}


def format_key_path(path: Iterable[PathPart]) -> str:
    """``("routes", 1, "timeout")`` -> ``routes[1].timeout``; odd keys are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        shown = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        text += f".{shown}" if text else shown
    return text


def find_line(text: str, path: Iterable[PathPart]) -> int | None:
    """One-off lookup; build a :class:`LineIndex` to ask about many keys."""
    return LineIndex(text).line_of(path)


class LineIndex:
    """Line numbers of every key path defined in one TOML document."""

    __slots__ = ("_lines",)

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        # What was indexed before a surprise still serves the fallbacks.
        with contextlib.suppress(Exception):
            _Scanner(text, self._lines).run()

    def line_of(self, path: Iterable[PathPart]) -> int | None:
        """The line of ``path``, else of its nearest enclosing key or table, else None."""
        try:
            key = tuple(path)
            for length in range(len(key), 0, -1):
                line = self._lines.get(key[:length])
                if line is not None:
                    return line
        except Exception:
            return None
        return None


class _Scanner:
    __slots__ = ("_aot_counts", "_explicit", "_line_starts", "_lines", "_pos", "_table", "_text")

    def __init__(self, text: str, lines: dict[KeyPath, int]) -> None:
        self._text = text
        self._pos = 0
        self._lines = lines
        self._line_starts = [0] + [i + 1 for i, char in enumerate(text) if char == "\n"]
        # Paths defined by a header or a key, as opposed to implied by a longer
        # path: ``[a]`` after ``[a.b]`` should win the line of ``a``.
        self._explicit: set[KeyPath] = set()
        # Per array-of-tables path, how many ``[[...]]`` headers were seen so far;
        # an index into it is relative to the enclosing table's current element.
        self._aot_counts: dict[KeyPath, int] = {}
        self._table: KeyPath = ()

    # -- positions ---------------------------------------------------------

    def _line_at(self, pos: int) -> int:
        return bisect.bisect_right(self._line_starts, pos)

    def _record(self, path: KeyPath, pos: int) -> None:
        line = self._line_at(pos)
        for length in range(1, len(path)):
            self._lines.setdefault(path[:length], line)
        if path and path not in self._explicit:
            self._explicit.add(path)
            self._lines[path] = line

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    # -- statements --------------------------------------------------------

    def run(self) -> None:
        text = self._text
        while True:
            self._skip_blank(newlines=True)
            if self._pos >= len(text):
                return
            start = self._pos
            if text[start] == "[":
                self._header()
            else:
                self._key_value(self._table)
            self._finish_line(start)

    def _finish_line(self, start: int) -> None:
        self._skip_blank(newlines=False)
        stuck = self._pos == start
        if stuck or (self._pos < len(self._text) and self._text[self._pos] != "\n"):
            # Something this scanner did not follow: resynchronise on the next line.
            end = self._text.find("\n", max(self._pos, start + 1))
            self._pos = len(self._text) if end < 0 else end + 1

    def _header(self) -> None:
        header_pos = self._pos
        array = self._text.startswith("[[", self._pos)
        self._pos += 2 if array else 1
        self._skip_blank(newlines=False)
        parts = self._key()
        if not parts:
            return
        self._skip_blank(newlines=False)
        closing = "]]" if array else "]"
        if not self._text.startswith(closing, self._pos):
            return
        self._pos += len(closing)
        path = self._resolve(parts, array)
        self._record(path, header_pos)
        self._table = path

    def _resolve(self, parts: list[str], array: bool) -> KeyPath:
        resolved: KeyPath = ()
        last = len(parts) - 1
        for position, part in enumerate(parts):
            resolved += (part,)
            if array and position == last:
                index = self._aot_counts.get(resolved, 0)
                self._aot_counts[resolved] = index + 1
                resolved += (index,)
            elif resolved in self._aot_counts:
                resolved += (self._aot_counts[resolved] - 1,)
        return resolved

    def _key_value(self, table: KeyPath) -> bool:
        key_pos = self._pos
        parts = self._key()
        if not parts:
            return False
        path = table + tuple(parts)
        self._record(path, key_pos)
        self._skip_blank(newlines=False)
        if self._peek() != "=":
            return False
        self._pos += 1
        self._skip_blank(newlines=False)
        self._value(path)
        return True

    # -- keys --------------------------------------------------------------

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            part = self._simple_key()
            if part is None:
                return parts
            parts.append(part)
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return parts
            self._pos += 1
            self._skip_blank(newlines=False)

    def _simple_key(self) -> str | None:
        char = self._peek()
        if char == '"':
            start = self._pos + 1
            self._skip_basic_string()
            return _unescape(self._text[start : max(start, self._pos - 1)])
        if char == "'":
            start = self._pos + 1
            self._skip_literal_string()
            return self._text[start : max(start, self._pos - 1)]
        match = _BARE_KEY.match(self._text, self._pos)
        if match is None:
            return None
        self._pos = match.end()
        return match.group()

    # -- values ------------------------------------------------------------

    def _value(self, path: KeyPath) -> None:
        text = self._text
        if text.startswith('"""', self._pos):
            self._skip_multiline('"""')
        elif text.startswith("'''", self._pos):
            self._skip_multiline("'''")
        elif self._peek() == '"':
            self._skip_basic_string()
        elif self._peek() == "'":
            self._skip_literal_string()
        elif self._peek() == "[":
            self._array(path)
        elif self._peek() == "{":
            self._inline_table(path)
        else:
            while self._pos < len(text) and text[self._pos] not in _SCALAR_END:
                self._pos += 1

    def _array(self, path: KeyPath) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip_blank(newlines=True)
            if self._peek() in ("]", ""):
                self._pos = min(self._pos + 1, len(self._text))
                return
            start = self._pos
            element = (*path, index)
            self._record(element, start)
            self._value(element)
            index += 1
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._pos += 1
            elif self._peek() == "]":
                self._pos += 1
                return
            else:
                return
            if self._pos == start:
                return

    def _inline_table(self, path: KeyPath) -> None:
        self._pos += 1
        while True:
            # TOML 1.0 keeps inline tables on one line; 1.1 allows newlines.
            self._skip_blank(newlines=True)
            if self._peek() in ("}", ""):
                self._pos = min(self._pos + 1, len(self._text))
                return
            start = self._pos
            if not self._key_value(path):
                return
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._pos += 1
            elif self._peek() == "}":
                self._pos += 1
                return
            else:
                return
            if self._pos == start:
                return

    # -- skipping ----------------------------------------------------------

    def _skip_blank(self, *, newlines: bool) -> None:
        text = self._text
        size = len(text)
        while self._pos < size:
            char = text[self._pos]
            if char in _WHITESPACE or (newlines and char == "\n"):
                self._pos += 1
            elif char == "#":
                end = text.find("\n", self._pos)
                self._pos = size if end < 0 else end
            else:
                return

    def _skip_basic_string(self) -> None:
        text = self._text
        size = len(text)
        self._pos += 1
        while self._pos < size:
            char = text[self._pos]
            if char == "\\":
                self._pos += 2
            elif char == '"':
                self._pos += 1
                return
            elif char == "\n":
                return
            else:
                self._pos += 1
        self._pos = min(self._pos, size)

    def _skip_literal_string(self) -> None:
        text = self._text
        quote = text.find("'", self._pos + 1)
        newline = text.find("\n", self._pos + 1)
        if quote < 0 or 0 <= newline < quote:
            self._pos = len(text) if newline < 0 else newline
        else:
            self._pos = quote + 1

    def _skip_multiline(self, delimiter: str) -> None:
        text = self._text
        size = len(text)
        self._pos += 3
        while self._pos < size:
            if delimiter == '"""' and text[self._pos] == "\\":
                self._pos += 2
                continue
            if text.startswith(delimiter, self._pos):
                self._pos += 3
                # Up to two quotes right before the delimiter belong to the content:
                # '''a''''' is "a''" and ends after the fifth quote.
                for _ in range(2):
                    if self._peek() == delimiter[0]:
                        self._pos += 1
                return
            self._pos += 1
        self._pos = size


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw
    out: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char != "\\" or index + 1 >= len(raw):
            out.append(char)
            index += 1
            continue
        code = raw[index + 1]
        width = {"u": 4, "U": 8, "x": 2}.get(code)
        if width is not None:
            digits = raw[index + 2 : index + 2 + width]
            try:
                out.append(chr(int(digits, 16)))
            except ValueError:
                out.append(raw[index : index + 2 + width])
            index += 2 + width
            continue
        out.append(_ESCAPES.get(code, "\\" + code))
        index += 2
    return "".join(out)
