"""The phases there are: the built-in ones, and any an installed package declares in the `trainer_accel.phases`
entry-point group (`[project.entry-points."trainer_accel.phases"] NAME = "module:PHASE"`), found in every command,
so a checkpoint of such a phase is exported, resumed and evaluated like a built-in one's.

Everything that needs to know what a phase does asks here by name: `--phase` choices, config validation, --set
prefixes, --plan, doctor, queue, runs, evaluation, the gate, export and inference.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from pathlib import Path
from typing import Any

from trainer_accel import overrides as ov
from trainer_accel.config import COMMON_KEYS, PhaseConfig, load_phase_config
from trainer_accel.errors import UserError
from trainer_accel.phases.phase import Gate, Phase
from trainer_accel.phases.preference import PREFERENCE
from trainer_accel.phases.pretrain import PRETRAIN
from trainer_accel.phases.sft import SFT

BUILT_IN = (PRETRAIN, SFT, PREFERENCE)
ENTRY_POINTS = "trainer_accel.phases"
PIPELINE = "pipeline"  # --phase pipeline: the phases a pipeline config lists, in order
# what a pipeline.json of two keys (pretrain_config_path, sft_config_path) runs: the runner spec's two phases
TWO_PHASE_PIPELINE = ("pretrain", "sft")
NAME = re.compile(r"[a-z][a-z0-9_]*")


@functools.cache
def phases() -> dict[str, Phase]:
    """Every phase by name, built-in first, then installed ones in entry-point order."""
    found = {p.name: p for p in BUILT_IN}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        where = f"entry point {entry.name} = {entry.value} ({ENTRY_POINTS})"
        try:
            phase = entry.load()
        except Exception as e:  # noqa: BLE001 - a plugin's import error is its author's to fix; said in one line
            raise UserError(f"{where}: cannot be loaded ({type(e).__name__}: {e})") from None
        if not isinstance(phase, Phase):
            raise UserError(f"{where}: is a {type(phase).__name__}, not a trainer_accel.phases.phase.Phase")
        if not isinstance(phase.name, str) or not NAME.fullmatch(phase.name) or phase.name in COMMON_KEYS:
            raise UserError(
                f"{where}: name {phase.name!r} is not a usable phase name (lowercase letters, digits and _, starting "
                "with a letter; it names a checkpoints folder and a --set prefix, so not a config key)"
            )
        if phase.name in found or phase.name == PIPELINE:
            raise UserError(f"{where}: a phase named {phase.name!r} exists already; give it another name")
        found[phase.name] = phase
    return found


def phase_names() -> tuple[str, ...]:
    return tuple(phases())


def phase_named(name: str) -> Phase:
    known = phases()
    if name not in known:
        raise UserError(
            f"phase {name!r} is not known (known: {', '.join(known)}; a phase of another package is found once "
            f"that package is installed, through the {ENTRY_POINTS} entry points)"
        )
    return known[name]


def phase_of(meta: dict[str, Any]) -> Phase | None:
    """The phase a checkpoint's or export's record names, if it is one this installation knows."""
    return phases().get(meta.get("phase")) if isinstance(meta, dict) else None


def is_chat_model(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's model answers in a chat template: its phase says so; a phase not installed here
    says so by its record, which holds the template its caches were written in; a record without a phase (a .pt
    without its record) is taken for a pretrained model."""
    if not isinstance(meta, dict) or meta.get("phase") is None:
        return False
    phase = phase_of(meta)
    return phase.chat_model if phase is not None else "chat" in meta


def gate_of(meta: dict[str, Any]) -> Gate:
    """The gate that judges a checkpoint: its phase's; SFT's (better answers, no text forgotten) for a phase
    without one of its own, as `runs evaluate` has always judged any candidate."""
    phase = phase_of(meta)
    return phase.gate if phase is not None and phase.gate is not None else SFT.gate


def load_config(path: Path | str, name: str, overrides: list[ov.Override] = ()) -> PhaseConfig:
    """The config of phase `name` at `path`: defaults < the file < the --set overrides."""
    phase = phase_named(name)
    return load_phase_config(path, name, phase.keys, overrides, phase_names())


def guess_phase(data: Any) -> Phase:
    """The phase a config file is for (doctor is given a file and no --phase): the first whose sources key it
    holds; pretraining, whose sources have a default, when it holds none."""
    if isinstance(data, dict):
        for phase in phases().values():
            if phase.keys.sources_key in data:
                return phase
    return PRETRAIN


def describe() -> str:
    """The phases for --help: each with what it trains."""
    return "; ".join(f"{p.name}: {p.doc}" for p in phases().values()) + f"; {PIPELINE}: the phases of a pipeline config"
