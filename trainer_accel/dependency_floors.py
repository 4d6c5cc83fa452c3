"""The oldest torch and accelerate this trainer runs on, checked before anything of it is imported.

An older torch or accelerate does not fail where it is installed: it fails minutes later, deep in a run, with
an AttributeError from inside a library (an FSDP2 run on torch 2.5 stops in Accelerate's prepare). So the
package checks the installed versions when it is imported, from the installed packages' metadata (without
importing torch, which is what may be too old), and a command stops at once with one line naming each package,
the version found, the floor and what needs it. pyproject.toml and the README state the same floors.
Measured (CPU): the whole test suite passes on torch 2.6.0 with accelerate 1.14.0, its FSDP2 tests skipped
(torch 2.6 cannot shard on the CPU: tests/test_device_paths.CPU_FSDP2), and on torch 2.13 with accelerate 1.13.0,
FSDP2 included; torch 2.5.1 fails the FSDP2 tests in Accelerate ("FSDP2 requires PyTorch >= 2.6.0"). Older
accelerate releases were not tried, so 1.13 is the lowest known to work, not proven the lowest that could.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

FLOORS: dict[str, tuple[tuple[int, int], str]] = {
    "torch": ((2, 6), "FSDP2 through Accelerate, and SDPA's grouped-query attention"),
    "accelerate": ((1, 13), "FSDP2 through fsdp_version 2, and its loss scaler for fp16"),
}


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string ('2.13.0+cpu', '2.7.0a0+git1234', '1.14.0.dev0'); None if unreadable."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def floor_problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per package older than its floor (or missing). `installed`: {name: version or None}, else the
    environment's own."""
    if installed is None:
        installed = {name: _installed_version(name) for name in FLOORS}
    problems = []
    for name, (floor, why) in FLOORS.items():
        version = installed.get(name)
        need = f"{floor[0]}.{floor[1]}"
        if version is None:
            problems.append(f"{name} is not installed; trainer_accel needs {name} >= {need} ({why})")
            continue
        found = release(version)
        if found is not None and found < floor:
            problems.append(
                f"{name} {version} is installed; trainer_accel needs {name} >= {need} ({why}): "
                f"pip install '{name}>={need}'"
            )
    return problems


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_floors() -> None:
    """Stop on a too-old torch or accelerate: a command (`python -m trainer_accel.X`) prints one `error:` line per
    package and exits 2; an import from other code raises ImportError with the same text."""
    problems = floor_problems()
    if not problems:
        return
    if sys.argv[:1] == ["-m"]:  # the package is being imported for `python -m trainer_accel.X`, before X runs
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError("; ".join(problems))
