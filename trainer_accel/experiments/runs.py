"""CLI: the run registry under runs/, read back.

    python -m trainer_accel.runs list
    python -m trainer_accel.runs show RUN_ID
    python -m trainer_accel.runs lineage PATH [--json]          PATH: a checkpoint directory or an exported best.pt
    python -m trainer_accel.runs evaluate CHECKPOINT --baseline CHECKPOINT [--tolerance X] [--device D]

`lineage` walks from a best.pt (through its best.pt.json record) or a checkpoint to the run that wrote it, the
checkpoint that run started from, that checkpoint's run, and so on, with the data and config fingerprints of
each. Files that are gone (pruned step directories) are still named from what their children recorded.
`evaluate` runs the SFT promotion gate (evaluation.py) and records it in the candidate run's manifest.
Exit codes: 0 done (evaluate: verdict pass against the checkpoint the candidate started from), 1 evaluate: verdict
fail or another baseline, 2 bad input.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

from trainer_accel.checkpoints.layout import InvalidCheckpoint, model_sha256, read_meta
from trainer_accel.checkpoints.records import read_export_record
from trainer_accel.errors import UserError
from trainer_accel.fsio import sha256_file
from trainer_accel.hf.directory import is_hf_dir, weights_sha256
from trainer_accel.observability.manifest import read_manifest
from trainer_accel.paths import Paths


def all_manifests(paths: Paths) -> list[dict[str, Any]]:
    found = [read_manifest(p) for p in sorted(paths.runs.glob("*/run.json"))]
    return sorted((m for m in found if m), key=lambda m: m.get("started_at") or "")


def shown_status(m: dict[str, Any]) -> str:
    """A run still marked running whose process is gone (killed, crashed machine) is shown as `died`."""
    status = m.get("status", "?")
    if status != "running":
        return status
    session = (m.get("sessions") or [{}])[-1]
    if session.get("host") == socket.gethostname() and session.get("pid"):
        try:
            os.kill(session["pid"], 0)
        except ProcessLookupError:
            return "died"
        except PermissionError:
            pass
    return status


def _duration(m: dict[str, Any]) -> str:
    if not m.get("started_at"):
        return "-"
    end = (
        datetime.datetime.fromisoformat(m["finished_at"])
        if m.get("finished_at")
        else datetime.datetime.now(datetime.timezone.utc)
    )
    seconds = int((end - datetime.datetime.fromisoformat(m["started_at"])).total_seconds())
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def list_runs(paths: Paths) -> str:
    rows = [("run", "phase", "status", "steps", "best val", "verdict", "started", "duration")]
    for m in all_manifests(paths):
        total = (m.get("config") or {}).get("train_cfg", {}).get("total_steps", "?")
        best = m.get("best_val_loss")
        rows.append(
            (
                m.get("run_id", "?"),
                m.get("phase", "?"),
                shown_status(m),
                f"{m.get('final_step', '?')}/{total}",
                "-" if best is None else f"{best:.4f}",
                (m.get("eval_summary") or {}).get("verdict") or "-",
                (m.get("started_at") or "-").replace("+00:00", "Z"),
                _duration(m),
            )
        )
    if len(rows) == 1:
        return f"no runs under {paths.runs}"
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def find_run(paths: Paths, run_id: str) -> dict[str, Any]:
    """A manifest by run id or an unambiguous prefix of one."""
    exact = read_manifest(paths.manifest(run_id))
    if exact:
        return exact
    matches = [m for m in all_manifests(paths) if m.get("run_id", "").startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(m.get("run_id", "?") for m in all_manifests(paths)) or "none"
        raise UserError(
            f"{run_id}: {'no run' if not matches else 'several runs'} with that id under {paths.runs} (runs: {known})"
        )
    return matches[0]


# -- lineage ------------------------------------------------------------------------------------------------------


def _checkpoint_node(path: Path, known: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as its sidecar describes it, or as its child recorded it when the directory is gone."""
    node = {
        "kind": "checkpoint",
        "path": str(path),
        "present": False,
        **{
            k: known.get(k)
            for k in ("run_id", "phase", "step", "data_fingerprint", "config_fingerprint", "model_sha256")
        },
        "parent": known.get("parent"),
    }
    if is_hf_dir(path):  # a Hugging Face directory a run started from: the model as it came, not one of our runs
        return {**node, "kind": "huggingface", "present": True, "model_sha256": weights_sha256(path), "parent": None}
    try:
        meta = read_meta(path, verify=False)
    except InvalidCheckpoint:
        return node
    node.update(
        present=True,
        run_id=meta.get("run_id"),
        phase=meta.get("phase"),
        step=meta.get("step"),
        data_fingerprint=meta.get("data_fingerprint"),
        config_fingerprint=meta.get("config_fingerprint"),
        model_sha256=model_sha256(meta),
        best_val_loss=meta.get("best_val_loss"),
        parent=meta.get("parent"),
    )
    if known.get("model_sha256") and node["model_sha256"] != known["model_sha256"]:
        node["note"] = "replaced since: its weights are not the ones recorded (the recorded fingerprints are shown)"
        node.update(
            {k: known.get(k) for k in ("run_id", "step", "data_fingerprint", "config_fingerprint", "model_sha256")}
        )
        node["parent"] = known.get("parent")
    return node


