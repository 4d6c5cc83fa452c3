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

import logging
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
from trainer_accel.hf.peft import is_peft_dir, read_peft_base
from trainer_accel.models.build import build_model
from trainer_accel.models.lora import is_adapter_name, lora_converter, merged_state
from trainer_accel.observability.manifest import parent_record
from trainer_accel.paths import Paths
from trainer_accel.training.adapters import (
    adapter_config_of,
    base_problems,
    base_quantizers,
    base_record,
    is_adapter,
    load_peft_adapter,
    merge_base,
    recorded_base,
    require_adapter_base,
    settings_problems,
    weights_sha256,
)

log = logging.getLogger(__name__)


@dataclass
class StartPoint:
    resumed: LoadedCheckpoint | None = None  # this phase's own checkpoint: it continues (optimizer and step too)
    initial: LoadedCheckpoint | None = None  # weights only, optimizer fresh (an adapter run: its base, when new)
    base: LoadedCheckpoint | None = None  # an adapter run's frozen base; `resumed` then holds the adapter alone
    adapter: LoadedCheckpoint | None = None  # an adapter run's imported adapter to go on training (init_from)
    base_record: dict[str, Any] | None = None  # what the run's adapter checkpoints record of the base

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


def adapter_converters(cfg: PhaseConfig) -> list:
    """The converters models/build.py applies for a phase: its adapter's (none for full training)."""
    return [lora_converter(cfg.adapter, cfg.model)] if cfg.adapter is not None else []


def model_shapes(cfg: PhaseConfig) -> torch.nn.Module:
    """The phase's model on the meta device (nothing allocated, however big): its parameters, which of them train,
    and so what its checkpoints hold (checkpoints/full_state.checkpoint_bytes)."""
    return build_model(
        cfg.model, "meta", converters=adapter_converters(cfg), trains=is_adapter_name if cfg.adapter else None
    )


def model_for(cfg: PhaseConfig, start: StartPoint) -> torch.nn.Module:
    """The model a phase trains, on the CPU: its start point's weights, or random ones drawn from train_cfg.seed,
    so every process and every run of the config starts from the same weights. An adapter run: the frozen base
    with the adapter resumed, imported, or drawn fresh from the seed."""
    torch.manual_seed(cfg.train.seed)
    if cfg.adapter is not None:
        adapter = start.resumed or start.adapter
        return build_model(
            cfg.model,
            state={**start.base.model_state, **(adapter.model_state if adapter is not None else {})},
            converters=adapter_converters(cfg),
            trains=is_adapter_name,
            activation_checkpointing=cfg.train.activation_checkpointing,
            after_load=base_quantizers(cfg.adapter),
        )
    weights = start.weights
    return build_model(
        cfg.model,
        state=weights.model_state if weights is not None else None,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )


def load_start(
    path: Path, model: ModelConfig | None, with_optimizer: bool, merge: bool = True, approved: str | None = None
) -> LoadedCheckpoint:
    """The weights (and, to resume, the optimizer state and step) at `path`; a Hugging Face directory fitted to
    `model` (its vocabulary grown to V) when one is given. An adapter (our adapter checkpoint, or a PEFT adapter
    directory) is merged into the base it records (`merge`), so that everything that runs a model sees the base
    with the adapter on; unmerged, its state holds the adapter alone (an adapter run's own start)."""
    path = Path(path)
    if is_peft_dir(path):
        if model is None:  # the model is its base's: read that first
            base = require_adapter_base_path(path)
            model = ModelConfig(**load_start(base, None, False).meta["model_cfg"])
        loaded = load_peft_adapter(path, model)
        return with_adapter_merged(loaded) if merge else loaded
    if not is_hf_dir(path):
        loaded = load_checkpoint(path, with_optimizer=with_optimizer, approved=approved)
        return with_adapter_merged(loaded) if merge and is_adapter(loaded) else loaded
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
    return checked_weights(load_start(path, cfg.model, with_optimizer), path, cfg)


def checked_weights(loaded: LoadedCheckpoint, path: Path, cfg: PhaseConfig) -> LoadedCheckpoint:
    """Loaded weights that fit the model config: its shape, finite values, every tensor the model has."""
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


def start_point(cfg: PhaseConfig, resume: Path | None, init: Path | None, base: Path | None = None) -> StartPoint:
    """Load what the phase starts from: `resume` (a resume point, see resume_point) wins over `init`, since a
    resumed phase continues its own weights. Problems of both are said together. An adapter run's start is
    adapter_start's (`base`: the adapter section's base, resolved)."""
    if cfg.adapter is not None:
        return adapter_start(cfg, resume, init, base)
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


