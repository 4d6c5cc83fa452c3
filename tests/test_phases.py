"""Phases that describe themselves: a new way of training is one module, found by the registry, and runs through
`python -m trainer_accel.run --phase NAME` with a checkpoint, a resume and an export, touching no package file.

The phase here lives outside the package, as a user's or another package's would: a module and the entry point
an installed package declares (`[project.entry-points."trainer_accel.phases"]`), written as pip writes it (a
.dist-info folder beside the module on the path). It is a pretraining variant that weights every row alike (each
row's mean token loss, rows averaged), computed from the model's per-token log-probabilities, and it logs a metric
of its own, so the seams a preference phase needs (per-sequence reduction, a weight that is not a token count,
phase metrics in the records) are exercised end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import events, run_cli, write_config

PLUGIN = '''
"""A pretrain variant: every row weighs the same, whatever its number of counted targets."""

import torch

from trainer_accel.phases.phase import Phase
from trainer_accel.phases.pretrain import PRETRAIN
from trainer_accel.training.losses import LossOut, sequence_logprobs


def rows_weight(batch):
    return ((batch.y_masked != -100).sum(dim=1) > 0).sum()


def rows_alike(model, batch):
    logp, n = sequence_logprobs(model, batch)  # (B,) summed log-probabilities and counted targets per row
    per_row = torch.where(n > 0, -logp / n.clamp_min(1), torch.zeros_like(logp))
    return LossOut(per_row.sum(), rows_weight(batch), {"row_tokens": n.sum().float()})


ROWS_ALIKE = Phase(
    name="rows_alike",
    title="rows-alike pretrain",
    stage_id=0,
    keys=PRETRAIN.keys,
    loss=rows_alike,
    weight=rows_weight,
    doc="token streams, each row's mean token loss, rows weighed alike",
)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine where a package declaring the phase is installed."""
    site = tmp_path_factory.mktemp("site")
    (site / "rows_alike_phase.py").write_text(PLUGIN)
    info = site / "rows_alike_phase-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rows-alike-phase\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trainer_accel.phases]\nrows_alike = rows_alike_phase:ROWS_ALIKE\n")
    return {"PYTHONPATH": str(site)}


def run(world: Path, env: dict, *args: str):
    return run_cli("run", *args, cwd=world, env=env)


def test_a_phase_from_one_outside_module_trains_resumes_and_exports(world, plugin):
    train = {"total_steps": 4, "eval_every": 2, "ckpt_every": 2, "log_every": 1}
    whole = write_config(world / "whole.json", "pretrain", train)
    r = run(world, plugin, "--phase", "rows_alike", "--config", str(whole))
    assert r.returncode == 0, r.stderr
    ckpts = world / "checkpoints" / "rows_alike"
    meta = json.loads((ckpts / "latest" / "meta.json").read_text())
    assert (meta["phase"], meta["step"]) == ("rows_alike", 4)
    whole_state = (ckpts / "latest" / "model.safetensors").read_bytes()
    train_events = [e for e in events(world, "train") if e["phase"] == "rows_alike"]
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    # the phase's own metric is in the records, divided by the step's weight (rows): the mean counted targets of
    # a row, every target of a T=32 stream window
    assert all(e["train/row_tokens"] == pytest.approx(32.0) for e in train_events)
    evals = [e for e in events(world, "eval") if e["phase"] == "rows_alike"]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["val/row_tokens"] == pytest.approx(32.0) for e in evals)
    # the loss the loop logged is the phase's: at step 1 each row's mean equals the token mean, the windows being
    # all counted, so it is the pretrain loss of the same weights and batch
    assert train_events[0]["train/loss"] == pytest.approx(run_pretrain_first_loss(world, whole), rel=1e-5)

    # stopped after step 2 and resumed: the same weights, to the bit
    (world / "checkpoints").rename(world / "checkpoints.whole")
    half = write_config(world / "half.json", "pretrain", {**train, "total_steps": 2})
    assert run(world, plugin, "--phase", "rows_alike", "--config", str(half)).returncode == 0
    r = run(world, plugin, "--phase", "rows_alike", "--config", str(whole))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert (ckpts / "latest" / "model.safetensors").read_bytes() == whole_state

    # exported as every phase is: best.pt, and a Hugging Face directory that transformers reads
    r = run_cli("export", "--checkpoint", str(ckpts / "best"), cwd=world, env=plugin)
    assert r.returncode == 0, r.stderr
    blob = torch.load(world / "checkpoints" / "best.pt", weights_only=True)
    assert sorted(blob) == sorted(["model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss"])
    r = run_cli("export", "--checkpoint", str(ckpts / "best"), "--format", "hf", cwd=world, env=plugin)
    assert r.returncode == 0, r.stderr
    assert (world / "checkpoints" / "hf" / "config.json").is_file()
    record = json.loads((world / "checkpoints" / "hf" / "trainer_accel_export.json").read_text())
    assert record["phase"] == "rows_alike"


