"""Where a phase starts from: one of our checkpoint directories, an exported .pt, or a Hugging Face model
directory, loaded and fitted to the run's model config.

The run's input check (resume and init_from) and the promotion gate's baseline both load through here, so a
start point means the same thing to both: a Hugging Face directory is read by hf/directory.py and checked
against the model config one line per disagreement, everything else by checkpoints/store.py.
"""

from __future__ import annotations

from pathlib import Path

from trainer_accel.checkpoints.store import LoadedCheckpoint, load_checkpoint
from trainer_accel.config import ModelConfig
from trainer_accel.errors import UserError
from trainer_accel.hf.directory import fit, is_hf_dir, load_hf_dir


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
