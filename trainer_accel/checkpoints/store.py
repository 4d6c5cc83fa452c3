"""Checkpoint directories: write whole or not at all, find, check, load, and turn into the best.pt dict.

A checkpoint is a directory of three files:
    model.safetensors  canonical weights (no wrapper prefixes), each tied tensor stored once
    optimizer.pt       the optimizer's state_dict, read back with torch.load(weights_only=True)
    meta.json          the sidecar and the truth about the checkpoint: format version, phase, run id, step,
                       best_val_loss, model_cfg, train_cfg, the config as given, the tokenizer, tied-weight
                       aliases, and the size and sha256 of the other two files. It is written last, so its presence
                       marks the
                       directory complete, and its checksums catch truncation and flipped bytes alike.
A directory is written under a hidden temporary name, every file and the directory fsynced, then renamed into
place; `latest` and `best` are replaced by renaming too. Nothing here knows about strategies or phases beyond
the name it is given. Sidecars of an older format version are upgraded as they are read (versions.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer_accel.config import (
    MODEL_FUNCTION_KEYS,
    MODEL_SHAPE_KEYS,
    ModelConfig,
    complete_model_cfg,
    model_cfg_problems,
    resolved_model_cfg,
    shape_diff,
)
from trainer_accel.errors import UserError, first_line
from trainer_accel.faults import fault_point
from trainer_accel.fsio import (
    FILE_MODE,
    TMP_PREFIX,
    TRASH_PREFIX,
    fsync_dir,
    fsync_file,
    loads,
    sha256_file,
    sha256_of,
    swap_into_place,
    write_atomic,
)
from trainer_accel.models.build import expected_shapes
from trainer_accel.versions import upgrade

log = logging.getLogger(__name__)

FORMAT = "trainer_accel.checkpoint"
FORMAT_VERSION = 4


def _v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 2 records every model option (activation and ln_eps arrived with it; version 1 sidecars may lack
    bias and tie_embeddings too) and the tokenizer file's path, which an export to Hugging Face needs."""
    if isinstance(meta.get("model_cfg"), dict):
        meta["model_cfg"] = complete_model_cfg(meta["model_cfg"])
    meta.setdefault("tokenizer_path", None)
    return meta


def _v2_to_v3(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 3 seals the sidecar with its own sha256 (`sidecar_sha256`); a version 2 sidecar has no seal, so its
    loop state is checked by type and range alone."""
    return meta


def _v3_to_v4(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 4 models may be Llama-family decoders (rotary positions, RMSNorm, a gated MLP, grouped-query
    attention: models/config.py); a version 3 model is GPT-2-style, which the new options' defaults describe. The
    version moved so that a trainer before them refuses such a checkpoint instead of building a GPT-2 from it."""
    if isinstance(meta.get("model_cfg"), dict):
        meta["model_cfg"] = complete_model_cfg(meta["model_cfg"])
    return meta


UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}  # version -> the step to the next (versions.py)
SEAL = "sidecar_sha256"
MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.pt", "meta.json"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
BEST_PT_KEYS = ("model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss")


