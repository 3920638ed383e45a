"""A run config's validation errors as one line each: where (the key), what was expected, what was given, the fix
(pydantic's `ValidationError` -> `ConfigError`)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Mapping
from typing import Annotated, Any

from pydantic import ValidationError

__all__ = ["ConfigError", "config_error", "unknown_key"]


class ConfigError(ValueError):
    """A problem with a run config; the message names the key and how to fix it."""


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a finite number",
    "float_parsing": "a finite number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
    "dataclass_type": "a mapping of keys to values",
    "dataclass_exact_type": "a mapping of keys to values",
}


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _annotation_at(loc: tuple[Any, ...], root: type) -> Any:
    """The schema type at ``loc`` under ``root`` (None where the schema has no such key)."""
    tp: Any = root
    for part in loc:
        while True:  # unwrap Annotated[...] and X | None
            if typing.get_origin(tp) is Annotated:
                tp = typing.get_args(tp)[0]
            elif typing.get_origin(tp) in (typing.Union, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            else:
                break
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(str(part))
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else args[int(part)]
        else:
            return None
    return tp


def _keys_of(loc: tuple[Any, ...], root: type, internal: Collection[str]) -> list[str]:
    tp = _annotation_at(loc, root)
    if not dataclasses.is_dataclass(tp):
        return []
    return [f.name for f in dataclasses.fields(tp) if not (tp is root and f.name in internal)]


def unknown_key(loc: tuple[Any, ...], source: str, root: type, internal: Collection[str] = ()) -> ConfigError:
    """The error for an unknown key at ``loc`` of the schema ``root`` (a dataclass), with the valid keys there (less
    ``root``'s ``internal`` fields) and the closest one."""
    where, valid = _where(loc[:-1]), _keys_of(loc[:-1], root, internal)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{source}: unknown key {_where(loc)!r}{hint}. Fix: valid keys "
        f"{'in ' + where if where else 'at the top level'} are {', '.join(valid)}"
    )


def config_error(err: ValidationError, source: str, root: type, internal: Collection[str] = ()) -> ConfigError:
    """The first error of ``err`` (validating the schema ``root``) as one line: where, what was expected, what was
    given, the fix."""
    errors = err.errors(include_url=False)
    # a data entry is a file name or a dataset mapping: report the branch that matches what was given
    e = next((x for x in errors if not (x["type"] == "string_type" and isinstance(x.get("input"), Mapping))), errors[0])
    kind, value = e["type"], e.get("input")
    loc = tuple(part for part in e["loc"] if part not in ("str", "DatasetSection"))
    where, ctx = _where(loc), e.get("ctx") or {}
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return unknown_key(loc, source, root, internal)
    if kind == "missing":
        if loc and isinstance(loc[-1], int):  # a fixed-length list too short
            return ConfigError(f"{source}: {_where(loc[:-1])} must be a list of {loc[-1] + 1} or more values")
        return ConfigError(f"{source}: missing key {where!r}. Fix: add it to the config")
    if kind == "value_error":  # a check across keys in a section's __post_init__
        message = str(ctx.get("error", e["msg"]))
        return ConfigError(f"{source}: {where or 'the top level'}: {message}")
    if kind == "literal_error":
        choices = typing.get_args(_annotation_at(loc, root))
        return ConfigError(f"{source}: {where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if kind in ("greater_than_equal", "greater_than"):
        bound = ">=" if kind == "greater_than_equal" else ">"
        return ConfigError(f"{source}: {where} must be {bound} {ctx.get('ge', ctx.get('gt'))}, got {value!r}")
    expected = ctx.get("expected") if kind == "expected" else _EXPECTED.get(kind)
    if expected is not None:
        if expected.startswith("a mapping of keys"):
            return ConfigError(f"{source}: {where or 'the top level'} must be {expected}, got {type(value).__name__}")
        return ConfigError(f"{source}: {where} must be {expected}, got {value!r}")
    return ConfigError(f"{source}: {where or 'the top level'}: {e['msg']}")  # any other pydantic check
