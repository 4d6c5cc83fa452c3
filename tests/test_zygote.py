"""The suite's fork server (tests/zygote.py) must run a command as a fresh `python -m` does: same exit code, same
output, the environment and working directory the test gave, and a signal death read as one."""

from __future__ import annotations

from conftest import Zygote, run_cli, write_config


def test_a_forked_command_matches_a_fresh_process(world):
    cfg = write_config(world / "bad.json", "pretrain", {"B": 0, "total_steps": -1})
    env = {"TRAINER_ARTIFACTS_DIR": str(world / "elsewhere")}
    args = ("run", "--phase", "pretrain", "--config", str(cfg))
    forked, fresh = run_cli(*args, cwd=world, env=env), run_cli(*args, cwd=world, env=env, fresh=True)
    assert Zygote.get().calls >= 1
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.returncode == 2 and "train_cfg.B" in forked.stderr and "train_cfg.total_steps" in forked.stderr

    plan = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(write_config(world / "ok.json", "pretrain")),
        "--plan",
        cwd=world,
        env=env,
    )
    assert plan.returncode == 0, plan.stderr
    assert str(world / "elsewhere") in plan.stdout + plan.stderr  # the test's environment, not the server's


def test_a_command_killed_by_a_signal_reads_as_one(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 4, "ckpt_every": 2})
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"TRAINER_FAULT": "before_meta"})
    assert r.returncode == -9, r.stderr[-500:]
    again = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)  # the server serves on
    assert again.returncode == 0, again.stderr[-500:]
    assert "exported checkpoints/best.pt" in again.stderr and "(step 4," in again.stderr