class InvalidCheckpoint(Exception):
    """A checkpoint that is incomplete or corrupt; the message says why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ---------------------------------------------------------------------------------------------------------------
# State dicts: canonical keys, tied tensors stored once


def canonical_state(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile prefixes, move to CPU, and leave out the tied aliases (`tied`: {dropped key: kept key},
    found from the model by `full_state.tied_aliases`), which `expand_aliases` restores on load."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key = key.replace("_orig_mod.", "")
        key = key[len("module.") :] if key.startswith("module.") else key
        if key not in tied:
            out[key] = t.detach().to("cpu").contiguous()
    return out


def expand_aliases(state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    full = dict(state)
    for key, target in aliases.items():
        full[key] = full[target]
    return full


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _temp_dir_for(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    return tmp


def write_checkpoint(
    target: Path,
    model_state: dict[str, torch.Tensor],
    tied: dict[str, str],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint directory at `target` (replacing one there). Main process only."""
    tensors = canonical_state(model_state, tied)
    tmp = _temp_dir_for(target)
    writers = {
        # safetensors writes its file 0600; the checkpoint's other files get the usual mode, so this one too
        MODEL_FILE: (
            "model",
            lambda path: (save_file(tensors, str(path), metadata={"format": FORMAT}), os.chmod(path, FILE_MODE)),
        ),
        OPTIMIZER_FILE: ("optimizer", lambda path: torch.save(optimizer_state, path)),
    }
    files = {}
    for name, (point, write) in writers.items():
        fault_point(f"before_{point}")
        write(tmp / name)
        fault_point(f"while_{point}", partial=tmp / name)
        fsync_file(tmp / name)
        fault_point(f"after_{point}")
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "tied": dict(tied), "files": files}
    full_meta[SEAL] = sidecar_sha256(full_meta)
    fault_point("before_meta")
    write_atomic(tmp / META_FILE, (json.dumps(full_meta, indent=2) + "\n").encode())
    fault_point("while_meta", partial=tmp / META_FILE)
    fault_point("after_meta")
    fsync_dir(tmp)
    fault_point("before_rename")
    swap_into_place(tmp, target)
    return target


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to CPU memory: a snapshot that training can no
    longer change while it is written (tied weights are already left out, so nothing is copied twice)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def ensure_free_space(directory: Path, needed: int, copies: int = 1) -> None:
    """Refuse to start a save that cannot finish: a full disk must not leave a partial file behind."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * copies * 1.05) + (16 << 20)
    if free < want:
        raise UserError(
            f"{directory}: {free / 2**20:,.0f} MiB free, a checkpoint needs about {want / 2**20:,.0f} MiB; "
            "nothing was written and the earlier checkpoints are intact (free some space and resume)"
        )


def link_pointer(source: Path, target: Path) -> None:
    """Make `target` (latest/, best/) a complete copy of checkpoint `source`: hard links, so no bytes are copied."""
    tmp = _temp_dir_for(target)
    for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE):
        try:
            os.link(source / name, tmp / name)
        except OSError:
            shutil.copy2(source / name, tmp / name)
            fsync_file(tmp / name)
    fsync_dir(tmp)
    fault_point(f"before_{target.name}")  # before_latest, before_best
    swap_into_place(tmp, target)


def prune_step_dirs(phase_dir: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` step_* directories; nothing else in the folder is touched."""
    steps = sorted((int(m.group(1)), p) for p in phase_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))
    doomed = [p for _, p in steps[:-keep_last_n]] if keep_last_n > 0 else []
    for p in doomed:
        shutil.rmtree(p)
        fault_point("pruning")
    return doomed


