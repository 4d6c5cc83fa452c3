"""Checking JSON objects against dataclasses: the one validation every config section and every record a past
run wrote goes through (types first, then each reader's own ranges).

A problem is a line naming the key; all of them are collected, never the first alone, so a user fixes a file in
one pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from trainer_accel.errors import unknown_key_message


def type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict:
        return isinstance(value, dict)
    return True


def type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}.get(
        annotation, str(annotation)
    )


def build_dataclass(cls: type, data: Any, where: str, problems: list[str], homes: dict[str, type] | None = None):
    """Build `cls` from a JSON object, appending one line per problem.

    Fields with a wrong type are left at their defaults, so the value checks can still run on the others and
    every problem is reported in one pass; returns None only when a required field is missing or wrong. `homes`:
    the other sections of the same file (name -> dataclass), so a key in the wrong one says where it belongs.
    """
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a JSON object, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            home = next(
                (
                    section
                    for section, other in (homes or {}).items()
                    if other is not cls and key in {f.name for f in dataclasses.fields(other)}
                ),
                None,
            )
            problems.append(
                f"{where}.{key}: unknown key (it belongs in {home}: {home}.{key})"
                if home
                else unknown_key_message(where, key, fields)
            )
    values, buildable = {}, True
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                problems.append(f"{where}.{name}: missing (expected {type_name(hints[name])})")
                buildable = False
        elif not type_ok(data[name], hints[name]):
            problems.append(f"{where}.{name}: expected {type_name(hints[name])}, got {json.dumps(data[name])}")
            buildable = buildable and not required
        else:
            values[name] = float(data[name]) if hints[name] is float else data[name]
    return cls(**values) if buildable else None