def run_pretrain_first_loss(world: Path, cfg: Path) -> float:
    """Step 1's loss of the built-in pretrain phase on the same config, in a world of its own."""
    env = {"TRAINER_ARTIFACTS_DIR": str(world / "pretrain-world")}
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env=env).returncode == 0
    rows = [
        json.loads(line) for line in (world / "pretrain-world" / "metrics" / "events.jsonl").read_text().splitlines()
    ]
    return next(e["train/loss"] for e in rows if e.get("event") == "train" and e["step"] == 1)


def test_a_pipeline_lists_three_phases_each_from_the_one_before(world, plugin):
    """pretrain, the outside phase continuing it, then SFT from that one's best, with its gate; run again, the
    pipeline continues where it stopped (here: it has finished, so it trains nothing and exports again)."""
    c = world / "c"
    write_config(c / "pretrain.json", "pretrain", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    write_config(c / "more.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    write_config(c / "sft.json", "sft", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    steps = [("pretrain", "pretrain.json"), ("rows_alike", "more.json"), ("sft", "sft.json")]
    (c / "pipeline.json").write_text(json.dumps({"phases": [{"phase": p, "config_path": f} for p, f in steps]}))
    r = run(world, plugin, "--phase", "pipeline", "--config", str(c / "pipeline.json"))
    assert r.returncode == 0, r.stderr
    more = json.loads((world / "checkpoints/rows_alike/latest/meta.json").read_text())
    sft = json.loads((world / "checkpoints/sft/latest/meta.json").read_text())
    assert more["parent"]["checkpoint"] == str((world / "checkpoints/pretrain/best").resolve())
    assert sft["parent"]["checkpoint"] == str((world / "checkpoints/rows_alike/best").resolve())
    assert "verdict:" in r.stderr  # SFT's gate ran, against the rows_alike best it started from

    r = run(world, plugin, "--phase", "pipeline", "--config", str(c / "pipeline.json"))
    assert r.returncode == 0, r.stderr
    assert "pipeline: rows_alike already finished; continuing with SFT" in r.stderr


def test_a_three_phase_pipeline_killed_in_its_second_phase_resumes_there_and_ends_as_if_never_stopped(world, plugin):
    """SIGKILLed while its second phase writes its step-4 checkpoint (the step-2 one complete): run again, it
    skips the finished pretrain, resumes the second phase from step 2, then runs SFT; the final SFT weights equal
    those of a pipeline never stopped, to the bit."""
    c = world / "c"
    write_config(c / "pretrain.json", "pretrain", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    write_config(c / "more.json", "pretrain", {"total_steps": 4, "eval_every": 2, "ckpt_every": 2})
    write_config(c / "sft.json", "sft", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    steps = [("pretrain", "pretrain.json"), ("rows_alike", "more.json"), ("sft", "sft.json")]
    (c / "pipeline.json").write_text(json.dumps({"phases": [{"phase": p, "config_path": f} for p, f in steps]}))
    args = ("--phase", "pipeline", "--config", str(c / "pipeline.json"))
    whole = {**plugin, "TRAINER_ARTIFACTS_DIR": str(world / "whole")}
    assert run(world, whole, *args).returncode == 0
    killed = run(world, {**plugin, "TRAINER_FAULT": "after_meta:4"}, *args)  # pretrain saved twice, then step 2
    assert killed.returncode == -9, killed.stderr
    assert json.loads((world / "checkpoints/rows_alike/latest/meta.json").read_text())["step"] == 2
    assert not (world / "checkpoints/sft").exists() or not any((world / "checkpoints/sft").iterdir())
    r = run(world, plugin, *args)
    assert r.returncode == 0, r.stderr
    assert "pipeline: pretrain already finished; continuing with rows-alike pretrain" in r.stderr
    assert "resumed from" in r.stderr
    final = "checkpoints/sft/latest/model.safetensors"
    assert (world / final).read_bytes() == (world / "whole" / final).read_bytes()


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ({"phases": []}, "phases: expected a non-empty list"),
        (
            {"phases": [{"phase": "pretrian", "config_path": "p.json"}]},
            "phases[0].phase: expected one of pretrain, sft",
        ),
        (
            {"phases": [{"phase": "pretrain", "config_path": "p.json"}] * 2},
            "phases[1].phase: pretrain is listed twice",
        ),
        ({"phases": [{"phase": "sft"}]}, "phases[0].config_path: expected the path of a config file, got null"),
        (
            {"phases": [{"phase": "sft", "config": "s.json"}]},
            "phases[0].config: unknown key (did you mean 'config_path'?)",
        ),
    ],
)
def test_a_bad_pipeline_list_is_named_in_one_line(world, pipeline, message):
    (world / "p.json").write_text(json.dumps(pipeline))
    r = run_cli("run", "--phase", "pipeline", "--config", str(world / "p.json"), "--plan", cwd=world)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_the_two_key_pipeline_and_its_list_form_train_the_same(world):
    c = world / "c"
    write_config(c / "pretrain.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    write_config(c / "sft.json", "sft", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    (c / "two.json").write_text(json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"}))
    listed = [{"phase": "pretrain", "config_path": "pretrain.json"}, {"phase": "sft", "config_path": "sft.json"}]
    (c / "list.json").write_text(json.dumps({"phases": listed}))
    weights = {}
    for name in ("two", "list"):
        env = {"TRAINER_ARTIFACTS_DIR": str(world / name)}
        r = run_cli("run", "--phase", "pipeline", "--config", str(c / f"{name}.json"), cwd=world, env=env)
        assert r.returncode == 0, r.stderr
        weights[name] = (world / name / "checkpoints/sft/latest/model.safetensors").read_bytes()
    assert weights["two"] == weights["list"]


