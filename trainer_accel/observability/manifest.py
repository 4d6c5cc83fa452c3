"""Run manifests: `runs/{run_id}/run.json`, the record that makes a run traceable to its config, data and code.

One manifest per run (each phase of a pipeline is a run; a resumed run keeps its id and its manifest, adding a
session). It is a sink of the metrics log, so the loop does not know it exists: it is written at the start and
rewritten atomically at each eval, checkpoint, stop, failure and end, so a reader never sees half a file.
Its `parent` is the checkpoint the run was initialised from (and that checkpoint's run and fingerprints), which
is how `runs lineage` walks from a best.pt back to the pretrain data.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from trainer_accel import __version__
from trainer_accel.checkpoints.layout import model_sha256
from trainer_accel.checkpoints.loading import LoadedCheckpoint
from trainer_accel.checkpoints.records import read_export_record
from trainer_accel.fsio import loads, now_iso, write_atomic
from trainer_accel.paths import REPO_ROOT


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit and whether the tree had uncommitted changes."""
    out: dict[str, Any] = {"package": __version__, "git_commit": None, "git_dirty": None}
    repo = REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo,
                capture_output=True,
                text=True,
                timeout=10,
            )
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine: the package version has to do
        pass
    return out


def parent_record(loaded: LoadedCheckpoint, relation: str) -> dict[str, Any]:
    """What a run records of the checkpoint it starts from, enough to follow the chain if the files move on."""
    meta = loaded.meta
    origin = (read_export_record(Path(loaded.source)) or {}) if Path(loaded.source).is_file() else {}  # an exported .pt
    return {
        "relation": relation,
        "checkpoint": str(Path(loaded.source).resolve()),
        "step": loaded.step,
        "phase": meta.get("phase") or origin.get("phase"),
        "run_id": meta.get("run_id") or origin.get("run_id"),
        "data_fingerprint": meta.get("data_fingerprint") or origin.get("data_fingerprint"),
        "config_fingerprint": meta.get("config_fingerprint") or origin.get("config_fingerprint"),
        "model_sha256": model_sha256(meta) or origin.get("model_sha256"),
    }


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest, or None when there is none (written atomically, so never a torn one)."""
    try:
        return loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())


class ManifestSink:
    """Keeps one run's manifest current from the events of its metrics log (main process only)."""

    def __init__(self, path: Path, facts: dict[str, Any], start_step: int, resumed_from: str | None):
        self.path = path
        earlier = read_manifest(path)
        session = {
            "started_at": now_iso(),
            "start_step": start_step,
            "resumed_from": resumed_from,
            "host": facts["host"],
            "pid": os.getpid(),
        }
        if earlier is None:
            self.m = {
                **facts,
                "status": "running",
                "started_at": session["started_at"],
                "finished_at": None,
                "start_step": start_step,
                "final_step": start_step,
                "best_val_loss": None,
                "best_val_step": None,
                "last_val_loss": None,
                "checkpoints": [],
                "failure": None,
                "sessions": [session],
            }
        else:  # a resumed run: the same record goes on, this process is one more session of it
            self.m = {
                **earlier,
                **facts,
                "status": "running",
                "finished_at": None,
                "failure": None,
                "sessions": [*earlier.get("sessions", []), session],
                "parent": earlier.get("parent") or facts.get("parent"),
            }
        write_manifest(path, self.m)

    def write(self, record: dict) -> None:
        event, step = record["event"], record["step"]
        if event == "train":
            self.m["final_step"] = step  # kept in memory; written with the next event that is worth a write
            return
        self.m["final_step"] = max(self.m.get("final_step") or 0, step)
        if event == "eval":
            self.m["last_val_loss"] = record.get("val/loss")
        elif event == "checkpoint":
            path = str(Path(record["path"]).resolve())
            self.m["checkpoints"] = [c for c in self.m["checkpoints"] if c["path"] != path] + [
                {"path": path, "step": step, "written_at": now_iso()}
            ]
            self.m["best_val_loss"], self.m["best_val_step"] = record["best_val_loss"], record["best_val_step"]
        elif event == "run_end":
            self.m.update(
                status="completed",
                finished_at=now_iso(),
                best_val_loss=record.get("best_val_loss"),
                best_val_step=record.get("best_val_step"),
            )
        elif event == "stopped":
            self.m.update(status="interrupted", finished_at=now_iso())
        elif event == "failure":
            self.m.update(status="failed", finished_at=now_iso(), failure=record.get("error"))
        else:
            return
        write_manifest(self.path, self.m)

    def supersede_after(self, run_id: str, phase: str, step: int) -> int:
        """Resuming at `step`: checkpoints the earlier process wrote after it are no longer this run's history."""
        before = len(self.m["checkpoints"])
        self.m["checkpoints"] = [c for c in self.m["checkpoints"] if c["step"] <= step]
        self.m["final_step"] = step
        write_manifest(self.path, self.m)
        return before - len(self.m["checkpoints"])

    def close(self) -> None:
        write_manifest(self.path, self.m)


def run_facts(
    *,
    run_id: str,
    cfg,
    data_info: dict,
    device: str,
    processes: int,
    precision: str,
    parent: dict | None,
    wandb_run_id: str | None,
) -> dict[str, Any]:
    """The fields of a manifest that are known before the first step (and refreshed by each session)."""
    return {
        "run_id": run_id,
        "name": cfg.tracking.run_name or f"{cfg.phase}-{run_id}",
        "phase": cfg.phase,
        "config_path": str(Path(cfg.path).resolve()),
        "overrides": list(cfg.overrides),
        "config": cfg.resolved(),
        "config_fingerprint": cfg.fingerprint,
        "data_fingerprint": data_info.get("data_fingerprint"),
        "caches": data_info.get("caches"),
        "tokenizer": data_info.get("tokenizer"),
        "code": code_version(),
        "host": socket.gethostname(),
        "device": device,
        "processes": processes,
        "precision": precision,
        "wandb_run_id": wandb_run_id,
        "parent": parent,
    }
