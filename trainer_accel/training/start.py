"""Where a phase's weights come from, answered in one place: its own checkpoint to resume (weights, optimizer and
step), or weights to start from with the optimizer fresh (`init_from`: one of our checkpoint directories, an
exported .pt or a Hugging Face model directory; in a pipeline the previous phase's best), or nothing (random
weights from the seed). Whatever is loaded is checked against the run's model config, and the run's lineage (the
`parent` every record carries) follows from the answer.

The run, --plan, doctor and the promotion gate's baseline all ask here, so a start point means one thing to all
of them: a Hugging Face directory is read by hf/directory.py and fitted to the model config, everything else by
checkpoints/loading.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer_accel.checkpoints.discovery import checkpoint_phase, find_resume_checkpoint
from trainer_accel.checkpoints.loading import LoadedCheckpoint, check_model_cfg, load_checkpoint
from trainer_accel.checkpoints.shapes import state_problems
from trainer_accel.config import ModelConfig, PhaseConfig
from trainer_accel.errors import UserError, raise_if_any
from trainer_accel.hf.directory import fit, is_hf_dir, load_hf_dir
from trainer_accel.models.build import build_model
from trainer_accel.observability.manifest import parent_record
from trainer_accel.paths import Paths


@dataclass
class StartPoint:
    resumed: LoadedCheckpoint | None = None  # this phase's own checkpoint: it continues (optimizer and step too)
    initial: LoadedCheckpoint | None = None  # weights only, optimizer fresh

    @property
    def weights(self) -> LoadedCheckpoint | None:
        return self.resumed or self.initial

    def lineage(self) -> dict[str, Any] | None:
        """The parent the run records: the checkpoint it was initialised from; a resumed run keeps the parent its
        checkpoint names (a resume from an exported .pt, which has no run, is a new run from it)."""
        if self.initial is not None:
            return parent_record(self.initial, "initialised")
        if self.resumed is not None and self.resumed.meta.get("run_id") is None:
            return parent_record(self.resumed, "resumed")
        return self.resumed.meta.get("parent") if self.resumed is not None else None


def model_for(cfg: PhaseConfig, start: StartPoint) -> torch.nn.Module:
    """The model a phase trains, on the CPU: its start point's weights, or random ones drawn from train_cfg.seed,
    so every process and every run of the config starts from the same weights."""
    torch.manual_seed(cfg.train.seed)
    weights = start.weights
    return build_model(
        cfg.model,
        state=weights.model_state if weights is not None else None,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )


def load_start(path: Path, model: ModelConfig | None, with_optimizer: bool) -> LoadedCheckpoint:
    """The weights (and, to resume, the optimizer state and step) at `path`; a Hugging Face directory fitted to
    `model` (its vocabulary grown to V) when one is given."""
    path = Path(path)
    if not is_hf_dir(path):
        return load_checkpoint(path, with_optimizer=with_optimizer)
    if with_optimizer:
        raise UserError(
            f"{path}: a Hugging Face directory has no optimizer state or step to resume; name it in the "
            "config's init_from to start from its weights"
        )
    loaded = load_hf_dir(path)
    return fit(loaded, model) if model is not None else loaded


def resume_point(
    cfg: PhaseConfig, paths: Paths, resume: Path | None, auto_resume: bool, starts_from_a_model: bool = False
) -> Path | None:
    """The checkpoint a phase resumes from: an explicit --resume of this phase, or its newest intact checkpoint."""
    if resume is not None:
        owner = checkpoint_phase(resume)
        if owner is not None and owner != cfg.phase:
            way = f"; set init_from in the {cfg.phase} config to start from its weights" if starts_from_a_model else ""
            raise UserError(f"{resume}: a {owner} checkpoint cannot resume the {cfg.phase} phase{way}")
        return resume
    return find_resume_checkpoint(paths.phase_dir(cfg.phase)) if auto_resume else None


def check_start_checkpoint(path: Path | None, cfg: PhaseConfig, with_optimizer: bool = True) -> LoadedCheckpoint | None:
    """Load the checkpoint a phase starts from (if any) and check that its weights fit the model config."""
    if path is None:
        return None
    loaded = load_start(path, cfg.model, with_optimizer)
    check_model_cfg(loaded, cfg.model.to_dict())
    broken = [k for k, t in loaded.model_state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:  # a run from them would diverge at its first step, and blame the learning rate
        raise UserError(
            f"{path}: weights {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} hold NaN or "
            "infinite values; start from an earlier checkpoint"
        )
    # the strict load the loop will do, done here so that --plan names a missing or wrong-shaped tensor too
    raise_if_any([f"{path}: {p}" for p in state_problems(loaded.model_state, cfg.model.to_dict())])
    return loaded


def same_tokenizer(start: LoadedCheckpoint | None, tokenizer: str) -> list[str]:
    """The weights a phase starts from must have learnt the ids its caches hold: the same tokenizer (a start that
    records none, such as a GPT-2 directory without a tokenizer.json, cannot be checked)."""
    learnt = start.meta.get("tokenizer") if start is not None else None
    if learnt is None or learnt == tokenizer:
        return []
    return [
        f"{start.source}: its weights learnt the ids of tokenizer {learnt}, this phase's caches were made with "
        f"{tokenizer}; prepare the caches with its tokenizer (prepare --tokenizer MODEL_DIR)"
    ]


def start_point(cfg: PhaseConfig, resume: Path | None, init: Path | None) -> StartPoint:
    """Load what the phase starts from: `resume` (a resume point, see resume_point) wins over `init`, since a
    resumed phase continues its own weights. Problems of both are said together."""
    init = init if resume is None else None
    problems, loaded = [], []
    for path, with_optimizer in ((resume, True), (init, False)):
        try:
            loaded.append(check_start_checkpoint(path, cfg, with_optimizer))
        except UserError as e:
            loaded.append(None)
            problems += e.problems
    raise_if_any(problems)
    return StartPoint(*loaded)
