from __future__ import annotations

import tomllib
from collections.abc import Iterator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pitcher_rpc.config.lines import KeyPath, LineIndex, find_line, format_key_path

# Line numbers in the assertions below are counted in this text, 1-based.
REALISTIC = '''\
# Pitcher proxy, production
title = "edge"                      # a top-level key before any table

[server]
listen = "0.0.0.0:8080"
banner = """
[fake.table]
timeout = 99
"""  # the lines above are string content, not TOML
motd = \'\'\'
[[routes]]
\'\'\'

[upstream]
connect_timeout = 1.5

[[routes]]
prefix = "/tcp/"
cluster = "echo_tcp"

[[routes]]
name = "api"
host = "*.example.com"
prefix = "/api/"   # trailing comment
cluster = "api"
timeout = -3
idempotent_methods = [
  "GET",
  # a comment between elements
  "PUT",
]

[[routes.rewrites]]
from = "/a"

[[routes.rewrites]]
from = "/b"

[routes.limits]
rate = 10

[clusters.echo_tcp]
balance = "weighted"
nodes = [
  "tcp://127.0.0.1:7101",
  { uri = "unix:///tmp/echo.sock", weight = 3 },
  {uri="tcp://10.0.0.2:7101",weight=2},
]

[clusters."api.v2"]
nodes = ["tcp://10.0.0.1:80", "tcp://10.0.0.2:80"]
site."x.y".z = 1
'''


def test_realistic_file_is_valid_toml() -> None:
    tomllib.loads(REALISTIC)


def test_table_headers_and_keys() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("title",)) == 2
    assert index.line_of(("server",)) == 4
    assert index.line_of(("server", "listen")) == 5
    assert index.line_of(("upstream",)) == 14
    assert index.line_of(("upstream", "connect_timeout")) == 15


def test_multiline_string_content_is_not_mistaken_for_keys() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("server", "banner")) == 6
    assert index.line_of(("server", "motd")) == 10
    assert index.line_of(("fake",)) is None
    # If '[[routes]]' inside the literal string counted, every index would shift.
    assert index.line_of(("routes", 0)) == 17
    assert index.line_of(("routes", 1)) == 21


def test_array_of_tables_counts_occurrences() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("routes", 0, "prefix")) == 18
    assert index.line_of(("routes", 1, "name")) == 22
    assert index.line_of(("routes", 1, "prefix")) == 24
    assert index.line_of(("routes", 1, "timeout")) == 26


def test_multiline_array_elements_have_their_own_lines() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("routes", 1, "idempotent_methods")) == 27
    assert index.line_of(("routes", 1, "idempotent_methods", 0)) == 28
    assert index.line_of(("routes", 1, "idempotent_methods", 1)) == 30


def test_nested_array_of_tables_is_relative_to_the_enclosing_element() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("routes", 1, "rewrites", 0)) == 33
    assert index.line_of(("routes", 1, "rewrites", 1, "from")) == 37
    assert index.line_of(("routes", 1, "limits", "rate")) == 40
    assert index.line_of(("routes", 0, "rewrites")) == 17  # falls back to routes[0]


def test_inline_tables_inside_arrays() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("clusters", "echo_tcp", "nodes", 0)) == 45
    assert index.line_of(("clusters", "echo_tcp", "nodes", 1)) == 46
    assert index.line_of(("clusters", "echo_tcp", "nodes", 1, "weight")) == 46
    assert index.line_of(("clusters", "echo_tcp", "nodes", 2, "uri")) == 47


def test_quoted_and_dotted_keys() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("clusters", "api.v2")) == 50
    assert index.line_of(("clusters", "api.v2", "nodes", 1)) == 51
    assert index.line_of(("clusters", "api.v2", "site", "x.y", "z")) == 52
    assert index.line_of(("clusters", "api.v2", "site")) == 52
    # The quoted key "api.v2" is one key, not the path api -> v2.
    assert index.line_of(("clusters", "api")) == 42


