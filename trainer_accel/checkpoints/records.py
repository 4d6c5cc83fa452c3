"""The record beside an exported best.pt (`best.pt.json`): where its weights came from and their hashes, checked
before a .pt is trusted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer_accel.errors import UserError
from trainer_accel.fsio import (
    loads,
    sha256_file,
)

log = logging.getLogger(__name__)


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
