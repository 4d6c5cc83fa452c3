"""Command-line overrides: `--set train_cfg.base_lr=1e-3`, and where each config value came from.

Precedence is TrainConfig defaults < the JSON config < `--set`. An override is applied to the config's JSON before
it is validated, so an overridden value gets exactly the checks a value in the file gets. Keys are checked here
first, against the same dataclasses, so a typo fails with the key named instead of silently adding a field.
In a pipeline, `train_cfg.x=...` applies to every phase and `NAME.train_cfg.x=...` to the phase of that name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from trainer_accel.errors import UserError, raise_if_any, unknown_key_message
from trainer_accel.fsio import UnreadableJSON, loads

MAPPING = "mapping"  # a schema entry for an object of free keys (sources -> probability)
# top-level key -> the field names of its section (an object of settings), MAPPING, or None (one value)
Schema = Mapping[str, frozenset | str | None]


@dataclass(frozen=True)
class Override:
    keys: tuple[str, ...]  # the dotted key, split: ("train_cfg", "base_lr")
    value: Any  # parsed as JSON; a bare word that is not JSON is taken as a string
    text: str  # as the user wrote it, for messages and the run manifest

    @property
    def dotted(self) -> str:
        return ".".join(self.keys)


def parse_override(text: str) -> Override:
    key, sep, raw = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not key.strip() or any(not k for k in keys):
        raise UserError(f"--set {text}: expected KEY=VALUE with a dotted KEY, e.g. --set train_cfg.base_lr=1e-3")
    try:
        value = loads(raw)
    except json.JSONDecodeError as e:
        if raw.strip()[:1] in ("{", "[", '"'):  # meant as JSON, so not a bare word: say what is wrong with it
            where = "" if isinstance(e, UnreadableJSON) else f" at character {e.pos + 1}"
            raise UserError(f"--set {text}: the value is not valid JSON ({e.msg}{where})") from None
        value = raw  # --set val_source=roam reads as the string it obviously is
    return Override(keys, value, text)


def parse_overrides(texts: list[str] | None) -> list[Override]:
    """Every --set parsed; all malformed ones reported together."""
    out, problems = [], []
    for t in texts or []:
        try:
            out.append(parse_override(t))
        except UserError as e:
            problems += e.problems
    raise_if_any(problems)
    return out


def _check_keys(keys: tuple[str, ...], schema: Schema, text: str, phase_names: Collection[str] = ()) -> None:
    """Raise naming the key when `keys` does not name a setting of the config."""
    top, kind = keys[0], schema.get(keys[0])
    if top in phase_names and top not in schema:  # a pipeline's phase prefix in a single-phase run
        raise UserError(
            f"--set {text}: a phase prefix ({top}.) is for --phase pipeline; in a run of one phase "
            f"write {'.'.join(keys[1:]) or 'the key alone'}=..."
        )
    if top not in schema:
        raise UserError(f"--set {text}: " + unknown_key_message("config", top, schema))
    if isinstance(kind, frozenset):
        if len(keys) > 2:
            raise UserError(f"--set {text}: {top} settings are one level deep, e.g. {top}.{sorted(kind)[0]}=...")
        if len(keys) == 2 and keys[1] not in kind:
            raise UserError(f"--set {text}: " + unknown_key_message(top, keys[1], kind))
    elif kind == MAPPING:
        if len(keys) > 2:
            raise UserError(f"--set {text}: {top} takes {top}.NAME=VALUE or {top}={{...}}")
    elif len(keys) != 1:
        raise UserError(f"--set {text}: {top} is a single value; set it whole ({top}=...)")


def apply(data: dict, overrides: list[Override], schema: Schema, phase_names: Collection[str] = ()) -> dict:
    """The config's JSON with the overrides applied, in order (a copy; the file's dict is left as it was).
    `phase_names`: the phases a pipeline's prefixed --set may name, refused in a run of one phase."""
    out = copy.deepcopy(data)
    problems = []
    for o in overrides:  # every unknown key at once, not the first only
        try:
            _check_keys(o.keys, schema, o.text, phase_names)
        except UserError as e:
            problems += e.problems
    raise_if_any(problems)
    for o in overrides:
        node = out
        for k in o.keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise UserError(f"--set {o.text}: {k} in the config is not an object")
            node = node[k]
        node[o.keys[-1]] = o.value
    return out


def blame(problems: list[str], where: str, overrides: list[Override]) -> list[str]:
    """Problems about an overridden value say so: the file does not hold the value the message quotes."""
    out = []
    for line in problems:
        # the problem's key: "sources" in "cfg.json.sources: probabilities must sum to 1" (--set sources.wiki=1)
        key = line[len(where) + 1 :].split(":")[0] if line.startswith(f"{where}.") else None
        culprit = next(
            (
                o
                for o in reversed(overrides)
                if key is not None
                and (o.dotted == key or o.dotted.startswith(f"{key}.") or key.startswith(f"{o.dotted}."))
            ),
            None,
        )
        out.append(line if culprit is None else f"{line} (from --set {culprit.text})")
    return out


def for_phase(overrides: list[Override], phase: str, phase_names: Collection[str]) -> list[Override]:
    """The overrides of a pipeline that reach one phase: unprefixed ones and those prefixed with its name (any of
    `phase_names` is a prefix)."""
    out = []
    for o in overrides:
        if o.keys[0] not in phase_names:
            out.append(o)
        elif len(o.keys) < 2:
            raise UserError(f"--set {o.text}: name a key inside the phase, e.g. {o.keys[0]}.train_cfg.base_lr=1e-3")
        elif o.keys[0] == phase:
            out.append(Override(o.keys[1:], o.value, o.text))
    return out


def provenance(file_data: dict, overrides: list[Override], schema: Schema) -> dict[str, str]:
    """Where each setting's value came from, by dotted key: "default", "file" or "override"."""

    def origin(keys: tuple[str, ...]) -> str:
        if any(o.keys == keys[: len(o.keys)] for o in overrides):
            return "override"
        node: Any = file_data
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return "default"
            node = node[k]
        return "file"

    out = {}
    for top in sorted(schema):
        kind = schema[top]
        if isinstance(kind, frozenset):
            out.update({f"{top}.{name}": origin((top, name)) for name in sorted(kind)})
        else:
            out[top] = origin((top,)) if not any(o.keys[0] == top for o in overrides) else "override"
    return out
