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
import math
import re
import reprlib
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
        problems.append(f"{where} must be a mapping, got {shown(raw)}")
        return cls()
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    for key in unknown:
        if renamed and f"{prefix}{key}" in renamed:
            problems.append(f"{prefix}{key} was renamed to {renamed[f'{prefix}{key}']}: write that instead (docs/migration.md)")
            continue
        name = _clip(str(key))
        close = _closest(name, list(fields))
        hint = f" (did you mean {close!r}?)" if close else ""
        problems.append(f"unknown key {prefix}{name}{hint}; valid keys of {where}: {', '.join(fields)}")
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
            elif is_non_finite(raw[name]) and takes_float(tp):
                problems.append(non_finite_problem(f"{prefix}{name}", raw[name], fields[name].default))
            else:
                problems.append(f"{prefix}{name}={shown(raw[name])} must be {describe(tp)}")
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
        # `str | int` keeps YAML's 1 as the index 1, "1" as a name; a float still has to be finite.
        if type(value) in args and type(value) is not float:
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
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer too large for a float
                return False, None
        # YAML 1.1 reads `1e-5` (no dot) as text; it is a number to anyone writing a learning rate.
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            number = float(value)
        # NaN passes every `<=`/`>=` range check and infinity most of them: neither is a setting.
        if number is None or not math.isfinite(number):
            return False, None
        return True, number
    if tp is str:
        # YAML turns `0`/`1`/`true` into numbers/bools; label maps and names want the text back.
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return False, None
    return isinstance(value, tp), value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_SHOWN = 200
"""The most characters of a value that a message quotes."""
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, _SHOWN, _SHOWN
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 20


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


def is_non_finite(value: Any) -> bool:
    """Whether `value` is NaN or an infinity: a float (YAML `.nan`, `.inf`, `1e999`) or text that
    reads as one (`nan`, `inf`, `-Infinity`, as an `a.b=value` override gives them)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def takes_float(tp: Any) -> bool:
    """Whether a field of type `tp` holds a float (`float`, `float | None`)."""
    return tp is float or float in typing.get_args(tp)


def non_finite_problem(key: str, value: Any, default: Any = None) -> str:
    """The message for a NaN or infinite value of the float setting `key`."""
    example = f"e.g. {key}={default}" if isinstance(default, float) and math.isfinite(default) else "or null"
    return f"{key}={shown(value)} is not a finite number: NaN and infinity are not settings; set a real number ({example})"


def shown(value: Any, limit: int = _SHOWN) -> str:
    """`repr(value)` for a message, at most about `limit` characters and never built in full: an
    aliased YAML value can repr to hundreds of megabytes."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"
    text = _SHORT_REPR.repr(value)
    if isinstance(value, (list, tuple, dict, set)) and (len(text) > limit or _SHORT_REPR.fillvalue in text):
        return f"{text[:limit]}... ({len(value)} items)"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _clip(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _closest(word: str, options: list[str]) -> str | None:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return match[0] if match else None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, evaluated once per class (it dominates a build otherwise)."""
    return typing.get_type_hints(cls)