def sweep_leftovers(phase_dir: Path) -> None:
    """Finish or undo what a killed save left behind: temporary and set-aside directories, export temp files."""
    for tmp in phase_dir.parent.glob(".*.pt.tmp-*"):
        tmp.unlink(missing_ok=True)
    if not phase_dir.is_dir():
        return
    for name in ("latest", "best"):
        if (phase_dir / name).exists():
            continue
        # killed between the two renames of a swap: the new copy if it is complete, else the old one
        for cand in sorted(phase_dir.glob(f"{TMP_PREFIX}{name}-*"), reverse=True) + sorted(
            phase_dir.glob(f"{TRASH_PREFIX}{name}-*")
        ):
            try:
                read_meta(cand)
            except InvalidCheckpoint:
                continue
            os.rename(cand, phase_dir / name)
            log.warning("restored %s from %s left by an interrupted save", phase_dir / name, cand.name)
            break
    for p in list(phase_dir.glob(f"{TMP_PREFIX}*")) + list(phase_dir.glob(f"{TRASH_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading


_hashes: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, hashed once per process: files are never changed in place, and latest/ and
    best/ are hard links to a step directory's files (same inode), so start-up checks do not re-read them. The
    file is opened once: latest/ may be replaced between a stat and a read of its path."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _hashes:
            _hashes[key] = sha256_of(f)
    return _hashes[key]


def sidecar_sha256(meta: dict[str, Any]) -> str:
    """The seal of a sidecar: the sha256 of everything in it but the seal, in one canonical JSON form. A hand edit
    (a step moved back from 280 to 5 beside step-280 weights, a best_val_loss that no later eval can beat) breaks it."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _loss(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def loop_state_problems(meta: dict[str, Any]) -> list[str]:
    """The loop state a resume continues, checked by type and range (what a seal cannot vouch for: a sidecar of an
    older version, or one a bug wrote)."""
    step = meta.get("step")
    problems = [] if _whole(step) and step >= 0 else [f"step is {step!r}, not a whole number >= 0"]
    if meta.get("best_val_loss") is not None and not _loss(meta["best_val_loss"]):
        problems.append(f"best_val_loss is {meta['best_val_loss']!r}, not a finite loss >= 0 or null")
    last = meta.get("last_val_loss")  # NaN when the last eval measured nothing
    if last is not None and (isinstance(last, bool) or not isinstance(last, (int, float))):
        problems.append(f"last_val_loss is {last!r}, not a number or null")
    for key in ("tokens_seen", "skipped_steps", "global_batch"):
        if key in meta and not (_whole(meta[key]) and meta[key] >= (1 if key == "global_batch" else 0)):
            problems.append(f"{key} is {meta[key]!r}, not a whole number >= {1 if key == 'global_batch' else 0}")
    best_step = meta.get("best_val_step")
    if best_step is not None and not (_whole(best_step) and _whole(step) and 0 <= best_step <= step):
        problems.append(f"best_val_step is {best_step!r}, not a step between 0 and the checkpoint's step")
    for key in ("model_cfg", "train_cfg", "tied"):
        if key in meta and not isinstance(meta[key], dict):
            problems.append(f"{key} is {type(meta[key]).__name__}, not an object")
    return problems


def read_meta(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """The sidecar of a complete, intact checkpoint directory; raises InvalidCheckpoint saying why not."""
    meta_file = ckpt / META_FILE
    if not ckpt.is_dir():
        raise InvalidCheckpoint("not a directory")
    if not meta_file.is_file():
        raise InvalidCheckpoint(f"no {META_FILE} (an unfinished save)")
    try:
        meta = loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f"{META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{META_FILE} is not a {FORMAT} sidecar")
    as_written = meta
    try:  # a newer version raises versions.NewerFormat, a UserError: refused, not set aside as broken
        meta = upgrade(meta, "format_version", FORMAT_VERSION, UPGRADES, str(ckpt), "checkpoint", meta_file)
    except ValueError as e:
        raise InvalidCheckpoint(str(e)) from None
    if as_written["format_version"] >= 3 and as_written.get(SEAL) != sidecar_sha256(as_written):
        raise InvalidCheckpoint(
            f"{META_FILE} was changed after the save (it does not match its {SEAL}); its step, "
            "losses and settings cannot be trusted"
        )
    for key in ("step", "model_cfg", "train_cfg", "best_val_loss", "phase", "run_id", "files"):
        if key not in meta:
            raise InvalidCheckpoint(f"{META_FILE} lacks '{key}'")
    problems = loop_state_problems(meta)
    if isinstance(meta.get("model_cfg"), dict):
        problems += model_cfg_problems(complete_model_cfg(meta["model_cfg"]), "model_cfg", known_only=True)
    if problems:
        raise InvalidCheckpoint(f"{META_FILE}: {'; '.join(problems)}")
    if not isinstance(meta["files"], dict):
        raise InvalidCheckpoint(f"{META_FILE} has a malformed 'files'")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        expected = meta["files"].get(name)
        path = ckpt / name
        if expected is None or not path.is_file():
            raise InvalidCheckpoint(f"{name} is missing")
        if (
            not isinstance(expected, dict)
            or not _whole(expected.get("size"))
            or not isinstance(expected.get("sha256"), str)
        ):
            raise InvalidCheckpoint(f"{META_FILE}: files.{name} is not {{size, sha256}}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise InvalidCheckpoint(f"{name} is {size} bytes, the sidecar says {expected['size']} (truncated?)")
        if verify and file_sha256(path) != expected["sha256"]:
            raise InvalidCheckpoint(f"{name} does not match its sha256 in the sidecar (corrupt)")
    return meta


def resume_candidates(phase_dir: Path) -> list[Path]:
    """latest/ and the step_* directories, newest step first (latest/ first among equals)."""
    if not phase_dir.is_dir():
        return []
    found = []
    for p in phase_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m:
            found.append((int(m.group(1)), 0, p))
        elif p.name == "latest":
            try:
                found.append((int(loads((p / META_FILE).read_text())["step"]), 1, p))
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                found.append((-1, 1, p))
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def set_aside_broken(phase_dir: Path) -> list[Path]:
    """Move checkpoints newer than the newest intact one to {phase}/rejected/, with the reason beside each.

    They are kept for a post-mortem, never deleted, and no longer shadow the good checkpoint. Main process only.
    """
    moved = []
    for cand in resume_candidates(phase_dir):
        try:
            read_meta(cand)
            break
        except InvalidCheckpoint as e:
            dest = phase_dir / "rejected" / f"{cand.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
            dest.parent.mkdir(exist_ok=True)
            os.rename(cand, dest)
            (dest.parent / f"{dest.name}.reason.txt").write_text(f"{e}\n")
            shared = (
                " (a damaged file, not an interrupted save: step directories, latest/ and best/ of one step share "
                "their files by hard link, so the same damage shows in each)"
                if "sha256" in str(e)
                else ""
            )
            log.warning("checkpoint %s is broken (%s); set aside as %s%s", cand, e, dest, shared)
            moved.append(dest)
    return moved


def reconcile_pointers(phase_dir: Path) -> None:
    """Make latest/ and best/ agree with the newest intact checkpoint's sidecar. Main process only.

    A step directory is always complete before latest/ and best/ move, so a kill in between leaves them behind
    it; a run that then resumes at its last step would otherwise finish with a stale latest/ or best/.
    """
    newest = find_resume_checkpoint(phase_dir)
    if newest is None:
        return
    meta = read_meta(newest, verify=False)
    if _intact_step(phase_dir / "latest") != meta["step"]:
        why = _why_not_current(phase_dir / "latest")
        link_pointer(newest, phase_dir / "latest")
        log.warning("latest/ %s; now step %d", why, meta["step"])
    best_step = meta.get("best_val_step")
    source = phase_dir / step_dir_name(best_step) if best_step is not None else None
    if source is not None and _intact_step(phase_dir / "best") != best_step and _intact_step(source) == best_step:
        why = _why_not_current(phase_dir / "best")
        link_pointer(source, phase_dir / "best")
        log.warning("best/ %s; now step %d", why, best_step)


def _why_not_current(pointer: Path) -> str:
    """An older but intact pointer is what an interrupted save leaves; a damaged one is damage, and its files are
    hard links shared with the step directory (and best/ or latest/) of the same step, which it damaged too."""
    if not pointer.exists():
        return "was missing (an interrupted save, or set aside as broken above)"
    try:
        read_meta(pointer)
        return "was behind (an interrupted save)"
    except InvalidCheckpoint as e:
        return (
            f"was DAMAGED ({e}), not interrupted: its files are hard links shared with the step directory of "
            "its step (and latest/ or best/ when they are that step), damaged with it"
        )


def _intact_step(ckpt: Path) -> int | None:
    try:
        return read_meta(ckpt)["step"]
    except InvalidCheckpoint:
        return None


def find_resume_checkpoint(phase_dir: Path) -> Path | None:
    """The newest complete, intact checkpoint of a phase; broken ones are skipped with a warning saying why.
    Read steadily: `run --plan` looks beside a run that may be replacing latest/ as it reads."""
    for cand in resume_candidates(phase_dir):
        try:
            read_steadily(cand, read_meta)
            return cand
        except InvalidCheckpoint as e:
            log.warning("skipping checkpoint %s: %s", cand, e)
    return None


def _files_identity(ckpt: Path) -> tuple:
    """Which files a checkpoint directory holds right now: a save never changes a file, it renames new ones in."""
    found = []
    for name in (META_FILE, MODEL_FILE, OPTIMIZER_FILE):
        try:
            st = os.stat(ckpt / name)
            found.append((st.st_dev, st.st_ino, st.st_size))
        except OSError:
            found.append(None)
    return tuple(found)


def _being_swapped(ckpt: Path) -> bool:
    """Whether a save is between the two renames that replace `ckpt` (fsio.swap_into_place), or just after them."""
    return any(ckpt.parent.glob(f"{TRASH_PREFIX}{ckpt.name}-*"))


def read_steadily(ckpt: Path, read: Callable[[Path], Any], attempts: int = 20) -> Any:
    """`read(ckpt)`, done again until the directory held the same files before and after it.

    latest/ and best/ are replaced by renames while a run trains, so a command reading them beside it (export,
    generate, evaluate) could take the sidecar of one save and the weights of the next: the checksums then called
    a sound checkpoint corrupt, and without them the weights would carry another step's name. Step directories
    never change, so for them this is one read. (Pinning latest/ to its step directory instead lost to pruning:
    in a test saving every 5 steps, a step directory lived a fraction of a second.)"""
    error: Exception | None = None
    for _ in range(attempts):
        before = _files_identity(ckpt)
        try:
            result, error = read(ckpt), None
        except (InvalidCheckpoint, UserError, OSError) as e:
            result, error = None, e
        moved = _files_identity(ckpt) != before
        if not moved and error is None:
            return result
        if not moved and not _being_swapped(ckpt):
            raise error
        time.sleep(0.05)
    if error is not None:
        raise error
    raise UserError(
        f"{ckpt}: replaced {attempts} times while being read (a run is saving there often); read one of "
        "the step_* directories beside it instead"
    )


def checkpoint_phase(path: Path) -> str | None:
    """The phase a checkpoint belongs to: its sidecar's, or for an exported .pt its record's (None if unknown)."""
    if path.is_dir():
        try:
            return read_meta(path, verify=False).get("phase")
        except InvalidCheckpoint:
            return None
    if path.is_file():
        return (read_export_record(path) or {}).get("phase")
    return None


def phase_finished(phase_dir: Path, total_steps: int) -> bool:
    """Whether a phase's newest intact checkpoint has reached total_steps."""
    found = find_resume_checkpoint(phase_dir)
    return found is not None and read_meta(found, verify=False)["step"] >= total_steps


@dataclass
class LoadedCheckpoint:
    source: Path
    model_state: dict[str, torch.Tensor]  # full state dict, tied keys restored
    optimizer_state: dict[str, Any] | None
    step: int
    best_val_loss: float | None
    meta: dict[str, Any]  # the sidecar (for a .pt: what the .pt carries, phase unknown)
    origin: Path | None = None  # where the weights live for good: for latest/ or best/, the step directory they were


def _origin(ckpt: Path, step: int) -> Path:
    """The step directory holding the same files as `ckpt` when it is latest/ or best/ (which move on; a step
    directory does not), else `ckpt`: what a record names as the source."""
    ckpt = Path(ckpt).resolve()
    if ckpt.name not in ("best", "latest"):
        return ckpt
    target = ckpt.with_name(step_dir_name(step))
    return target if _files_identity(target) == _files_identity(ckpt) else ckpt


def _load_optimizer(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusal, truncated zip: the user has to see which file
        raise UserError(f"{path}: cannot load optimizer state safely ({first_line(e)})") from None


def load_checkpoint(path: Path, with_optimizer: bool = True, approved: str | None = None) -> LoadedCheckpoint:
    """Load one of our checkpoint directories or an exported best.pt (a Hugging Face directory is a start point:
    training/start.py). Every read is safetensors or weights_only=True. `approved`: the sha256 of the weights a
    check made before the load passed (a promotion verdict); other weights are refused."""
    path = Path(path)
    if path.is_file():
        return _load_best_pt(path)
    if not path.exists():
        raise UserError(
            f"{path}: checkpoint not found (expected a checkpoint directory, an exported .pt file or a "
            "Hugging Face model directory)"
        )
    loaded = read_steadily(path, lambda p: _load_directory(p, with_optimizer))
    if approved is not None and model_sha256(loaded.meta) != approved:
        raise UserError(
            f"{path}: moved on to step {loaded.step} after it was checked (a run is saving there), and "
            "those weights were not; nothing was written: name the checkpoint's step directory instead"
        )
    return loaded


def _load_directory(path: Path, with_optimizer: bool) -> LoadedCheckpoint:
    try:
        meta = read_meta(path)
    except InvalidCheckpoint as e:
        raise UserError(f"{path}: invalid checkpoint: {e}") from None
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / MODEL_FILE}: unreadable weights ({e})") from None
    optimizer_state = _load_optimizer(path / OPTIMIZER_FILE) if with_optimizer else None
    return LoadedCheckpoint(
        source=path,
        model_state=expand_aliases(tensors, meta.get("tied", {})),
        optimizer_state=optimizer_state,
        step=int(meta["step"]),
        best_val_loss=meta["best_val_loss"],
        meta=meta,
        origin=_origin(path, int(meta["step"])),
    )


def _load_best_pt(path: Path) -> LoadedCheckpoint:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a loadable best.pt ({first_line(e)})") from None
    if not isinstance(blob, dict) or set(blob) != set(BEST_PT_KEYS):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise UserError(f"{path}: expected a best.pt dict with keys {', '.join(BEST_PT_KEYS)}, found {keys}")
    problems = loop_state_problems(blob)
    if isinstance(blob["model_cfg"], dict):
        problems += model_cfg_problems(complete_model_cfg(blob["model_cfg"]), "model_cfg", known_only=True)
    if problems:
        raise UserError(f"{path}: not a usable best.pt: {'; '.join(problems)}")
    # what the record knows of the run that wrote it (phase, caches, batch) is checked as a sidecar's is; the run id
    # is not carried: a run started from a .pt is a new run whose parent is that .pt (manifest.parent_record)
    record = verified_export_record(path) or {}
    meta = {
        "model_cfg": complete_model_cfg(blob["model_cfg"]),
        "train_cfg": blob["train_cfg"],
        "phase": record.get("phase"),
        "run_id": None,
        **{k: record[k] for k in RECORD_CHECKS if record.get(k) is not None},
    }
    return LoadedCheckpoint(
        source=path,
        model_state=blob["model_state"],
        optimizer_state=blob["optimizer_state"],
        step=int(blob["step"]),
        best_val_loss=blob["best_val_loss"],
        meta=meta,
    )


def check_model_cfg(loaded: LoadedCheckpoint, model_cfg: dict[str, Any]) -> None:
    """Refuse weights that do not fit or would mean another function: shape, biases and tying change the state
    dict; the activation, norms, positions and attention layout what it computes (dropout changes neither)."""
    saved = resolved_model_cfg(loaded.meta.get("model_cfg") or {})
    diff = shape_diff(saved, resolved_model_cfg(model_cfg), (*MODEL_SHAPE_KEYS, *MODEL_FUNCTION_KEYS))
    if diff:
        raise UserError(
            f"{loaded.source}: checkpoint model shape differs from the config ({diff}; checkpoint vs config)"
        )


# ---------------------------------------------------------------------------------------------------------------
# best.pt


def state_problems(model_state: dict, model_cfg: dict) -> list[str]:
    """What keeps a state from loading, strictly, into the model its model_cfg describes: a missing, extra or
    wrong-shaped tensor. Checked on the meta device, so nothing is allocated."""
    try:
        expected = expected_shapes(ModelConfig(**complete_model_cfg(model_cfg)))
    except (TypeError, ValueError, RuntimeError) as e:
        return [f"model_cfg describes no model ({first_line(e)})"]
    if not isinstance(model_state, dict) or not all(isinstance(v, torch.Tensor) for v in model_state.values()):
        return ["model_state is not a dict of tensors"]
    problems = [f"model_state lacks {k} {list(shape)}" for k, shape in expected.items() if k not in model_state]
    problems += [f"model_state holds {k}, which the model has not" for k in model_state if k not in expected]
    problems += [
        f"model_state {k} is {list(v.shape)}, the model's is {list(expected[k])}"
        for k, v in model_state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    return problems


def best_pt_dict(loaded: LoadedCheckpoint) -> dict[str, Any]:
    ckpt = loaded.source
    problems = state_problems(loaded.model_state, loaded.meta["model_cfg"])
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            f"{ckpt}: its weights do not fit its model_cfg: {'; '.join(problems[:3])}{more}; nothing was written"
        )
    return {
        "model_cfg": loaded.meta["model_cfg"],
        "train_cfg": loaded.meta["train_cfg"],
        "model_state": loaded.model_state,
        "optimizer_state": loaded.optimizer_state,
        "step": loaded.step,
        "best_val_loss": loaded.best_val_loss,
    }


def export_best_pt(ckpt: Path, out: Path, approved: str | None = None) -> LoadedCheckpoint:
    """Write the six-key best.pt atomically: a kill leaves the old file or none, never part of one. Returns what
    was loaded: its sidecar is the one of the weights written (a re-read of latest/ could be the next save's)."""
    loaded = load_checkpoint(ckpt, approved=approved)
    blob = best_pt_dict(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(blob, tmp)
        fault_point("export", partial=tmp)
        fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return loaded


def model_sha256(meta: dict) -> str | None:
    """The weights' identity: the sha256 of model.safetensors (for an exported .pt, the one its record carries)."""
    return (meta.get("files") or {}).get(MODEL_FILE, {}).get("sha256") or meta.get("model_sha256")


def record_path(best_pt: Path) -> Path:
    return best_pt.with_name(best_pt.name + ".json")


def verified_export_record(best_pt: Path) -> dict | None:
    """The record beside an exported .pt once the file's sha256 matches it; without one, a warning.

    A .pt whose bytes were damaged loads (torch checks nothing), resumes and, exported again, would get a fresh
    record that hides the damage: the record written with it is what can tell."""
    if not record_path(best_pt).exists():
        log.warning(
            "%s: no %s beside it, so nothing could verify this file (its bytes, its phase, its data)",
            best_pt,
            record_path(best_pt).name,
        )
        return None
    try:
        record = loads(record_path(best_pt).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"{record_path(best_pt)}: unreadable export record ({e}); move it away to use {best_pt} unverified"
        ) from None
    if not isinstance(record, dict) or record.get("format") != "trainer_accel.export":
        raise UserError(
            f"{record_path(best_pt)}: not an export record of this trainer; move it away to use {best_pt} unverified"
        )
    digest = sha256_file(best_pt)
    if digest != record.get("best_pt_sha256"):
        raise UserError(
            f"{best_pt}: sha256 {digest[:12]} differs from the {str(record.get('best_pt_sha256'))[:12]} its "
            f"record {record_path(best_pt).name} holds: the file is damaged or was replaced without its "
            "record; export it again from its checkpoint directory"
        )
    return record


RECORD_CHECKS = (
    "caches",
    "global_batch",
    "data_fingerprint",
    "config_fingerprint",
    "model_sha256",
    "parent",
    "tokenizer",
    "tokenizer_path",
    "added_tokens",
    "chat",
)  # carried from its record into a .pt's meta


def read_export_record(best_pt: Path) -> dict | None:
    """The record beside an exported .pt, if there is one and it belongs to this file (same size as written)."""
    try:
        record = loads(record_path(best_pt).read_text())
        size = best_pt.stat().st_size
    except (OSError, json.JSONDecodeError):
        return None
    ours = isinstance(record, dict) and record.get("format") == "trainer_accel.export"
    return record if ours and record.get("best_pt_size") == size else None
