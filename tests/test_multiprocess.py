"""Several processes through `accelerate launch`, as the README shows: a 2-process pipeline that is killed and
resumed and matches a 1-process run, and two "machines" on loopback that train one run together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import free_port, run_cli, write_config
from test_numerics import LAUNCH, launch, max_diff, weights

from trainer_accel.observability.metrics import read_events

# 2 processes x B=2 and 1 process x B=2 x accum_steps=2 train on the same rows with the same dropout masks and
# validate on the same batches; only the order of float additions differs.
VAL_TOLERANCE = 1e-4
TRAIN = {"total_steps": 4, "B": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1}


def pipeline(world, name, train):
    """SFT with replay and packing on: rows addressed by (seed, step, micro-step, rank) hold for them too."""
    write_config(world / name / "pretrain.json", "pretrain", train)
    write_config(
        world / name / "sft.json",
        "sft",
        {**train, "pack": True},
        init_from="checkpoints/pretrain/best",
        replay={"wiki": 0.25, "roam": 0.05},
    )
    path = world / name / "pipeline.json"
    path.write_text(json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"}))
    return ("--phase", "pipeline", "--config", str(path))


def val_losses(artifacts):
    from trainer_accel.observability.metrics import read_events

    return [
        (e["phase"], e["step"], e["val/loss"])
        for e in read_events(artifacts / "metrics/events.jsonl")
        if e["event"] == "eval"
    ]


def assert_valid_run(artifacts, processes):
    from trainer_accel.checkpoints.layout import read_meta

    for phase in ("pretrain", "sft"):
        for pointer in ("latest", "best"):
            meta = read_meta(artifacts / "checkpoints" / phase / pointer, verify=True)  # sizes and sha256 of every file
            assert meta["world_size"] == processes and meta["phase"] == phase
            assert (
                meta["step"] == TRAIN["total_steps"] if pointer == "latest" else meta["step"] == meta["best_val_step"]
            )
    best = torch.load(artifacts / "checkpoints/best.pt", weights_only=True)
    assert set(best) == {"model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss"}
    assert len(best["optimizer_state"]["state"]) == len(best["model_state"]) - 1  # lm_head is tied to tok_emb


def test_two_process_pipeline_resumes_and_matches_one_process(world):
    two = world / "two"
    env = {"TRAINER_ARTIFACTS_DIR": str(two)}
    args = pipeline(world, "c2", TRAIN)
    # pretrain writes 2 checkpoints, SFT step 2 the 3rd; the main process dies while it writes the 4th (SFT step 4)
    killed = launch(world, "cpu_2proc.yaml", *args, "--device", "cpu", env={**env, "TRAINER_FAULT": "after_meta:4"})
    assert killed.returncode != 0
    again = launch(world, "cpu_2proc.yaml", *args, "--device", "cpu", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain already finished" in again.stderr and "at step 2" in again.stderr, again.stderr
    assert "2 process(es) on cpu" in again.stderr
    assert_valid_run(two, processes=2)

    one = world / "one"
    r = run_cli(
        "run", *pipeline(world, "c1", {**TRAIN, "accum_steps": 2}), cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(one)}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_valid_run(one, processes=1)
    a, b = val_losses(one), val_losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 6  # steps 0, 2, 4 of both phases
    assert all(abs(x[2] - y[2]) < VAL_TOLERANCE for x, y in zip(a, b))
    assert max_diff(weights(world, "one"), weights(world, "two")) < 1e-5


def test_processes_agree_at_the_end_of_each_phase_with_cpu_2proc_as_written(world):
    """launch/cpu_2proc.yaml as the README writes it (no --device cpu) connects 2 CPU processes over gloo. Each phase
    ends with a checkpoint at its last step (total_steps == ckpt_every), written by the main process in the
    background: a process that decided by looking for latest/ or the pretrain best/ on disk could find it absent
    mid-swap, save again or refuse alone, and the processes' collectives no longer pair up (rank 1 died with
    "Connection closed by peer"). Every such decision is the loop's counters or the main process's answer."""
    args = pipeline(world, "race", {"total_steps": 2, "B": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1})
    r = launch(world, "cpu_2proc.yaml", *args, env={"TRAINER_ARTIFACTS_DIR": str(world / "race")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compute: 2 process(es) on cpu" in r.stderr and "connected over gloo (no CUDA or MPS here)" in r.stderr
    from trainer_accel.checkpoints.layout import read_meta

    for phase in ("pretrain", "sft"):
        names = sorted(p.name for p in (world / "race/checkpoints" / phase).iterdir())
        assert names == ["best", "latest", "step_0000002"]
        assert read_meta(world / "race/checkpoints" / phase / "latest")["world_size"] == 2
    assert len([e for e in read_events(world / "race/metrics/events.jsonl") if e["event"] == "checkpoint"]) == 2


def test_two_machines_on_loopback_train_one_run(world):
    """launch/multi_node.yaml as two nodes would run it, each with its own launcher and machine rank."""
    args = (
        "--phase",
        "pretrain",
        "--config",
        str(write_config(world / "pre.json", "pretrain", TRAIN)),
        "--device",
        "cpu",
    )
    port = str(free_port())
    env = {**os.environ, "TRAINER_ARTIFACTS_DIR": str(world / "run")}
    machines = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(LAUNCH / "multi_node.yaml"),
                "--num_processes",
                "2",
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
                "--mixed_precision",
                "no",
                "-m",
                "trainer_accel.run",
                *args,
            ],
            cwd=world,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    main_log = outputs[0][1]
    assert "2 process(es) on cpu" in main_log and "exported" in main_log
    assert "exported" not in outputs[1][1]  # machine 1 trains but writes and reports nothing
    from trainer_accel.checkpoints.layout import read_meta

    ckpts = sorted(p.name for p in (world / "run/checkpoints/pretrain").iterdir())
    assert ckpts == ["best", "latest", "step_0000002", "step_0000004"]
    assert read_meta(world / "run/checkpoints/pretrain/latest", verify=True)["world_size"] == 2
