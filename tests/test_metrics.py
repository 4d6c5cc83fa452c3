"""The run's records: canonical names, the JSONL and CSV sinks, and one continuous history across a resume."""

from __future__ import annotations

import csv
import json
from collections import Counter

from conftest import events, run_cli, write_config

from trainer_accel.observability.metrics import CsvSink, MetricsLog, canonical


def test_aliases_fold_into_canonical_names():
    got = canonical(
        {
            "loss": 1.0,
            "train_loss": 1.5,
            "lr": 2.0,
            "learning_rate": 3.0,
            "train_lr": 4.0,
            "val/loss": 5.0,
            "answer_tokens": 6,
            "g": float("nan"),
        },
        "sft",
    )
    assert got == {"train/loss": 1.5, "train/lr": 4.0, "val/loss": 5.0, "sft/answer_tokens": 6, "sft/g": None}


def test_csv_gains_columns_without_losing_rows(tmp_path):
    log = MetricsLog([CsvSink(tmp_path / "m.csv")], "pretrain", "r1", 0)
    log.write("train", 1, **{"train/loss": 2.5})
    log.write("checkpoint", 1, path="x")  # not a metric record: not in the CSV
    log.write("eval", 2, **{"val/loss": 2.0})
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["event", "step", "phase", "run_id", "time", "train/loss", "metrics/stage_id", "val/loss"]
    assert [(r["event"], r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("train", "1", "2.5", ""),
        ("eval", "2", "", "2.0"),
    ]
    assert CsvSink(tmp_path / "m.csv").columns == list(rows[0])  # a reopened sink keeps the header


def test_history_is_continuous_across_a_crash_and_resume(world):
    """Killed while saving step 6 (steps 4-6 already logged), resumed at step 3: every step once in each sink."""
    cfg = write_config(
        world / "pre.json", "pretrain", {"total_steps": 9, "ckpt_every": 3, "eval_every": 3, "log_every": 1}
    )
    killed = run_cli(
        "run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"TRAINER_FAULT": "before_model:2"}
    )
    assert killed.returncode == -9
    assert [e["step"] for e in events(world, "train")] == [1, 2, 3, 4, 5, 6]
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 0, r.stderr

    recs = events(world)
    assert [e["step"] for e in recs if e["event"] == "train"] == list(range(1, 10))
    assert [e["step"] for e in recs if e["event"] == "eval"] == [0, 3, 6, 9]
    resume = [e for e in recs if e["event"] == "resume"]
    assert [e["step"] for e in recs if e["event"] == "progress"] == list(range(1, 10))  # log_every 1
    assert (
        len(resume) == 1 and resume[0]["step"] == 3 and resume[0]["superseded"] == 7
    )  # steps 4-6, their progress, eval 6
    assert len({e["run_id"] for e in recs}) == 1
    for e in recs:
        assert {"event", "step", "phase", "run_id", "time"} <= set(e)
    train = [e for e in recs if e["event"] == "train"]
    assert all(
        e["metrics/stage_id"] == 0 and e["train/lr"] > 0 and e["train/tokens_seen"] == e["step"] * 4 * 32 for e in train
    )

    with open(world / "metrics" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert Counter((r["event"], r["step"]) for r in rows) == Counter(
        [("train", str(s)) for s in range(1, 10)] + [("eval", str(s)) for s in (0, 3, 6, 9)]
    )


def test_failure_is_recorded(world):
    cfg = write_config(
        world / "pre.json", "pretrain", {"base_lr": 1e12, "min_lr": 1e11, "grad_clip": 0.0, "log_every": 2}
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 1
    failure = events(world, "failure")
    assert len(failure) == 1 and "FloatingPointError: training loss is not finite" in failure[0]["error"]


def test_plain_progress_lines_when_not_on_a_terminal(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 4, "log_every": 2})
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 0
    lines = [line for line in r.stderr.splitlines() if "| lr " in line]
    assert len(lines) == 2 and "pretrain step 2/4 | lr" in lines[0] and "tok/s" in lines[1]


def test_torn_last_line_of_a_killed_writer_is_dropped_on_resume(tmp_path):
    from trainer_accel.observability.metrics import JsonlSink, read_events

    path = tmp_path / "events.jsonl"
    path.write_text(
        json.dumps({"event": "train", "step": 1, "phase": "pretrain", "run_id": "r"})
        + "\n"
        + json.dumps({"event": "train", "step": 2, "phase": "pretrain", "run_id": "r"})
        + "\n"
        + '{"event": "tra'
    )
    assert [e["step"] for e in read_events(path)] == [1, 2]  # a reader before the resume (compare) skips it too
    sink = JsonlSink(path)
    assert sink.supersede_after("r", "pretrain", 1) == 2
    sink.close()
    assert [e["step"] for e in read_events(path)] == [1]
