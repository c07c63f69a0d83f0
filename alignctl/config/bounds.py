"""Declared ranges of the numeric config fields, and the one check that enforces them.

A numeric field of a config dataclass declares its valid range where it is typed::

    lr: float = within("(0, 10]")
    eval_every: int = within("[0, 1e9]", "0: only at the end")

`check_node` walks a merged (typed, not yet built) config node against its dataclass before
`__post_init__` runs: a number outside its field's range, or any float anywhere that is not finite
(inside lists and free-form mappings too, e.g. `recipe.optimizer.eps`), is a `ConfigError` naming the
key, the value and the range. `__post_init__` then checks only what involves several fields.

Every range is finite on both ends: an `inf` learning rate, a `1e30` step count or a negative seed
is refused at start-up instead of surfacing as a NaN loss or a numpy error after the model loaded.
No torch here: the CLI validates before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from alignctl.core.errors import ConfigError, shown

RANGE = "alignctl_range"  # the field-metadata key
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_open: bool
    high_open: bool
    note: str = ""  # what a special value means ("0: off"), shown in the message

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"

    def wording(self, integer: bool) -> str:
        """'a positive integer and <= 65536', '> 0 and <= 10', 'an integer >= 0 and <= 1000000000 (0: off)'."""
        if integer and self.low == 1 and not self.low_open:
            lower = "a positive integer"
        else:
            lower = f"{'an integer ' if integer else ''}{'>' if self.low_open else '>='} {_num(self.low)}"
        upper = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return f"{lower} and {upper}" + (f" ({self.note})" if self.note else "")


def _num(value: float) -> str:
    """1000000000 rather than 1e9 for whole numbers: the range reads as a value one can type."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def parse_interval(text: str, note: str = "") -> Range:
    match = _INTERVAL.match(text)
    if match is None:
        raise ValueError(f"not an interval such as '(0, 10]': {text!r}")
    left, low, high, right = match.groups()
    lo, hi = float(low), float(high)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"an interval needs finite ends in order: {text!r}")
    return Range(lo, hi, left == "(", right == ")", note)


def within(interval: str, note: str = "") -> Any:
    """A dataclass field (no default: defaults live in conf/) whose values must lie in `interval`,
    written as in mathematics: '(0, 10]', '[0, 1)', '[1, 1e6]'. For a list field, every element."""
    return field(metadata={RANGE: parse_interval(interval, note)})


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(RANGE)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_value(key: str, value: Any, bounds: Range | None) -> None:
    """One value (a number, or a container to search for floats) against its declared range."""
    if isinstance(value, dict):
        for name, inner in value.items():
            check_value(f"{key}.{name}", inner, None)
        return
    if isinstance(value, list | tuple):
        for index, inner in enumerate(value):
            check_value(f"{key}[{index}]", inner, bounds)
        return
    if not _is_number(value):
        return
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and (bounds is None or bounds.contains(value)):
        return
    integer = isinstance(value, int)
    if bounds is None:
        raise ConfigError(key, f"must be a finite number, got {shown(value)}")
    wording = bounds.wording(integer)
    raise ConfigError(key, f"must be {'' if finite else 'a finite number '}{wording}, got {shown(value)} (valid range {bounds.interval()})")


def _dataclass_of(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def check_node(section: str, schema: type, values: dict[str, Any]) -> None:
    """Check the plain values of one config section (`OmegaConf.to_container` of the merged node)
    against `schema`'s declared ranges; nested dataclass sections are checked the same way."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        key = f"{section}.{f.name}" if section else f.name
        value = values[f.name]
        nested = _dataclass_of(hints.get(f.name))
        if nested is not None and isinstance(value, dict):
            check_node(key, nested, value)
        else:
            check_value(key, value, field_range(f))


def unbounded_numeric_fields(schema: type, prefix: str = "") -> list[str]:
    """Numeric fields of `schema` (and its nested sections) that declare no range: a test keeps
    this empty, so a new number cannot slip in without one."""
    missing = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
        nested = _dataclass_of(hint)
        if nested is not None:
            missing += unbounded_numeric_fields(nested, f"{prefix}{f.name}.")
            continue
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is list and typing.get_args(a) else a for a in args]
        if any(a in (int, float) for a in inner) and field_range(f) is None:
            missing.append(prefix + f.name)
    return missing
