"""Read a data file's text before `datasets` does, so any problem with the file itself is one line
naming the file, the line and what is wrong.

`datasets` turns a bad byte into a UnicodeDecodeError traceback, a truncated file or a row that is
not an object into "An error occurred while generating the dataset", and a column whose type changes
half-way (a number in row 30 of a text column) into a pandas fallback that converts the whole column
and then blames row 0. `check_file` finds each of these itself, in one pass with the standard
library:

- the bytes must be UTF-8 (line and column of the first byte that is not);
- JSON Lines: every non-blank line one JSON object; .json: an array of objects (or JSON Lines);
- every row's value in a column must share one type with the rows before it (null goes with
  anything, an integer with a float, and lists and objects are compared element by element).

CSV and Parquet files carry their own types; only a CSV's encoding is checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from alignctl.core.errors import DataError

# The type of a JSON value as Arrow would store it: a scalar name, ("list", element) or ("object", {key: type}).
Kind = Any
NULL = "null"


def check_file(path: Path) -> None:
    """Raise a DataError naming `path` (and the line) if it is not a readable data file of its kind."""
    if path.suffix == ".jsonl":
        _check_rows(path, lambda: _jsonl_rows(path))
    elif path.suffix == ".json":
        _check_rows(path, lambda: _json_rows(path))
    elif path.suffix == ".csv":
        for _ in _text_lines(path):
            pass


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, refusing the first one that is not UTF-8."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}: {err.reason}); "
                    "save the file as UTF-8"
                ) from None


class NonJsonNumber(Exception):
    """NaN, Infinity or -Infinity: Python's json reads them, Arrow does not, and no number is meant."""


def _refuse_constant(name: str) -> None:
    raise NonJsonNumber(name)


def _jsonl_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    """(line number, value) of every non-blank line of a JSON Lines file."""
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_refuse_constant)
        except NonJsonNumber as err:
            raise DataError(f"{path}:{number}: {err} is not a JSON value (Python writes it for a non-finite float); write a number or null") from None
        except json.JSONDecodeError as err:
            cut = "; the file looks truncated" if not line.endswith("\n") else ""
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg}: column {err.colno}){cut}") from None
        yield number, value


def _json_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Rows of a .json file: one array of objects, or JSON Lines under a .json name (datasets reads both)."""
    text = "".join(line for _, line in _text_lines(path))
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except NonJsonNumber as err:
        raise DataError(f"{path}: {err} is not a JSON value (Python writes it for a non-finite float); write a number or null") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # several objects: JSON Lines
            yield from _jsonl_rows(path)
            return
        # A whole document that breaks on its last line was cut short (a missing quote breaks where it is).
        cut = "; the file looks truncated" if err.lineno >= text.rstrip().count("\n") + 1 else ""
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg}: column {err.colno}){cut}") from None
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {len(v) for v in document.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: the columns of this column-wise JSON have different lengths ({', '.join(map(str, sorted(lengths)))})")
        document = [dict(zip(document, values)) for values in zip(*document.values())]
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of row objects, got {_describe(_kind(document))}")
    for row in document:
        yield None, row  # json.loads keeps no line numbers; the row number says where


def _check_rows(path: Path, read: Callable[[], Iterator[tuple[int | None, Any]]]) -> None:
    """Every row an object, every column one type; `read` gives (line, row) pairs, again if needed."""
    columns: dict[str, Kind] = {}
    index = -1
    for index, (line, row) in enumerate(read()):
        if not isinstance(row, dict):
            raise DataError(f"{_where(path, index, line)}: {_describe(_kind(row))}, not an object of column: value pairs")
        for column, value in row.items():
            merged = _merge(columns.get(column, NULL), _kind(value))
            if merged is None:
                _blame(path, column, read)
            columns[column] = merged
    if not columns and index >= 0:
        raise DataError(f"{path}: every row is an empty object; rows need columns such as prompt and completion")


def _where(path: Path, index: int, line: int | None) -> str:
    return f"{path}: row {index}" + (f" (line {line})" if line else "")


def _blame(path: Path, column: str, read: Callable[[], Iterator[tuple[int | None, Any]]]) -> None:
    """Raise for the row that does not fit the type most rows of `column` share. The first row that
    conflicts with the ones before it is not always the culprit: when row 0 is the odd one out, row 1
    is the first to disagree with it."""
    groups: list[list] = []  # [type, count, first conflicting row...] per family of compatible types
    values = [(index, line, _kind(row[column])) for index, (line, row) in enumerate(read()) if isinstance(row, dict) and column in row]
    for _, _, kind in values:
        for group in groups:
            merged = _merge(group[0], kind)
            if merged is not None:
                group[0], group[1] = merged, group[1] + 1
                break
        else:
            groups.append([kind, 1])
    majority, count = max(groups, key=lambda g: g[1])
    index, line, kind = next(v for v in values if _merge(majority, v[2]) is None)
    raise DataError(
        f"{_where(path, index, line)}, column {column!r}: holds {_describe(kind)}, but {count} other rows hold "
        f"{_describe(majority)}; a column must have one type in every row"
    )


def _kind(value: Any) -> Kind:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element: Kind = NULL
        for item in value:
            element = _merge(element, _kind(item))
            if element is None:
                return "mixed list"  # never merges with anything: reported as a type of its own
        return ("list", element)
    if isinstance(value, dict):
        return ("object", {key: _kind(item) for key, item in value.items()})
    return type(value).__name__


def _merge(a: Kind, b: Kind) -> Kind | None:
    """The type both values fit in (as Arrow would widen them), or None when there is none."""
    if a == NULL:
        return b
    if b == NULL:
        return a
    if "mixed list" in (a, b):
        return None
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0]:
        if a[0] == "list":
            inner = _merge(a[1], b[1])
            return None if inner is None else ("list", inner)
        fields = dict(a[1])
        for key, kind in b[1].items():
            merged = _merge(fields.get(key, NULL), kind)
            if merged is None:
                return None
            fields[key] = merged
        return ("object", fields)
    return a if a == b else None


def _describe(kind: Kind) -> str:
    if isinstance(kind, tuple):
        if kind[0] == "list":
            return "a list" if kind[1] == NULL else f"a list of {_plural(kind[1])}"
        return "an object"
    if kind == "mixed list":
        return "a list of values of different types"
    return {"null": "null", "boolean": "a boolean", "number": "a number", "string": "a string"}.get(kind, f"a {kind}")


def _plural(kind: Kind) -> str:
    text = _describe(kind)
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):] + "s"
    return text