def merged_weights(path: Path, approved: str | None = None) -> LoadedCheckpoint:
    """What an export writes: a checkpoint's weights with its optimizer state, an adapter's merged into its base
    (merged weights have no optimizer state of their own: None)."""
    return load_start(path, None, with_optimizer=True, approved=approved)


def require_adapter_base_path(path: Path) -> Path:
    base = read_peft_base(path)
    if base is None or not Path(base).exists():
        raise UserError(
            f"{path}: a PEFT adapter whose base_model_name_or_path ({base}) is no directory here; load it in a run "
            "whose adapter.base or init_from names its base"
        )
    return Path(base)


def with_adapter_merged(adapter: LoadedCheckpoint, base_path: Path | None = None) -> LoadedCheckpoint:
    """An adapter as the weights it computes: its base (the one it records, or `base_path`), checked to be the one
    it was trained on, with the adapter merged in fp32 (models/lora.merged_state). The sidecar stays the
    adapter's; there is no optimizer state for the merged weights."""
    cfg = ModelConfig(**adapter.meta["model_cfg"])
    path = require_adapter_base(adapter, base_path or recorded_base(adapter))
    base = load_start(path, cfg, with_optimizer=False)
    if adapter.meta["adapter"]["base"].get("sha256") is not None:
        raise_if_any(base_problems(adapter, base, {"sha256": weights_sha256(base.model_state)}))
    settings = adapter_config_of(adapter)
    if settings.quantize_base == "nf4":
        log.info(
            "%s: an adapter trained against the NF4 copy of its base, merged into the %s base (adapter.merge_into)",
            adapter.source,
            "NF4-dequantized" if settings.merge_into == "dequantized" else "original",
        )
    merged = merged_state(merge_base(base.model_state, settings), adapter.model_state, settings, cfg)
    return LoadedCheckpoint(
        adapter.source, merged, None, adapter.step, adapter.best_val_loss, adapter.meta, adapter.origin
    )


def adapter_start(cfg: PhaseConfig, resume: Path | None, init: Path | None, base: Path | None) -> StartPoint:
    """An adapter run's start: the frozen base (`base`, else init_from when that is a model, else the base the
    adapter being resumed or imported records), and the adapter to resume (this phase's adapter checkpoint) or to
    go on training (init_from naming an adapter: ours or PEFT's), else a fresh one. The base must be the one the
    adapter was trained on, and the adapter's shape the config's."""
    problems: list[str] = []
    resumed = adapter = None
    if resume is not None:
        resumed = load_start(resume, cfg.model, with_optimizer=True, merge=False)
        if not is_adapter(resumed):
            raise UserError(
                f"{resume}: a checkpoint of full training cannot resume an adapter run; set init_from to it to train "
                "an adapter on it, or remove the adapter section to go on training it whole"
            )
    loaded_init = None
    if init is not None:  # an adapter to go on training, or the base (read once, however big)
        loaded_init = load_start(init, cfg.model, with_optimizer=False, merge=False)
        if is_adapter(loaded_init):
            adapter = loaded_init if resumed is None else None
            init = loaded_init = None
    continued = resumed or adapter
    base = base or init or (recorded_base(continued) if continued is not None else None)
    if base is None:
        raise UserError(
            f"{cfg.path}: an adapter trains on a base model, and this config names none (set init_from to the model "
            "to adapt, or adapter.base)"
        )
    for loaded in (resumed, adapter):
        if loaded is not None:
            check_model_cfg(loaded, cfg.model.to_dict())
            require_adapter_base(loaded, base)
            problems += settings_problems(loaded, cfg.adapter, cfg.model)
    raise_if_any(problems)
    if loaded_init is not None and base == init:
        base_loaded = checked_weights(loaded_init, base, cfg)
    else:
        base_loaded = check_start_checkpoint(base, cfg, with_optimizer=False)
    record = base_record(base_loaded)
    for loaded in (resumed, adapter):
        if loaded is not None:
            problems += base_problems(loaded, base_loaded, record)
    raise_if_any(problems)
    initial = base_loaded if resumed is None else None
    return StartPoint(resumed=resumed, initial=initial, base=base_loaded, adapter=adapter, base_record=record)