def test_falls_back_to_the_nearest_enclosing_key() -> None:
    index = LineIndex(REALISTIC)
    assert index.line_of(("routes", 0, "timeout")) == 17  # missing key -> its table header
    assert index.line_of(("server", "backlog")) == 4
    assert index.line_of(("clusters", "echo_tcp", "nodes", 9)) == 44
    assert index.line_of(("clusters", "nope", "nodes")) == 42  # first [clusters.*] header
    assert index.line_of(("nowhere", "at", "all")) is None
    assert index.line_of(()) is None


def _paths(value: Any, path: KeyPath = ()) -> Iterator[KeyPath]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*path, index)
            yield from _paths(item, (*path, index))


def test_every_parsed_key_is_found_on_a_line_naming_it() -> None:
    lines = REALISTIC.splitlines()
    index = LineIndex(REALISTIC)
    for path in _paths(tomllib.loads(REALISTIC)):
        line = index.line_of(path)
        assert line is not None, path
        last = path[-1]
        if isinstance(last, str) and "." not in last:
            assert last in lines[line - 1], (path, line)


def test_inline_table_as_a_value_and_crlf_line_endings() -> None:
    text = 'a = 1\r\n[t]\r\ninline = { x = 1, y = { z = "}" } }\r\nafter = 2\r\n'
    tomllib.loads(text)
    index = LineIndex(text)
    assert index.line_of(("t", "inline", "y", "z")) == 3
    assert index.line_of(("t", "after")) == 4


def test_strings_with_escaped_quotes_and_hashes() -> None:
    text = 'a = "say \\"hi\\" # not a comment"\nb = \'c:\\\\path#x\'\n"quoted \\u0041" = 3\nc = 4\n'
    tomllib.loads(text)
    index = LineIndex(text)
    assert index.line_of(("b",)) == 2
    assert index.line_of(("quoted A",)) == 3
    assert index.line_of(("c",)) == 4


def test_multiline_string_ending_with_extra_quotes() -> None:
    text = 'a = """x""""\nb = \'\'\'y\'\'\'\'\'\nc = """\\""""\nd = 1\n'
    assert tomllib.loads(text) == {"a": 'x"', "b": "y''", "c": '"', "d": 1}
    assert find_line(text, ("d",)) == 4


def test_array_of_arrays_and_dates() -> None:
    text = "when = 1979-05-27 07:32:00Z\nmatrix = [[1, 2], [\n  3,\n  4]]\nafter = true\n"
    tomllib.loads(text)
    index = LineIndex(text)
    assert index.line_of(("matrix", 1)) == 2
    assert index.line_of(("matrix", 1, 1)) == 4
    assert index.line_of(("after",)) == 5


def test_table_defined_after_its_subtable_takes_the_header_line() -> None:
    text = "[a.b]\nx = 1\n\n[a]\ny = 2\n"
    tomllib.loads(text)
    index = LineIndex(text)
    assert index.line_of(("a",)) == 4
    assert index.line_of(("a", "b")) == 1
    assert index.line_of(("a", "z")) == 4


def test_broken_text_never_raises() -> None:
    for text in ("[", "[[", "a = [", 'a = "', "a = {", '"""', "= 1\nb = 2", "[a\nb = 1", "\\"):
        index = LineIndex(text)
        index.line_of(("a", 0, "b"))
    assert LineIndex("= 1\nb = 2").line_of(("b",)) == 2
    assert LineIndex("[a\nb = 1").line_of(("b",)) == 2


def test_wrong_input_types_give_none() -> None:
    assert LineIndex(None).line_of(("a",)) is None  # type: ignore[arg-type]
    assert LineIndex("a = 1").line_of(None) is None  # type: ignore[arg-type]


@given(st.text(alphabet="[]{}\"'=#.,\n \tab1_-\\"))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    index = LineIndex(text)
    line = index.line_of(("a", 0, "b"))
    assert line is None or 1 <= line <= text.count("\n") + 1


