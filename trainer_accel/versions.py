"""Format versions of the files a trainer reads back after it wrote them: checkpoint sidecars and cache metas.

A format has a current version and, for each older version it still reads, one step that turns a document of
that version into the next. Reading dispatches on the version the file carries: the current one is used as it
is; an older one is upgraded step by step, in memory only (a checkpoint or cache on disk is never rewritten,
so an older trainer can still read it), with one notice per file; a newer one is refused, naming both versions,
because guessing at a format from the future is how weights get loaded wrong. tests/fixtures/v1/ keeps files
of version 1 so that every later trainer proves it still reads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_accel.errors import UserError

log = logging.getLogger(__name__)

Step = Callable[[dict[str, Any]], dict[str, Any]]
_noticed: set = set()


class NewerFormat(UserError):
    """Written by a later trainer: refused, never read as if it were ours."""


def upgrade(
    doc: dict[str, Any], key: str, current: int, steps: dict[int, Step], where: str, what: str, file: Path | None = None
) -> dict[str, Any]:
    """`doc` (a parsed sidecar or meta whose version is `doc[key]`, read from `file`) as version `current`.

    `steps[v]` upgrades version v to v + 1. Raises NewerFormat for a version above `current`, ValueError for a
    version that is not an integer or older than every step (the caller says what kind of damage that is)."""
    version = doc.get(key)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"its format version ({key}) is {version!r}, not an integer")
    if version > current:
        raise NewerFormat(
            f"{where}: {what} format version {version} was written by a newer trainer_accel; this one "
            f"reads versions up to {current} (upgrade trainer_accel to use it)"
        )
    oldest = min(steps, default=current)
    if version < oldest:
        raise ValueError(f"format version {version}; this trainer reads versions {oldest} to {current}")
    upgraded = dict(doc)
    for v in range(version, current):
        upgraded = steps[v](upgraded)
        upgraded[key] = v + 1
    if version == current:
        return upgraded
    notice = _file_identity(file) or where  # latest/ and best/ are hard links to a step's files: one notice
    if notice not in _noticed:
        _noticed.add(notice)
        log.info(
            "%s: %s format version %d, upgraded to version %d as it was read (the file is unchanged)",
            where,
            what,
            version,
            current,
        )
    return upgraded


def _file_identity(file: Path | None) -> tuple[int, int] | None:
    try:
        st = os.stat(file) if file is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None else None
