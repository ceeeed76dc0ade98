"""The typed builder: plain data (parsed YAML) -> frozen dataclasses, collecting every problem.

Generic over the dataclasses it is given: every problem names the dotted key, the value and what it
must be; an unknown key gets a did-you-mean and the section's valid keys, a renamed one its new
name. YAML's quirks are met the way people mean them: `1e-5` (read as text by YAML 1.1) is a
number, a `str` field takes `0`/`1` as text, a `str | int` field keeps YAML's 1 as the index 1.
(pydantic was measured as a replacement: about 20 lines fewer once its errors are translated to
these messages, ~160 ms more import per process, and a new core dependency; see docs/architecture.md.)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Literal


def build(cls: type, raw: Any, prefix: str, problems: list[str], renamed: dict[str, str] | None = None) -> Any:
    """An instance of dataclass `cls` from `raw`, appending every problem to `problems` (fields
    with a problem keep their defaults). `renamed` maps old dotted keys to their new names."""
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping, got {raw!r}")
        return cls()
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    for key in unknown:
        if renamed and f"{prefix}{key}" in renamed:
            problems.append(f"{prefix}{key} was renamed to {renamed[f'{prefix}{key}']}: write that instead (docs/migration.md)")
            continue
        close = _closest(str(key), list(fields))
        hint = f" (did you mean {close!r}?)" if close else ""
        problems.append(f"unknown key {prefix}{key}{hint}; valid keys of {where}: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(typing.cast(type, tp), raw[name], f"{prefix}{name}.", problems, renamed)
        else:
            ok, value = coerce(raw[name], tp)
            if ok:
                kwargs[name] = value
            else:
                problems.append(f"{prefix}{name}={raw[name]!r} must be {describe(tp)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # pragma: no cover - fields are checked above
        problems.append(f"{where}: {exc}")
        return cls()


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, the value as type `tp`) or (False, None) when `value` cannot be one."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        if type(value) in args:  # `str | int` keeps YAML's 1 as the index 1, "1" as a name
            return True, value
        for arg in args:
            if arg is type(None):
                continue
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if origin is Literal:
        return (value in args), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        out = []
        for v in value:
            ok, c = coerce(v, args[0])
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, None
        out_d = {}
        for k, v in value.items():
            ok_k, ck = coerce(k, args[0])
            ok_v, cv = coerce(v, args[1])
            if not (ok_k and ok_v):
                return False, None
            out_d[ck] = cv
        return True, out_d
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return True, float(value)
            except OverflowError:  # an integer too large for a float
                return False, None
        # YAML 1.1 reads `1e-5` (no dot) as text; it is a number to anyone writing a learning rate.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return True, float(value)
        return False, None
    if tp is str:
        # YAML turns `0`/`1`/`true` into numbers/bools; label maps and names want the text back.
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return isinstance(value, tp), value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def describe(tp: Any) -> str:
    """What a value of type `tp` must be, in words."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "anything"}.get(tp, str(tp))


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, evaluated once per class (it dominates a build otherwise)."""
    return typing.get_type_hints(cls)
