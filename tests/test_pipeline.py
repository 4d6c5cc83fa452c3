"""The pipeline as a user runs it: pretrain -> SFT -> best.pt, and started again after stopping anywhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import events, run_cli, write_config

from trainer_accel.checkpoints.layout import read_meta


def pipeline(world, pre_train=None, sft_train=None):
    write_config(world / "c/pretrain.json", "pretrain", pre_train)
    write_config(world / "c/sft.json", "sft", sft_train, init_from="checkpoints/pretrain/best")
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    return run_cli("run", "--phase", "pipeline", "--config", "c/pipeline.json", cwd=world)


def steps_of(world, phase):
    return [e["step"] for e in events(world, "train") if e["phase"] == phase]


def test_tiny_pipeline_ends_in_the_sft_best_pt(world):
    r = pipeline(world)
    assert r.returncode == 0, r.stderr
    sft_best = read_meta(world / "checkpoints/sft/best")
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    assert blob["step"] == sft_best["step"] and blob["best_val_loss"] == sft_best["best_val_loss"]
    assert blob["train_cfg"]["total_steps"] == 8
    # SFT started from the pretrain best: its first evaluation (step 0) is the pretrained model on SFT val
    pre_best = read_meta(world / "checkpoints/pretrain/best")
    assert "SFT starts from the pretrain best" in r.stderr
    assert pre_best["step"] in (4, 8)
    sft_start = [e for e in events(world, "eval") if e["phase"] == "sft" and e["step"] == 0]
    assert len(sft_start) == 1 and sft_best["best_val_loss"] < sft_start[0]["val/loss"]
    assert steps_of(world, "pretrain") == list(range(1, 9)) and steps_of(world, "sft") == list(range(1, 9))


def test_restarted_pipeline_continues_where_it_stopped(world):
    # stopped in the middle of pretrain: pretrain alone ran 4 of its 8 steps
    cfg4 = write_config(world / "pre4.json", "pretrain", {"total_steps": 4, "warmup_steps": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg4), cwd=world).returncode == 0
    r = pipeline(world, sft_train={"total_steps": 4})
    assert r.returncode == 0, r.stderr
    assert steps_of(world, "pretrain") == list(range(1, 9))  # resumed at 5, not restarted
    assert steps_of(world, "sft") == [1, 2, 3, 4]

    # stopped during SFT: more SFT steps asked for; pretrain is never re-run, SFT resumes from its own checkpoint
    r = pipeline(world, sft_train={"total_steps": 8})
    assert r.returncode == 0, r.stderr
    assert "pretrain already finished" in r.stderr
    assert steps_of(world, "pretrain") == list(range(1, 9))
    assert steps_of(world, "sft") == list(range(1, 9))
    assert read_meta(world / "checkpoints/sft/latest")["step"] == 8

    # finished: started again, nothing trains, best.pt is rewritten from the SFT best
    (world / "checkpoints/best.pt").unlink()
    r = pipeline(world, sft_train={"total_steps": 8})
    assert r.returncode == 0, r.stderr
    assert len(events(world, "train")) == 16 and (world / "checkpoints/best.pt").is_file()


def test_sft_never_resumes_from_a_pretrain_checkpoint(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    sft = write_config(world / "sft.json", "sft")
    r = run_cli("run", "--phase", "sft", "--config", str(sft), "--resume", "checkpoints/pretrain/latest", cwd=world)
    assert r.returncode == 2 and "a pretrain checkpoint cannot resume the sft phase" in r.stderr


def test_no_resume_sets_earlier_checkpoints_aside(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--no-resume", cwd=world)
    assert r.returncode == 0, r.stderr
    kept = list((world / "checkpoints").glob("pretrain.replaced-*"))
    assert len(kept) == 1 and read_meta(kept[0] / "latest")["step"] == 2
    assert steps_of(world, "pretrain") == [1, 2, 1, 2]
    assert len({e["run_id"] for e in events(world, "run_start")}) == 2


@pytest.mark.parametrize("phase", ["pretrain", "pipeline"])
@pytest.mark.parametrize("bad", [{"val_source": "nosuch"}, {"init_from": "checkpoints/nowhere"}])
def test_a_refused_no_resume_run_moves_no_checkpoint_aside(world, phase, bad):
    """--no-resume used to rename checkpoints/pretrain before it checked the inputs: a run refused for a typo left
    the next plain run to start from scratch."""
    pre = write_config(world / "c/pretrain.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world).returncode == 0
    write_config(world / "c/pretrain.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2}, **bad)
    write_config(world / "c/sft.json", "sft", init_from="checkpoints/pretrain/best")
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    config = "c/pipeline.json" if phase == "pipeline" else "c/pretrain.json"
    r = run_cli("run", "--phase", phase, "--config", config, "--no-resume", cwd=world)
    assert r.returncode == 2 and next(iter(bad.values())) in r.stderr, r.stderr
    assert not list((world / "checkpoints").glob("*.replaced-*"))
    assert read_meta(world / "checkpoints/pretrain/latest")["step"] == 2


def test_pipeline_samples_of_both_phases_are_kept(world):
    write_config(world / "c/pretrain.json", "pretrain", sample_prompts=["The"])
    write_config(
        world / "c/sft.json",
        "sft",
        init_from="checkpoints/pretrain/best",
        sample_prompts=[{"prompt": "Hi", "task": "chat"}],
    )
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    assert run_cli("run", "--phase", "pipeline", "--config", "c/pipeline.json", cwd=world).returncode == 0
    for phase, prompt in (("pretrain", "The"), ("sft", "Hi")):
        files = sorted((world / "samples" / phase).iterdir())
        assert [f.name for f in files] == ["step-00000004-00.json", "step-00000008-00.json"]
        assert all(json.loads(f.read_text())["prompt"] == prompt for f in files)


def test_init_from_of_a_standalone_sft_lies_under_the_artifacts_dir(world):
    """`init_from: checkpoints/pretrain/best` with TRAINER_ARTIFACTS_DIR=elsewhere used to read ./checkpoints (a
    silent start from whatever pretrain the working directory held); --plan must show what the run will do."""
    env = {"TRAINER_ARTIFACTS_DIR": "elsewhere"}
    pre = write_config(world / "pre.json", "pretrain", {"total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world, env=env).returncode == 0
    pre_run = read_meta(world / "elsewhere/checkpoints/pretrain/best")["run_id"]
    sft = write_config(world / "sft.json", "sft", {"total_steps": 4}, init_from="checkpoints/pretrain/best")
    plan = run_cli("run", "--phase", "sft", "--config", str(sft), "--plan", cwd=world, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"initialise from elsewhere/checkpoints/pretrain/best (weights only; step 4, run {pre_run})" in plan.stdout
    r = run_cli("run", "--phase", "sft", "--config", str(sft), cwd=world, env=env)
    assert r.returncode == 0, r.stderr
    assert f"initialised weights from elsewhere/checkpoints/pretrain/best (step 4, run {pre_run})" in r.stderr
    assert not (world / "checkpoints").exists()
