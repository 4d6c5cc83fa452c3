"""Where everything lives, with every environment override in one place.

Relative paths resolve against the current working directory at the moment they are asked for, so tests and
users can point a whole run elsewhere with `TRAINER_ARTIFACTS_DIR` / `TRAINER_DATA_DIR`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STREAM_SOURCES = ("wiki", "roam", "primer")
SFT_SOURCES = ("dolly", "oasst1", "primer")
SPLITS = ("train", "val")

CACHE_NAMING = (
    "pretrain caches are {data}/cache/streams/{source}_{split}.bin with source in wiki|roam|primer, "
    "SFT caches are {data}/cache/sft/{source}_{split}.bin with source in dolly|oasst1|primer, split in "
    "train|val, each with a {file}.meta.json beside it (build them with: python -m trainer_accel.prepare)"
)


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value) if value else default


@dataclass(frozen=True)
class Paths:
    data: Path
    checkpoints: Path
    samples: Path
    metrics: Path
    events: Path

    def stream_cache(self, source: str, split: str) -> Path:
        return self.data / "cache" / "streams" / f"{source}_{split}.bin"

    def sft_cache(self, source: str, split: str) -> Path:
        return self.data / "cache" / "sft" / f"{source}_{split}.bin"

    def phase_dir(self, phase: str) -> Path:
        return self.checkpoints / phase

    @property
    def best_pt(self) -> Path:
        return self.checkpoints / "best.pt"


def resolve_paths() -> Paths:
    """Read the environment now (not at import), so each run and each test sees its own layout."""
    data = _env_path("TRAINER_DATA_DIR", Path("data"))
    artifacts = _env_path("TRAINER_ARTIFACTS_DIR", Path("."))
    metrics = _env_path("TRAINER_METRICS_DIR", artifacts / "metrics")
    return Paths(
        data=data,
        checkpoints=_env_path("TRAINER_CHECKPOINTS_DIR", artifacts / "checkpoints"),
        samples=_env_path("TRAINER_SAMPLES_DIR", artifacts / "samples"),
        metrics=metrics,
        events=_env_path("TRAINER_EVENTS_PATH", metrics / "events.jsonl"),
    )
