"""CLI: check the machine and the files a run is about to use, one line per check, before hours are spent.

    python -m trainer_accel.doctor [--config CONFIG] [--launch FILE] [--quick]

Each line is `ok`, `warn` or `fail`, what was found, and for warn / fail what to do. With --config (a phase or
pipeline config) the caches it needs and the disk its checkpoints need are checked too. --quick skips hashing
the caches. Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 bad arguments.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainer_accel.config import PhaseConfig, read_json
from trainer_accel.data.cache import open_cache
from trainer_accel.errors import UserError
from trainer_accel.paths import Paths
from trainer_accel.phases.pipeline import is_pipeline, load_pipeline
from trainer_accel.phases.registry import guess_phase, load_config

PACKAGES = ("torch", "accelerate", "safetensors", "wandb")


@dataclass
class Check:
    status: str  # "ok", "warn" or "fail"
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.status:<5} {self.name:<12} {self.message}"


def check_versions() -> list[Check]:
    py = sys.version_info
    out = [
        Check(
            "ok" if py >= (3, 10) else "fail",
            "python",
            f"{py.major}.{py.minor}.{py.micro}" + ("" if py >= (3, 10) else " (3.10 or newer is needed)"),
        )
    ]
    for name in PACKAGES:
        try:
            out.append(Check("ok", name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append(Check("fail", name, "not installed (pip install -e . installs it)"))
    return out


def check_devices() -> list[Check]:
    import torch

    out = []
    if torch.cuda.is_available():
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        out.append(Check("ok", "cuda", f"{torch.cuda.device_count()} device(s) ({names}), CUDA {torch.version.cuda}"))
    else:
        out.append(
            Check(
                "ok",
                "cuda",
                f"not available (torch {torch.__version__} "
                f"{'has no CUDA build' if torch.version.cuda is None else 'sees no GPU'}); training runs on CPU or MPS",
            )
        )
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    out.append(Check("ok", "mps", "available" if mps else "not available"))
    return out


def check_accelerate_config(launch: Path | None) -> Check:
    from accelerate.commands.config.config_args import (
        default_config_file,
        load_config_from_file,
    )

    path = launch or Path(os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file)
    if not path.exists():
        if launch is not None:
            return Check("fail", "accelerate", f"{path}: launch file not found (see launch/*.yaml)")
        return Check(
            "ok",
            "accelerate",
            f"no default config ({path}); accelerate launch uses its defaults, "
            "or pass --config_file launch/<machine>.yaml",
        )
    try:
        cfg = load_config_from_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file to fix
        return Check(
            "fail", "accelerate", f"{path}: unreadable ({type(e).__name__}: {e}); fix it or run accelerate config"
        )
    kind = getattr(cfg.distributed_type, "value", cfg.distributed_type)
    return Check(
        "ok", "accelerate", f"{path}: {kind}, {cfg.num_processes} process(es), mixed precision {cfg.mixed_precision}"
    )


def _phase_configs(config: Path | None) -> list[PhaseConfig]:
    if config is None:
        return []
    data = read_json(config, "config")
    if is_pipeline(data):
        return load_pipeline(config).phases
    return [load_config(config, guess_phase(data).name)]


def check_caches(paths: Paths, configs: list[PhaseConfig], quick: bool) -> list[Check]:
    """Every cache present (meta matches the bin: size, dtype, hash), and the ones the config needs."""
    from trainer_accel.training.inputs import phase_cache_paths

    present = [(path, kind) for kind, _, path in paths.caches() if path.is_file()]
    out = []
    for path, kind in present:
        try:
            meta = open_cache(path, kind, verify_hash=not quick).meta
            out.append(
                Check(
                    "ok",
                    "cache",
                    f"{path}: {meta['num_tokens']:,} tokens, {meta['dtype']}" + ("" if quick else ", sha256 matches"),
                )
            )
        except UserError as e:
            out.append(Check("fail", "cache", f"{e.problems[0]} (prepare it again: python -m trainer_accel.prepare)"))
    for cfg in configs:
        train, val = phase_cache_paths(cfg, paths)
        for r in train + val:
            if not r.path.is_file():
                out.append(
                    Check("fail", "cache", f"{r.path}: missing, needed by {cfg.path} (python -m trainer_accel.prepare)")
                )
    if not present and not configs:
        out.append(
            Check(
                "warn",
                "cache",
                f"no caches under {paths.data / 'cache'} (python -m trainer_accel.prepare --demo "
                "for the demo, or your own files)",
            )
        )
    return out


def check_disk(paths: Paths, configs: list[PhaseConfig]) -> Check:

    from trainer_accel.checkpoints.full_state import checkpoint_bytes
    from trainer_accel.training.start import model_shapes

    probe = paths.checkpoints
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if not configs:
        return Check(
            "ok",
            "disk",
            f"{_size(free)} free under {paths.checkpoints} (pass --config to compare "
            "with the checkpoints it will keep)",
        )
    need = 0
    for cfg in configs:
        size = checkpoint_bytes(model_shapes(cfg))  # an adapter run's hold the adapter alone
        need += size * (cfg.train.keep_last_n + 2)  # kept step dirs, best/, one being written
    status = "ok" if free >= need else "fail"
    return Check(
        status,
        "disk",
        f"{_size(free)} free under {paths.checkpoints}, checkpoints need up to {_size(need)}"
        + ("" if status == "ok" else "; free space or lower keep_last_n"),
    )


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_wandb() -> Check:
    from trainer_accel.observability.trackers import wandb_has_credentials

    creds = wandb_has_credentials()
    mode = os.environ.get("WANDB_MODE") or ("online" if creds else "offline")
    origin = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "default"
    if mode == "online" and not creds:
        return Check(
            "warn",
            "wandb",
            "WANDB_MODE=online but no credentials (WANDB_API_KEY or ~/.netrc): runs will "
            "fail to log in; run wandb login or set WANDB_MODE=offline",
        )
    return Check(
        "ok",
        "wandb",
        f"mode {mode} ({origin}), credentials {'found' if creds else 'none'}"
        + ("; offline runs upload later with: wandb sync metrics/wandb/offline-run-*" if mode == "offline" else ""),
    )


def check_writable(paths: Paths) -> list[Check]:
    out = []
    for name, directory in (
        ("checkpoints", paths.checkpoints),
        ("metrics", paths.metrics),
        ("samples", paths.samples),
        ("runs", paths.runs),
    ):
        probe = directory
        while not probe.exists():
            probe = probe.parent
        try:
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".doctor-"):
                pass
            out.append(
                Check(
                    "ok",
                    "writable",
                    f"{directory}" + ("" if probe == directory else f" (not there yet; {probe} is writable)"),
                )
            )
        except OSError as e:
            out.append(
                Check(
                    "fail",
                    "writable",
                    f"{directory}: cannot write in {probe} ({e.strerror}); fix its "
                    f"permissions or point TRAINER_ARTIFACTS_DIR elsewhere",
                )
            )
    return out


def run_checks(paths: Paths, config: Path | None, launch: Path | None, quick: bool) -> list[Check]:
    configs = _phase_configs(config)
    return [
        *check_versions(),
        *check_devices(),
        check_accelerate_config(launch),
        *check_caches(paths, configs, quick),
        check_disk(paths, configs),
        check_wandb(),
        *check_writable(paths),
    ]
