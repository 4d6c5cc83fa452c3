"""How a training run saves: the free-space check, the gather of the full state (collective under FSDP), the
sidecar's meta, the background write (checkpoints/writer.py), and the samples written beside each checkpoint.

The loop pays only for a CPU copy of the state; the main process writes it in the background, one save at a time.
A failed write is re-raised at the next wait, so the loop stops at its next step (Trainer._stop_agreed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from trainer_accel.checkpoints import writing
from trainer_accel.checkpoints.full_state import checkpoint_bytes, full_model_state, full_optimizer_state, plain_model
from trainer_accel.checkpoints.writer import CheckpointWriter, Snapshot
from trainer_accel.config import PhaseConfig
from trainer_accel.data.chat_template import ChatFormat
from trainer_accel.devices.accelerator import HALF_PRECISION
from trainer_accel.devices.collective import main_process_decides
from trainer_accel.devices.hardware import fits_in_free_memory
from trainer_accel.models.lora import adapter_state
from trainer_accel.observability.manifest import code_version
from trainer_accel.observability.metrics import MetricsLog
from trainer_accel.observability.samples import write_samples
from trainer_accel.paths import Paths
from trainer_accel.training.start import adapter_converters

log = logging.getLogger(__name__)


def checkpoint_meta(
    cfg: PhaseConfig, state: Any, acc: Accelerator, global_batch: int, data_info: dict, parent: dict | None
) -> dict[str, Any]:
    """The sidecar of a checkpoint: the loop state, the config as given and as used, the data, the lineage."""
    s = state
    return {
        "phase": cfg.phase,
        "run_id": s.run_id,
        "step": s.step,
        "best_val_loss": s.best_val_loss,
        "best_val_step": s.best_val_step,
        "last_val_loss": s.last_val_loss,
        "tokens_seen": s.tokens_seen,
        "skipped_steps": s.skipped_steps,
        "model_cfg": cfg.model.to_dict(),
        "train_cfg": cfg.train.to_dict(),
        "config": cfg.raw,
        "config_path": str(cfg.path),
        "global_batch": global_batch,
        "world_size": acc.num_processes,
        "created_at": time.time(),
        **data_info,
        "config_fingerprint": cfg.fingerprint,
        "overrides": list(cfg.overrides),
        "code": code_version(),
        "parent": parent,
        "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
    }


class Saver:
    """Checkpoints and samples of one phase, into paths.phase_dir(phase) and paths.samples/phase."""

    def __init__(self, acc: Accelerator, cfg: PhaseConfig, paths: Paths, chat: ChatFormat | None):
        self.acc, self.cfg, self.paths, self.chat = acc, cfg, paths, chat
        self.phase_dir = paths.phase_dir(cfg.phase)
        self.writer = CheckpointWriter(self.phase_dir, cfg.train.keep_last_n)  # the main process's background saves
        self.events: MetricsLog | None = None  # where written checkpoints and samples are logged, once open

    def save(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict, to_step_dir: bool, to_best: bool
    ) -> None:
        """Checkpoint the state of now; training goes on while the main process writes it in the background."""
        # the main process's free space (it writes, and its writer thread may be using space right now) decides for
        # all, so all stop together rather than leave some waiting in the gather below
        main_process_decides(self.acc, self.wait)  # one save at a time; a failed one stops every process
        adapter = self.cfg.adapter is not None  # an adapter run's checkpoint holds the adapter alone
        needed = checkpoint_bytes(self.acc.unwrap_model(model, keep_torch_compile=False))
        copies = int(to_step_dir) + int(to_best and not to_step_dir)
        main_process_decides(self.acc, lambda: writing.ensure_free_space(self.phase_dir, needed, copies=copies))
        model_state, tied = full_model_state(self.acc, model)  # collectives under FSDP: every process takes part
        opt_state = full_optimizer_state(self.acc, model, optimizer)
        if self.acc.is_main_process:
            saved, saved_tied = (adapter_state(model_state), {}) if adapter else (model_state, tied)
            snapshot = Snapshot(writing.cpu_copy(saved), saved_tied, writing.cpu_copy(opt_state), meta)
            self.writer.submit(snapshot, to_step_dir, to_best)
            if to_step_dir:
                self.write_samples(model, model_state, tied, meta["step"])
        self.acc.wait_for_everyone()

    def wait(self) -> None:
        """Block until the checkpoint being written is complete (re-raising its error), and log it."""
        done = self.writer.wait()
        if done is None:
            return
        meta, path = done
        size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        log.info("%s: checkpoint %s written, %.1f MB", self.cfg.phase, path, size / 1e6)
        self.events.write(
            "checkpoint",
            meta["step"],
            path=str(path),
            best_val_loss=meta["best_val_loss"],
            best_val_step=meta["best_val_step"],
            size_mb=round(size / 1e6, 3),
        )

    def write_samples(self, model: torch.nn.Module, model_state: dict, tied: dict, step: int) -> None:
        """On the main process alone. A sharded (FSDP) model cannot run there, since its forward all-gathers with
        every process, so samples come from a plain copy built from the full state the save just gathered: in the
        precision the run computes in (a bf16 copy is half of fp32's), on the GPU when it fits in the free memory
        with a quarter to spare, else in fp32 on the CPU (slower, but FSDP is for models the GPU barely holds)."""
        if not self.cfg.sample_prompts or self.chat is None:
            return
        if self.acc.distributed_type == DistributedType.FSDP:
            device, dtype = self.acc.device, HALF_PRECISION.get(self.acc.mixed_precision, torch.float32)
            nbytes = sum(t.numel() for t in model_state.values()) * dtype.itemsize
            if not fits_in_free_memory(device, nbytes):
                log.info(
                    "%s: samples on the CPU: their %.1f GiB copy of the model does not fit in %s's free memory",
                    self.cfg.phase,
                    nbytes / 2**30,
                    device,
                )
                device, dtype = torch.device("cpu"), torch.float32
            plain = plain_model(self.cfg.model, model_state, tied, device, dtype, adapter_converters(self.cfg))
        else:
            plain = self.acc.unwrap_model(model, keep_torch_compile=False)
        out = Path(self.paths.samples) / self.cfg.phase
        written = write_samples(plain, self.chat, self.cfg.sample_prompts, self.cfg.sample_seed, step, out)
        self.events.write("samples", step, samples=written)

    def failure(self) -> BaseException | None:
        return self.writer.failure()

    def raise_failure(self, step: int) -> None:
        self.writer.raise_failure(step)

    def close(self) -> None:
        self.writer.close()