@pytest.mark.parametrize(
    "module, target, message",
    [
        ("", "no_such_module:PHASE", "cannot be loaded (ModuleNotFoundError"),
        ("PHASE = 3\n", "odd_phase:PHASE", "is a int, not a trainer_accel.phases.phase.Phase"),
        (
            "from trainer_accel.phases.pretrain import PRETRAIN\nimport dataclasses\n"
            "PHASE = dataclasses.replace(PRETRAIN, name='train_cfg')\n",
            "odd_phase:PHASE",
            "name 'train_cfg' is not a usable phase name",
        ),
        (
            "from trainer_accel.phases.sft import SFT as PHASE\n",
            "odd_phase:PHASE",
            "a phase named 'sft' exists already",
        ),
    ],
)
def test_a_bad_phase_entry_point_is_one_line(world, tmp_path, module, target, message):
    site = tmp_path / "site"
    info = site / "odd-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "odd_phase.py").write_text(module)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: odd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[trainer_accel.phases]\nodd = {target}\n")
    cfg = write_config(world / "c.json", "pretrain")
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"PYTHONPATH": str(site)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: entry point odd = {target}") and message in last, last


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_the_model_gives_per_token_logprobs_in_chunks(chunk):
    """The per-token log-probabilities of given targets equal log_softmax of the logits at them, whatever the
    chunk (a large vocabulary's logits never exist whole); their negative sum is the summed cross-entropy, which
    the token phases take from the fused path unchanged; gradients through either agree."""
    from trainer_accel.config import ModelConfig
    from trainer_accel.models.build import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(V=97, T=16, C=32, L=2, H=4, d_ff=64))
    model.loss_chunk = chunk
    x = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100
    per_token = model(x, targets=targets, reduction="none")
    logits = model(x).log_softmax(-1)
    want = logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0].masked_fill(targets == -100, 0.0)
    assert per_token.shape == (3, 16)
    torch.testing.assert_close(per_token, want, rtol=1e-5, atol=1e-5)
    # what a sequence-level loss reduces: each row's summed log-probability and its counted targets
    from trainer_accel.training.batches import Batch
    from trainer_accel.training.losses import sequence_logprobs

    row_logp, row_n = sequence_logprobs(model, Batch(x, targets, targets))
    assert row_n.tolist() == [11, 16, 16]
    torch.testing.assert_close(row_logp, want.sum(dim=1), rtol=1e-5, atol=1e-4)
    summed = model(x, targets=targets)
    torch.testing.assert_close(-per_token.sum(), summed, rtol=1e-5, atol=1e-4)
    (-per_token.sum()).backward()
    by_token = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    summed.backward()
    for a, p in zip(by_token, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_one_place_builds_a_model_and_phase_names_live_in_their_modules():
    """`GPT(` is called by models/build.py alone; a phase's name appears as a string only in its own module and
    the registry (paths.py names the cache kinds, one of which is spelt like SFT's name; the demo writes its SFT
    files in a folder of that name; tools/ run the built-in phases by name, as a user's script would)."""
    import ast

    root = Path(__file__).resolve().parent.parent / "trainer_accel"
    builders, named = [], []
    allowed = {"phases", "tools"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GPT" and str(rel) != "models/build.py":
                builders.append(f"{rel}:{node.lineno}")
            if (
                isinstance(node, ast.Constant)
                and node.value in ("pretrain", "sft")
                and rel.parts[0] not in allowed
                and str(rel) not in ("paths.py", "data/demo.py")
            ):
                named.append(f"{rel}:{node.lineno}")
    assert not builders, builders
    assert not named, named


def test_plan_refuses_a_resume_from_another_phase_as_the_run_does(world):
    """--plan finds the resume point by the run's own rule (training/start.resume_point): a pretrain checkpoint
    named as --resume of SFT is refused by both, with the same line."""
    pre = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world).returncode == 0
    sft = write_config(world / "sft.json", "sft", {"total_steps": 2})
    args = ("--phase", "sft", "--config", str(sft), "--resume", str(world / "checkpoints/pretrain/latest"))
    plan, ran = run_cli("run", *args, "--plan", cwd=world), run_cli("run", *args, cwd=world)
    line = (
        "a pretrain checkpoint cannot resume the sft phase; set init_from in the sft config to start from its weights"
    )
    assert plan.returncode == ran.returncode == 2
    assert line in plan.stdout + plan.stderr and line in ran.stderr
