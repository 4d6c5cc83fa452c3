"""The short CI version of tests/kill_anywhere.py: SIGKILL at random moments, restart, compare."""

from __future__ import annotations

from kill_anywhere import kill_anywhere


def test_random_sigkills_lose_nothing(tmp_path):
    result = kill_anywhere(kills=3, workdir=tmp_path, seed=1)
    assert result["kills"] == 3 and result["restarts"] == 4