def test_format_key_path() -> None:
    assert format_key_path(("routes", 1, "timeout")) == "routes[1].timeout"
    assert format_key_path(("clusters", "api.v2", "nodes", 0)) == 'clusters."api.v2".nodes[0]'
    assert format_key_path(()) == ""


# -- generated documents ------------------------------------------------------
#
# A small TOML writer over generated documents: whatever tomllib reads back
# from it, the index must place every key path on a line that names its key.

_KEYS = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_-]{0,6}", fullmatch=True),
    st.sampled_from(["a.b", "with space", "x#y", "[t]", 'q"uote']),
)
_STRING_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x7f"), max_size=12
) | st.sampled_from(["[fake]\nk = 1", "# not a comment", "a = [", "}"])
_SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.booleans(), _STRING_TEXT, st.sampled_from([1.5, -0.25])
)


def _tables(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    values: list[st.SearchStrategy[Any]] = [
        _SCALARS,
        st.lists(_SCALARS, max_size=3),
        st.dictionaries(_KEYS, _SCALARS, max_size=2).map(lambda d: {"__inline__": d}),
    ]
    if depth > 0:
        values.append(_tables(depth - 1))
        values.append(st.lists(_tables(depth - 1), min_size=1, max_size=2))
    return st.dictionaries(_KEYS, st.one_of(values), max_size=4)


def _key(key: str) -> str:
    return (
        key if key.replace("_", "a").replace("-", "a").isalnum() and key.isascii() else _basic(key)
    )


def _basic(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out) + '"'


def _scalar(value: Any, choice: int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        literal_ok = all(char == "\n" or ord(char) >= 0x20 for char in value)
        if choice % 2 and literal_ok and "'''" not in value and not value.endswith("'"):
            return "'''\n" + value + "'''"
        return _basic(value)
    return repr(value)


def _is_aot(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__inline__"}:
            return _plain(value["__inline__"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _dump(table: dict[str, Any], header: tuple[str, ...] = (), out: list[str] | None = None) -> str:
    out = [] if out is None else out
    nested: list[tuple[str, Any]] = []
    for number, (key, value) in enumerate(table.items()):
        if isinstance(value, dict) and set(value) == {"__inline__"}:
            items = ", ".join(
                f"{_key(k)} = {_scalar(v, number)}" for k, v in value["__inline__"].items()
            )
            out.append(f"{_key(key)} = {{ {items} }}")
        elif isinstance(value, dict) or _is_aot(value):
            nested.append((key, value))
        elif isinstance(value, list):
            if number % 2:
                out.append(f"{_key(key)} = [  # elements follow")
                out.extend(f"  {_scalar(v, i)},  # element" for i, v in enumerate(value))
                out.append("]")
            else:
                out.append(f"{_key(key)} = [{', '.join(_scalar(v, 0) for v in value)}]")
        else:
            out.append(f"{_key(key)} = {_scalar(value, number)}  # comment")
    for key, value in nested:
        path = (*header, key)
        dotted = ".".join(_key(part) for part in path)
        for item in value if isinstance(value, list) else [value]:
            out.append("")
            out.append(f"[[{dotted}]]" if isinstance(value, list) else f"[{dotted}]")
            _dump(item, path, out)
    return "\n".join(out) + "\n"


@given(_tables(2))
def test_generated_documents_locate_every_key(document: dict[str, Any]) -> None:
    text = _dump(document)
    parsed = tomllib.loads(text)
    assert parsed == _plain(document)
    # Only LF ends a TOML line; str.splitlines would also split on U+0085 and others.
    lines = text.split("\n")
    index = LineIndex(text)
    for path in _paths(parsed):
        line = index.line_of(path)
        assert line is not None, (path, text)
        last = path[-1]
        if isinstance(last, str):
            assert _key(last) in lines[line - 1], (path, line, text)
