"""A pipeline: an ordered list of phases, each starting from the previous phase's best (weights only, optimizer
fresh), resumed in whichever phase it stopped.

Two forms of pipeline.json: the runner spec's `{"pretrain_config_path": ..., "sft_config_path": ...}`, exactly as
it has always been read, and a list that may name any phases in any number:

    {"phases": [{"phase": "pretrain", "config_path": "pretrain.json"},
                {"phase": "sft", "config_path": "sft.json"},
                {"phase": "sft", ...}]}            <- a phase appears once: its checkpoints folder is its name
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_accel import overrides as ov
from trainer_accel.config import PhaseConfig, read_json, resolve_config_path, shape_diff
from trainer_accel.errors import UserError, raise_if_any, unknown_key_message
from trainer_accel.phases.registry import TWO_PHASE_PIPELINE, load_config, phase_named, phase_names

LIST_KEY = "phases"
STEP_KEYS = {"phase", "config_path"}


@dataclass(frozen=True)
class Pipeline:
    phases: list[PhaseConfig]  # in the order they train
    path: Path


def is_pipeline(data: Any) -> bool:
    """Whether a config file's JSON is a pipeline's (of either form) rather than one phase's."""
    return isinstance(data, dict) and (LIST_KEY in data or any(f"{n}_config_path" in data for n in TWO_PHASE_PIPELINE))


def _two_phase_form(data: dict, where: str) -> list[tuple[str, Any]]:
    keys = {f"{name}_config_path" for name in TWO_PHASE_PIPELINE}
    problems = [unknown_key_message(where, k, keys) for k in data if k not in keys]
    for key in sorted(keys):
        if not isinstance(data.get(key), str):
            problems.append(f"{where}.{key}: expected the path of a config file, got {json.dumps(data.get(key))}")
    raise_if_any(problems)
    return [(name, data[f"{name}_config_path"]) for name in TWO_PHASE_PIPELINE]


def _list_form(data: dict, where: str) -> list[tuple[str, Any]]:
    problems = [unknown_key_message(where, k, {LIST_KEY}) for k in data if k != LIST_KEY]
    steps = data[LIST_KEY]
    if not isinstance(steps, list) or not steps:
        raise UserError(
            f'{where}.{LIST_KEY}: expected a non-empty list like [{{"phase": "pretrain", "config_path": '
            f'"pretrain.json"}}, ...], got {json.dumps(steps)}'
        )
    out, seen = [], set()
    for i, step in enumerate(steps):
        at = f"{where}.{LIST_KEY}[{i}]"
        if not isinstance(step, dict):
            problems.append(f'{at}: expected {{"phase": NAME, "config_path": PATH}}, got {json.dumps(step)}')
            continue
        problems += [unknown_key_message(at, k, STEP_KEYS) for k in step if k not in STEP_KEYS]
        name, path = step.get("phase"), step.get("config_path")
        if name not in phase_names():
            problems.append(f"{at}.phase: expected one of {', '.join(phase_names())}, got {json.dumps(name)}")
        elif name in seen:
            problems.append(f"{at}.phase: {name} is listed twice; each phase of a pipeline has its own checkpoints")
        seen.add(name)
        if not isinstance(path, str) or not path:
            problems.append(f"{at}.config_path: expected the path of a config file, got {json.dumps(path)}")
        out.append((name, path))
    raise_if_any(problems)
    return out


def load_pipeline(path: Path | str, overrides: list[ov.Override] = ()) -> Pipeline:
    """Every phase's config, checked together (a --set reaching several phases is said once); consecutive phases
    must be one model, since each starts from the one before."""
    path = Path(path)
    data = read_json(path, "pipeline config")
    where = str(path)
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object at the top level")
    steps = _list_form(data, where) if LIST_KEY in data else _two_phase_form(data, where)
    names = [name for name, _ in steps]
    problems: list[str] = []
    configs = []
    for name, value in steps:
        sub = resolve_config_path(value, path)
        try:
            configs.append(load_config(sub, name, ov.for_phase(list(overrides), name, phase_names())))
        except UserError as e:
            problems += [line for line in e.problems if line not in problems]
    if unknown := [o.text for o in overrides if o.keys[0] in phase_names() and o.keys[0] not in names]:
        problems.append(
            f"--set {unknown[0]}: this pipeline has no phase {unknown[0].split('.')[0]} ({', '.join(names)})"
        )
    raise_if_any(problems)
    for a, b in zip(configs, configs[1:]):
        if a.model != b.model:
            diff = shape_diff(a.model.to_dict(), b.model.to_dict())
            raise UserError(
                f"{where}: {a.phase} and {b.phase} model_cfg differ ({diff}); "
                f"{phase_named(b.phase).title} starts from the {a.phase} weights"
            )
    return Pipeline(phases=configs, path=path)