def lineage(paths: Paths, start: Path) -> list[dict[str, Any]]:
    """Nodes from `start` back to the first run: export?, then (checkpoint, run) pairs, parent after child."""
    nodes: list[dict[str, Any]] = []
    if start.is_file():
        record = read_export_record(start)
        if record is None:
            raise UserError(
                f"{start}: no export record beside it ({start.name}.json), or it belongs to another file; "
                "re-export with python -m trainer_accel.export to trace it"
            )
        intact = sha256_file(start) == record.get("best_pt_sha256")
        nodes.append(
            {
                "kind": "export",
                "path": str(start),
                "exported_at": record.get("exported_at"),
                "verdict": record.get("verdict"),
                "intact": intact,
            }
        )
        known, ckpt = record, Path(record["source"])
    elif start.is_dir():
        known, ckpt = {}, start
    else:
        raise UserError(f"{start}: not found (expected a checkpoint directory or an exported best.pt)")
    seen = set()
    while ckpt is not None and str(ckpt) not in seen:
        seen.add(str(ckpt))
        node = _checkpoint_node(ckpt, known)
        nodes.append(node)
        manifest = read_manifest(paths.manifest(node["run_id"])) if node.get("run_id") else None
        if manifest:
            nodes.append(
                {
                    "kind": "run",
                    "run_id": manifest.get("run_id"),
                    "phase": manifest.get("phase"),
                    "status": shown_status(manifest),
                    "steps": f"{manifest.get('start_step')}->{manifest.get('final_step')}",
                    "config_path": manifest.get("config_path"),
                    "overrides": manifest.get("overrides"),
                    "config_fingerprint": manifest.get("config_fingerprint"),
                    "data_fingerprint": manifest.get("data_fingerprint"),
                    "caches": manifest.get("caches"),
                    "code": manifest.get("code"),
                    "verdict": (manifest.get("eval_summary") or {}).get("verdict"),
                }
            )
        parent = node.get("parent") or (manifest or {}).get("parent")
        known, ckpt = (parent, Path(parent["checkpoint"])) if parent else ({}, None)
    return nodes


def format_lineage(nodes: list[dict[str, Any]]) -> str:
    lines = []
    for n in nodes:
        if n["kind"] == "export":
            lines.append(
                f"export      {n['path']}  exported {n['exported_at']}, verdict {n['verdict'] or 'none'}"
                + ("" if n["intact"] else "  (CHANGED since export: sha256 differs)")
            )
        elif n["kind"] == "huggingface":
            lines.append(f"huggingface {n['path']}  a model directory (weights {str(n.get('model_sha256'))[:12]})")
        elif n["kind"] == "checkpoint":
            lines.append(
                f"checkpoint  {n['path']}{'' if n['present'] else '  (gone)'}  {n.get('phase')} step {n.get('step')}, "
                f"run {n.get('run_id')}, weights {str(n.get('model_sha256'))[:12]}"
            )
            if n.get("note"):
                lines.append(f"            {n['note']}")
        else:
            code = n.get("code") or {}
            lines.append(
                f"run         {n['run_id']}  {n['phase']} {n['status']}, steps {n['steps']}, config {n['config_path']}"
                + (f" --set {' '.join(n['overrides'])}" if n.get("overrides") else "")
                + f", code {code.get('package')} "
                f"{str(code.get('git_commit'))[:12]}{' (dirty)' if code.get('git_dirty') else ''}"
            )
            lines.append(f"            config fingerprint {n['config_fingerprint']}")
            lines.append(f"            data fingerprint   {n['data_fingerprint']}")
            for name, sha in (n.get("caches") or {}).items():
                lines.append(f"              {name:<24} {sha}")
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------------------------
