"""The short CI version of tests/kill_anywhere.py: SIGKILL at random moments, restart, compare."""

from __future__ import annotations

import shutil

from conftest import start_cli
from kill_anywhere import kill_anywhere


def test_random_sigkills_lose_nothing(tmp_path, demo_data):
    shutil.copytree(demo_data, tmp_path / "data")
    result = kill_anywhere(
        kills=3,
        workdir=tmp_path,
        seed=1,
        total_steps=60,
        max_delay=0.3,
        start=lambda cmd, cwd, env: start_cli("run", *cmd, cwd=cwd, env=env),
    )
    assert result["kills"] == 3 and result["restarts"] == 4
