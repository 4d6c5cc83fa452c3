"""Bad inputs end in one line per problem, exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_MODEL, events, run_cli, write_config


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_missing_caches_are_all_listed(world):
    for name in ("roam_train", "wiki_val"):
        (world / "data/cache/streams" / f"{name}.bin").unlink()
    cfg = write_config(world / "pre.json", "pretrain")
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert_user_error(
        r,
        "data/cache/streams/roam_train.bin: cache missing",
        "data/cache/streams/wiki_val.bin: cache missing",
        "naming convention",
        "{source}_{split}.bin",
        "a source name is 1-64 lowercase letters, digits and _",
    )
    assert not (world / "checkpoints").exists()


def test_sft_with_missing_sft_caches_does_not_fall_back(world):
    shutil.rmtree(world / "data/cache/sft")
    cfg = write_config(world / "sft.json", "sft")
    r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world)
    assert_user_error(
        r, "data/cache/sft/dolly_train.bin: cache missing", "data/cache/sft/oasst1_train.bin: cache missing"
    )


def test_pipeline_checks_sft_caches_before_pretraining(world):
    (world / "data/cache/sft/primer_train.bin").unlink()
    write_config(world / "c/pretrain.json", "pretrain")
    write_config(world / "c/sft.json", "sft")
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    r = run_cli("run", "--phase", "pipeline", "--config", "c/pipeline.json", cwd=world)
    assert_user_error(r, "sft/primer_train.bin: cache missing")
    assert not (world / "checkpoints" / "pretrain").exists()


def test_corrupt_cache_meta_names_the_file(world):
    (world / "data/cache/streams/wiki_train.bin.meta.json").write_text("{oops")
    with open(world / "data/cache/streams/roam_train.bin", "ab") as f:
        f.write(b"\x00")
    cfg = write_config(world / "pre.json", "pretrain")
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert_user_error(r, "wiki_train.bin.meta.json: not valid JSON", "roam_train.bin: ", "bytes, but its meta says")


def test_model_smaller_than_tokenizer_is_refused(world):
    cfg = write_config(world / "pre.json", "pretrain", model_cfg={**TINY_MODEL, "V": 100})
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert_user_error(r, "the tokenizer has 260 tokens, model_cfg.V=100 has rows for 100: set model_cfg.V to 260")


BAD_CONFIGS = [
    ({"train_cfg": {"totl_steps": 5}}, "train_cfg.totl_steps: unknown key (did you mean 'total_steps'?)"),
    ({"train_cfg": {"B": "32"}}, 'train_cfg.B: expected an integer, got "32"'),
    ({"train_cfg": {"B": 0}}, "train_cfg.B: must be a positive integer, got 0"),
    ({"train_cfg": {"base_lr": 1e-4, "min_lr": 1e-3}}, "train_cfg.min_lr: 0.001 is above base_lr 0.0001"),
    ({"train_cfg": {"warmup_steps": 50, "total_steps": 10}}, "train_cfg.warmup_steps: 50 is past total_steps 10"),
    ({"train_cfg": {"T": 64}}, "train_cfg.T: 64 is longer than the model context model_cfg.T=32"),
    ({"sources": {"wiki": 0.5, "roam": 0.2}}, "sources: probabilities must sum to 1, they sum to 0.7"),
    ({"sources": {"wiki": 1.5, "roam": -0.5}}, "sources.roam: probability must be a number >= 0"),
    ({"sources": {"My Books": 1.0}}, "sources.My Books: 'My Books' is not a source name (a source name is 1-64"),
    ({"model_cfg": {**TINY_MODEL, "H": 3}}, "model_cfg.C: width 32 must be divisible by the number of heads H=3"),
    ({"model_cfg": {"V": 260, "T": 32}}, "model_cfg.C: missing"),
    ({"val_source": "wiki/val"}, "val_source: 'wiki/val' is not a source name"),
    ({"lr": 1}, "lr: unknown key"),
    ({"train_cfg": {"keep_last_n": 1}}, "train_cfg.keep_last_n: must be at least 2"),
    ({"train_cfg": {"mixed_precision": "fp8"}}, "train_cfg.mixed_precision: expected"),
]


@pytest.mark.parametrize("patch,message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_config_names_the_key(tmp_path, patch, message):
    from trainer_accel.errors import UserError
    from trainer_accel.phases.registry import load_config

    cfg = {"model_cfg": dict(TINY_MODEL), "train_cfg": {}}
    for k, v in patch.items():
        cfg[k] = {**cfg[k], **v} if k == "train_cfg" else v
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "c.json", "pretrain")
    assert any(message in p for p in e.value.problems), e.value.problems


SFT_AND_PIPELINE = [
    ("sft", {"model_cfg": TINY_MODEL}, "sft_sources: missing"),
    (
        "sft",
        {"model_cfg": TINY_MODEL, "sft_sources": {"dolly": 1.0}, "init_from": 5},
        "init_from: expected a checkpoint path or null",
    ),
    (
        "sft",
        {"model_cfg": TINY_MODEL, "sft_sources": {"qa-set": 1.0}},
        "sft_sources.qa-set: 'qa-set' is not a source name",
    ),
    (
        "pipeline",
        {"pretrain_config_path": "p.json", "sft_cfg_path": "s.json"},
        "sft_cfg_path: unknown key (did you mean 'sft_config_path'?)",
    ),
    (
        "pipeline",
        {"pretrain_config_path": "missing.json", "sft_config_path": "s.json"},
        "missing.json: pretrain config not found",
    ),
    ("pretrain", [1, 2], "expected a JSON object at the top level"),
]


@pytest.mark.parametrize("kind,data,message", SFT_AND_PIPELINE, ids=[m.split(":")[0] for _, _, m in SFT_AND_PIPELINE])
def test_bad_sft_and_pipeline_configs_name_the_key(tmp_path, kind, data, message):
    from trainer_accel.errors import UserError
    from trainer_accel.phases.pipeline import load_pipeline
    from trainer_accel.phases.registry import load_config

    (tmp_path / "s.json").write_text(json.dumps({"model_cfg": TINY_MODEL, "sft_sources": {"dolly": 1.0}}))
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        load_pipeline(tmp_path / "c.json") if kind == "pipeline" else load_config(tmp_path / "c.json", kind)
    assert any(message in p for p in e.value.problems), e.value.problems


def test_cache_hash_checked_on_demand(world):
    f = world / "data/cache/streams/wiki_val.bin"
    data = bytearray(f.read_bytes())
    data[10] ^= 0x01  # same size, different content
    f.write_bytes(bytes(data))
    cfg = write_config(world / "pre.json", "pretrain", {"verify_cache_hash": True, "total_steps": 2, "eval_every": 2})
    assert_user_error(
        run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world),
        "wiki_val.bin: content does not match the sha256 in its meta",
    )


def test_all_config_problems_reported_together_through_the_cli(world):
    (world / "c.json").write_text(
        json.dumps({"model_cfg": {**TINY_MODEL, "L": 0}, "train_cfg": {"B": -1, "seed": "x"}})
    )
    r = run_cli("run", "--phase", "pretrain", "--config", "c.json", cwd=world)
    assert_user_error(
        r,
        "model_cfg.L: must be a positive integer",
        "train_cfg.B: must be a positive integer, got -1",
        "train_cfg.seed: expected an integer",
    )
    (world / "broken.json").write_text('{\n  "model_cfg": }')
    assert_user_error(
        run_cli("run", "--phase", "pretrain", "--config", "broken.json", cwd=world),
        "broken.json: pretrain config is not valid JSON (line 2",
    )
    assert_user_error(
        run_cli("run", "--phase", "pretrain", "--config", "nope.json", cwd=world),
        "nope.json: pretrain config not found",
    )


def test_resume_with_other_model_shape_is_refused(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    wider = write_config(
        world / "wide.json", "pretrain", {"total_steps": 4}, model_cfg={**TINY_MODEL, "C": 64, "d_ff": 128}
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(wider), cwd=world)
    assert_user_error(r, "checkpoint model shape differs from the config (C: 32 vs 64, d_ff: 64 vs 128")
    r = run_cli("run", "--phase", "pretrain", "--config", str(wider), "--resume", "checkpoints/best.pt", cwd=world)
    assert_user_error(r, "best.pt: checkpoint model shape differs")
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--resume", "checkpoints/nothing", cwd=world)
    assert_user_error(r, "checkpoints/nothing: checkpoint not found")


def test_unavailable_device_is_refused(world):
    cfg = write_config(world / "pre.json", "pretrain")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_user_error(
        run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--device", "cuda", cwd=world),
        "--device cuda: CUDA is not available",
    )


def test_diverging_run_stops_without_saving_non_finite_weights(world):
    cfg = write_config(
        world / "pre.json",
        "pretrain",
        {"base_lr": 1e12, "min_lr": 1e11, "log_every": 4, "ckpt_every": 3, "total_steps": 8, "grad_clip": 0.0},
    )
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: training loss is not finite at step" in r.stderr
    import math

    import torch
    from safetensors.torch import load_file

    for d in (world / "checkpoints" / "pretrain").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(d / "model.safetensors")).values()), d
    assert not (world / "checkpoints" / "best.pt").exists()
    recorded = [e["train/loss"] for e in events(world, "train")]
    assert None in recorded and all(math.isfinite(x) for x in recorded[: recorded.index(None)])  # null = not finite


def test_sft_answers_beyond_t_and_token_ids_beyond_v_stop_the_start(world):
    """Answers that all begin after T trained on loss 0 and exported a model that learnt nothing; a cache whose meta
    does not declare its largest id died mid-run with an IndexError. Both are bad input, found before training."""
    import numpy as np

    sft = write_config(world / "sft.json", "sft", model_cfg={**TINY_MODEL, "T": 4})
    for extra in ((), ("--plan",)):
        r = run_cli("run", "--phase", "sft", "--config", str(sft), *extra, cwd=world)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "sft/dolly_train.bin: no example keeps any of its answer within T=4 tokens (all " in r.stdout + r.stderr
        assert "Traceback" not in r.stderr

    cache = world / "data/cache/streams/wiki_train.bin"
    meta_file = cache.with_name(cache.name + ".meta.json")
    meta = json.loads(meta_file.read_text())
    del meta["max_token_id"]  # as a cache written by another tool may be
    meta_file.write_text(json.dumps(meta))
    tokens = np.memmap(cache, dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 300
    tokens.flush()
    del tokens
    pre = write_config(world / "pre.json", "pretrain")
    r = run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == [
        f"error: {cache.relative_to(world)}: holds token id 300, not below model_cfg.V=260"
    ], r.stderr


def test_outputs_that_cannot_be_written_stop_the_start(world):
    """An unwritable checkpoints dir used to train the whole phase and end in a PermissionError traceback; the same
    for the run registry, --result-json, export --out and prepare's caches. (A path under a file cannot be written
    even by root, which the permission bits would not stop.)"""
    (world / "blocker").write_text("a file, not a directory")
    cfg = write_config(world / "pre.json", "pretrain")
    run = ("run", "--phase", "pretrain", "--config", str(cfg))
    r = run_cli(*run, cwd=world, env={"TRAINER_ARTIFACTS_DIR": "blocker/art"})
    assert_user_error(
        r,
        "error: blocker/art/checkpoints: cannot write checkpoints here",
        "error: blocker/art/runs: cannot write the run registry here",
    )
    plan = run_cli(*run, "--plan", cwd=world, env={"TRAINER_RUNS_DIR": "blocker/runs"})
    assert plan.returncode == 2 and "blocker/runs: cannot write the run registry here" in plan.stdout
    (world / "out").mkdir()
    assert_user_error(run_cli(*run, "--result-json", "out", cwd=world), "--result-json out: is a directory")
    assert_user_error(
        run_cli("export", "--checkpoint", "nowhere", "--out", "out", cwd=world), "--out out: is a directory"
    )
    assert_user_error(
        run_cli("prepare", "--demo", cwd=world, env={"TRAINER_DATA_DIR": "blocker/data"}),
        "blocker/data/cache: cannot write caches here",
    )
    assert not list(world.rglob("meta.json")) and not list(world.rglob("events.jsonl"))  # nothing trained


def test_a_failed_background_save_stops_the_run_at_the_next_step(world, monkeypatch, capsys):
    from trainer_accel import run
    from trainer_accel.checkpoints import layout, writing

    real, calls = writing.write_checkpoint, []

    def failing(target, *args, **kwargs):
        calls.append(target.name)
        if target.name == "step_0000008":
            raise OSError(28, "No space left on device")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(writing, "write_checkpoint", failing)
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 40, "ckpt_every": 4, "eval_every": 100})
    assert run.main(["--phase", "pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "writing the checkpoint of step 8 failed (OSError: [Errno 28] No space left" in line[0]
    stopped_at = int(line[0].split("training stopped at step ")[1].split(",")[0])
    assert 8 < stopped_at < 12, line[0]  # before the next save (step 12), not at it or at the end (step 40)
    assert calls == ["step_0000004", "step_0000008"] and "Traceback" not in err
    assert layout.read_meta(world / "checkpoints/pretrain/latest")["step"] == 4  # what was written before is intact
