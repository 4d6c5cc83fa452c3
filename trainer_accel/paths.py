"""Where everything lives, with every environment override in one place.

Relative paths resolve against the current working directory at the moment they are asked for, so tests and
users can point a whole run elsewhere with `TRAINER_ARTIFACTS_DIR` / `TRAINER_DATA_DIR`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (configs/, launch/, tests/) when installed with -e

SPLITS = ("train", "val")
SOURCE_NAME = re.compile(r"[a-z0-9_]{1,64}")
NAME_RULE = "a source name is 1-64 lowercase letters, digits and _"

CACHE_NAMING = (
    "pretrain caches are {data}/cache/streams/{source}_{split}.bin, SFT caches {data}/cache/sft/{source}_{split}.bin, "
    "preference caches {data}/cache/pref/{source}_{split}.bin, split train|val, " + NAME_RULE + ", each with a "
    "{file}.meta.json beside it (build them with: python -m trainer_accel.prepare --stream SOURCE=PATH --sft "
    "SOURCE=PATH --pref SOURCE=PATH)"
)


def source_name_problem(name: object) -> str | None:
    """Why `name` cannot name a source (it becomes part of a file name, a metric key and a tracker column)."""
    if isinstance(name, str) and SOURCE_NAME.fullmatch(name):
        return None
    return f"{name!r} is not a source name ({NAME_RULE})"


# The kinds of cache, and the folder each lives in: a token stream (documents back to back), examples (one
# conversation each, with an index of where each starts and the answers to learn) and preference pairs (two
# conversations per pair, the same prompt with the chosen and the rejected last answer, indexed like examples).
# Phases name the kinds they read (phases/); nothing else compares with these words.
STREAM, EXAMPLES, PAIRS = "stream", "sft", "pref"
KIND_FOLDERS = {STREAM: "streams", EXAMPLES: "sft", PAIRS: "pref"}
INDEXED = (EXAMPLES, PAIRS)  # the kinds whose caches have an index of where each conversation starts
FOLDER_KINDS = {folder: kind for kind, folder in KIND_FOLDERS.items()}


@dataclass(frozen=True)
class Paths:
    data: Path
    artifacts: Path  # what runs write goes under here unless one of the overrides below moves it
    checkpoints: Path
    samples: Path
    metrics: Path
    events: Path
    runs: Path  # the run registry: runs/{run_id}/run.json

    def stream_cache(self, source: str, split: str) -> Path:
        return self.cache(STREAM, source, split)

    def sft_cache(self, source: str, split: str) -> Path:
        return self.cache(EXAMPLES, source, split)

    def cache(self, kind: str, source: str, split: str) -> Path:
        return self.data / "cache" / KIND_FOLDERS[kind] / f"{source}_{split}.bin"

    def caches(self, split: str | None = None) -> list[tuple[str, str, Path]]:
        """(kind, source, path) of every cache present under the naming convention, streams first, by name."""
        out = []
        for kind, folder in KIND_FOLDERS.items():
            for path in sorted((self.data / "cache" / folder).glob("*_*.bin")):
                source, _, part = path.stem.rpartition("_")
                if part in SPLITS and (split is None or part == split) and SOURCE_NAME.fullmatch(source):
                    out.append((kind, source, path))
        return out

    def config_checkpoint(self, value: str) -> Path:
        """A checkpoint a config names (`init_from`): an absolute path as written; a relative one lies under the
        artifacts dir, and `checkpoints/...` under the checkpoints dir (wherever TRAINER_CHECKPOINTS_DIR puts it),
        so a run with its own TRAINER_ARTIFACTS_DIR starts from its own pretrain, not the working directory's."""
        path = Path(value)
        if path.is_absolute():
            return path
        if path.parts[:1] == ("checkpoints",):
            return self.checkpoints.joinpath(*path.parts[1:])
        return self.artifacts / path

    def phase_dir(self, phase: str) -> Path:
        return self.checkpoints / phase

    @property
    def best_pt(self) -> Path:
        return self.checkpoints / "best.pt"

    def manifest(self, run_id: str) -> Path:
        return self.runs / run_id / "run.json"

    @property
    def queue_db(self) -> Path:
        return self.artifacts / "queue.db"


def resolve_paths(env: Mapping[str, str] | None = None) -> Paths:
    """Read the environment now (not at import), so each run and each test sees its own layout. `env` lets the
    queue resolve a job's layout from the environment the job will run in."""
    env = os.environ if env is None else env

    def get(name: str, default: Path) -> Path:
        return Path(env[name]) if env.get(name) else default

    data = get("TRAINER_DATA_DIR", Path("data"))
    artifacts = get("TRAINER_ARTIFACTS_DIR", Path("."))
    metrics = get("TRAINER_METRICS_DIR", artifacts / "metrics")
    return Paths(
        data=data,
        artifacts=artifacts,
        checkpoints=get("TRAINER_CHECKPOINTS_DIR", artifacts / "checkpoints"),
        samples=get("TRAINER_SAMPLES_DIR", artifacts / "samples"),
        metrics=metrics,
        events=get("TRAINER_EVENTS_PATH", metrics / "events.jsonl"),
        runs=get("TRAINER_RUNS_DIR", artifacts / "runs"),
    )


def unwritable(targets: list[tuple[str, Path]]) -> list[str]:
    """Where a command will write and cannot, one problem each, checked before it does any work (an unwritable
    checkpoints dir used to train a whole phase and fail at its end). Nothing is made: an existing directory gets a
    file written in it and removed, a missing one needs its nearest existing parent to be a writable directory."""
    problems = []
    for what, directory in targets:
        existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is a file")
            if existing == directory:
                probe = directory / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            elif not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(f"{existing} is not writable")
        except OSError as e:
            problems.append(f"{directory}: cannot write {what} here ({e.strerror or e})")
    return problems


def output_file_problem(flag: str, path: Path | None) -> list[str]:
    """A file a command writes (--result-json, --out): a directory there, or an unwritable parent, is a problem."""
    if path is None:
        return []
    if path.is_dir():
        return [f"{flag} {path}: is a directory; give the path of a file"]
    return unwritable([(flag, path.parent)])
