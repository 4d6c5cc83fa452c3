"""TensorBoard and wandb, read back with their own readers: every progress line once, one run id across a resume."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import events, write_config

TRACKED = {"log_with": ["tensorboard", "wandb"], "tags": ["smoke"]}


def env_without_wandb_credentials(world):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(world)}  # no ~/.netrc with a wandb key


def tb_scalars(world, run_id, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(world / "metrics" / "tensorboard" / f"pretrain-{run_id}"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def tb_steps(world, run_id, tag):
    return list(tb_scalars(world, run_id, tag))


def wandb_records(path):
    """Records of an offline .wandb file (LevelDB log framing of wandb's protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_run(world, run_id):
    """(run record, history {step: values}, config keys) over the run's offline directories."""
    run, history, config = None, {}, set()
    for path in sorted((world / "metrics" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "config":
                config |= {u.key for u in r.config.update}
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                assert items["_step"] not in history, f"step {items['_step']} logged twice"
                history[items["_step"]] = items
    return run, history, config


def test_tensorboard_and_wandb_record_the_run(world):
    cfg = write_config(
        world / "exp" / "pre.json",
        "pretrain",
        {"total_steps": 4, "eval_every": 2, "log_every": 2, "ckpt_every": 2},
        tracking=TRACKED,
        sample_prompts=["The", {"prompt": "Who?", "task": "chat", "max_new_tokens": 4}],
    )
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "trainer_accel.run", "--phase", "pretrain", "--config", str(cfg)],
        cwd=world,
        env=env_without_wandb_credentials(world),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "wandb: offline mode" in r.stderr
    run_id = events(world, "run_start")[0]["run_id"]
    # a point per progress line (every 2 steps): the mean of its steps' losses, as events.jsonl holds them
    steps = {e["step"]: e["train/loss"] for e in events(world, "train")}
    assert sorted(steps) == [1, 2, 3, 4]
    window_means = {2: (steps[1] + steps[2]) / 2, 4: (steps[3] + steps[4]) / 2}
    loss = tb_scalars(world, run_id, "train/loss")
    assert list(loss) == [2, 4] and all(loss[s] == pytest.approx(window_means[s], rel=1e-6) for s in (2, 4))
    assert tb_steps(world, run_id, "val/loss") == [0, 2, 4]
    progress = events(world, "progress")
    assert {e["step"]: e["train/loss"] for e in progress} == window_means
    assert all(k.startswith(("train/", "metrics/")) for e in progress for k in e if "/" in k)  # metric names only
    run, history, config = wandb_run(world, run_id)
    assert run.run_id == run_id and run.display_name == f"pretrain-{run_id}" and list(run.tags) == ["pretrain", "smoke"]
    assert run.run_group == "exp/pre"
    assert sorted(history) == [0, 2, 4] and all(
        history[s]["train/loss"] == pytest.approx(window_means[s]) for s in (2, 4)
    )
    assert history[4]["val/loss"] == pytest.approx(events(world, "eval")[-1]["val/loss"])
    assert {"train_cfg.B", "model_cfg.C", "parameters", "data_fingerprint", "sources.wiki"} <= config
    # samples of the step-2 and step-4 checkpoints: a wandb table each, TensorBoard text
    assert [s for s in history if "samples/_type" in history[s]] == [2, 4]
    assert history[4]["samples/_type"] == "table-file" and history[4]["samples/nrows"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(world / "metrics" / "tensorboard" / f"pretrain-{run_id}"))
    acc.Reload()
    text = [e for e in acc.Tensors("samples/text_summary")]
    assert [e.step for e in text] == [2, 4]
    assert "| 1 | chat | Who? |" in text[-1].tensor_proto.string_val[0].decode()


def test_a_resumed_run_continues_the_same_tracker_history(world):
    cfg = write_config(
        world / "pre.json",
        "pretrain",
        {"total_steps": 6, "ckpt_every": 3, "eval_every": 3, "log_every": 1},
        tracking=TRACKED,
    )
    env = env_without_wandb_credentials(world)
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trainer_accel.run", "--phase", "pretrain", "--config", str(cfg)]
    killed = subprocess.run(
        cmd, cwd=world, env={**env, "TRAINER_FAULT": "before_model:2"}, capture_output=True, timeout=300
    )
    assert killed.returncode == -9  # steps 4-6 were logged, their checkpoint never completed
    r = subprocess.run(cmd, cwd=world, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run_id = events(world, "run_start")[0]["run_id"]
    assert {e["run_id"] for e in events(world)} == {run_id}
    assert tb_steps(world, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]  # purge_step dropped the crashed 4-6
    assert tb_steps(world, run_id, "val/loss") == [0, 3, 6]
    run, history, _ = wandb_run(world, run_id)
    assert run.run_id == run_id  # the same wandb run, resumed
    assert [s for s in history if s > 3] == [4, 5, 6]  # after the resume step, every progress line once


def test_a_tracker_that_fails_is_dropped_with_one_warning_and_the_run_finishes(world):
    """A tracker's failure (here TensorBoard raising as wandb's dead service does, from its third call on) costs
    no training: one warning naming it and the error, every progress line still in events.jsonl and metrics.csv,
    the run's checkpoints and exit as without it."""
    import subprocess
    import sys

    cfg = write_config(
        world / "pre.json",
        "pretrain",
        {"total_steps": 6, "ckpt_every": 3, "eval_every": 3, "log_every": 1},
        tracking={"log_with": ["tensorboard"]},
    )
    r = subprocess.run(
        [sys.executable, "-m", "trainer_accel.run", "--phase", "pretrain", "--config", str(cfg)],
        cwd=world,
        env={**env_without_wandb_credentials(world), "TRAINER_FAULT": "tracker:3:raise"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "tracker tensorboard failed" in line]
    assert len(warned) == 1 and "ConnectionResetError" in warned[0], r.stderr
    assert [e["step"] for e in events(world, "train")] == [1, 2, 3, 4, 5, 6]
    assert (world / "metrics" / "metrics.csv").read_text().count("\n") > 6  # a header and a row per record
    assert events(world, "run_end")[-1]["step"] == 6 and (world / "checkpoints/pretrain/latest").is_dir()
