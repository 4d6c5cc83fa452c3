"""Running experiments: --set overrides, --plan, doctor, run manifests and lineage, the promotion gate, and the
result protocol (exit codes and --result-json)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODEL, run_cli, write_config

from trainer_accel import doctor, export, prepare, run, runs
from trainer_accel.checkpoints.layout import read_meta
from trainer_accel.config import fingerprint
from trainer_accel.devices.hardware import usable_cores
from trainer_accel.errors import UserError
from trainer_accel.overrides import parse_overrides
from trainer_accel.phases.registry import load_config
from trainer_accel.training.progress import Progress


def pipeline_config(world, pretrain_top: dict | None = None, **sft_top):
    write_config(world / "c/pretrain.json", "pretrain", **(pretrain_top or {}))
    write_config(world / "c/sft.json", "sft", **sft_top)
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    return world / "c/pipeline.json"


def setting(plan_text: str, key: str) -> list[str]:
    """(value, origin) of one line of the plan's config table."""
    line = next(line for line in plan_text.splitlines() if line.split()[:1] == [key])
    return line.split()[1:]


def test_overrides_beat_the_file_which_beats_the_defaults(world):
    cfg_path = write_config(world / "pre.json", "pretrain", {"base_lr": 2e-3})
    cfg = load_config(
        cfg_path,
        "pretrain",
        parse_overrides(["train_cfg.base_lr=1e-3", "train_cfg.seed=3", "val_source=roam", 'tracking.tags=["sweep"]']),
    )
    assert (cfg.train.base_lr, cfg.train.seed, cfg.val_source, cfg.tracking.tags) == (1e-3, 3, "roam", ("sweep",))
    assert cfg.train.B == 4 and cfg.train.beta1 == 0.9  # file, default
    assert (
        cfg.provenance["train_cfg.base_lr"],
        cfg.provenance["train_cfg.B"],
        cfg.provenance["train_cfg.beta1"],
        cfg.provenance["val_source"],
    ) == ("override", "file", "default", "override")
    assert cfg.fingerprint == fingerprint(cfg.resolved()) != load_config(cfg_path, "pretrain").fingerprint
    assert json.loads(cfg_path.read_text())["train_cfg"]["base_lr"] == 2e-3  # the file is not touched

    for sets, message in [
        (["train_cfg.bse_lr=1"], "--set train_cfg.bse_lr=1: train_cfg.bse_lr: unknown key (did you mean 'base_lr'?)"),
        (["trian_cfg.B=2"], "config.trian_cfg: unknown key (did you mean 'train_cfg'?)"),
        (["train_cfg.B"], "expected KEY=VALUE"),
        (["train_cfg.B=two"], 'train_cfg.B: expected an integer, got "two" (from --set train_cfg.B=two)'),
    ]:
        with pytest.raises(UserError) as e:
            load_config(cfg_path, "pretrain", parse_overrides(sets))
        assert message in str(e.value)


def test_pipeline_overrides_reach_both_or_one_phase(world, capsys):
    path = pipeline_config(world)
    assert (
        run.main(
            [
                "--phase",
                "pipeline",
                "--config",
                str(path),
                "--plan",
                "--set",
                "train_cfg.seed=5",
                "--set",
                "sft.train_cfg.base_lr=1e-3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    pre, sft = out.split("== sft:")
    assert setting(pre, "train_cfg.seed") == setting(sft, "train_cfg.seed") == ["5", "override"]
    assert setting(pre, "train_cfg.base_lr") == ["0.003", "file"] and setting(sft, "train_cfg.base_lr") == [
        "0.001",
        "override",
    ]
    assert (
        run.main(["--phase", "pretrain", "--config", str(path.parent / "pretrain.json"), "--set", "train_cfg.nope=1"])
        == 2
    )
    assert "train_cfg.nope: unknown key" in capsys.readouterr().err


def test_plan_prints_the_whole_plan_and_writes_nothing(world, capsys):
    cfg = write_config(world / "pre.json", "pretrain", {"keep_last_n": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())  # as a user's process has (the suite runs one thread: conftest.py)
    try:
        assert (
            run.main(["--phase", "pretrain", "--config", str(cfg), "--plan", "--set", "train_cfg.total_steps=12"]) == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert setting(out, "train_cfg.total_steps") == ["12", "override"] and setting(out, "train_cfg.B") == ["4", "file"]
    assert setting(out, "train_cfg.beta2") == ["0.95", "default"]
    for needle in [
        "compute: 1 process(es) on cpu",
        "model: 25,888 parameters",
        "tokens: 128 per step (B=4 x accum_steps=1 x processes=1 x T=32); 12 steps to run = 1.54k tokens",
        "FLOP per step",
        "found    data/cache/streams/wiki_train.bin",
        "data fingerprint: ",
        "3 to write (every 4 steps and at the end); at most 3 kept",
        "start: fresh (random weights)",
        "plan: ok",
        "at an assumed 50% of ",
        "an fp32 matmul peak measured now",
        "per process, a rough upper estimate (weights, gradients, AdamW state 0.4 MiB",
    ]:
        assert needle in out, (needle, out)
    assert not any((world / d).exists() for d in ("checkpoints", "runs", "metrics", "samples"))
    # 12 steps x 128 tokens, by the sources' shares (write_config keeps the configs' 0.784 / 0.196 / 0.02)
    tokens = {
        s: json.loads((world / f"data/cache/streams/{s}_train.bin.meta.json").read_text())["num_tokens"]
        for s in ("wiki", "roam", "primer")
    }
    passes = {s: 12 * 128 * share / tokens[s] for s, share in (("wiki", 0.784), ("roam", 0.196), ("primer", 0.02))}
    line = next(x for x in out.splitlines() if x.startswith("passes over the training caches: "))
    assert line == "passes over the training caches: " + ", ".join(f"{s} {n:.2g}" for s, n in passes.items()), line
    assert "warning:" not in out
    run.main(["--phase", "pretrain", "--config", str(cfg), "--plan", "--set", "train_cfg.total_steps=200000"])
    out = capsys.readouterr().out
    assert "warning: wiki: " in out and "passes over its training cache; the model will have memorised it" in out

    assert run.main(["--phase", "pretrain", "--config", str(cfg)]) == 0  # then it would resume, and says from where
    (world / "data/cache/streams/roam_train.bin").unlink()
    assert run.main(["--phase", "pretrain", "--config", str(cfg), "--plan", "--set", "train_cfg.total_steps=12"]) == 2
    out = capsys.readouterr().out
    assert "start: resume from checkpoints/pretrain/latest at step 8" in out and "4 steps to run" in out
    assert "missing  data/cache/streams/roam_train.bin" in out and "this run would stop at once" in out


def test_doctor_on_a_good_and_a_broken_setup(world, capsys):
    cfg = write_config(world / "pre.json", "pretrain")
    assert doctor.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    for needle in [
        "ok    python",
        "ok    torch",
        "ok    accelerate   ",
        "ok    safetensors",
        "ok    wandb        ",
        "ok    cuda",
        "ok    mps",
        "ok    cache        data/cache/streams/wiki_val.bin",
        "sha256 matches",
        "ok    disk",
        "ok    writable     checkpoints",
        "doctor: 0 failed",
    ]:
        assert needle in out, (needle, out)

    (world / "data/cache/streams/roam_train.bin").unlink()
    (world / "data/cache/sft/dolly_val.bin.meta.json").write_text('{"format": ')
    with open(world / "data/cache/streams/wiki_val.bin", "r+b") as f:  # same size, other bytes: only the hash sees it
        f.write(b"\x01\x00")
    assert doctor.main(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "fail  cache        data/cache/streams/roam_train.bin: missing, needed by" in out
    assert "fail  cache        data/cache/sft/dolly_val.bin.meta.json: not valid JSON" in out
    assert "fail  cache        data/cache/streams/wiki_val.bin: content does not match the sha256" in out
    assert "doctor: 3 failed" in out


def test_pipeline_manifests_lineage_promotion_and_result(world, capsys, monkeypatch):
    """With the user's own sources beside the demo's: a fourth stream and a fourth SFT set under names of their own,
    through prepare, --set, --plan, doctor, training, the gate and lineage."""
    (world / "my notes.md").write_text("".join(f"Note {i}: the zorba eats plums in Kelm.\n\n" for i in range(60)))
    (world / "qa.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Note {i}?", "response": "Plums."}) + "\n" for i in range(20))
    )
    assert prepare.main(["--stream", "my_notes_2=my notes.md", "--sft", "qa_set=qa.jsonl"]) == 0
    path = pipeline_config(
        world,
        {"sources": {"wiki": 0.5, "roam": 0.2, "primer": 0.1, "my_notes_2": 0.2}},
        sft_sources={"dolly": 0.4, "oasst1": 0.3, "primer": 0.1, "qa_set": 0.2},
    )
    free = ["--set", "pretrain.sources.roam=0.1", "--set", "pretrain.sources.my_notes_2=0.3"]
    assert run.main(["--phase", "pipeline", "--config", str(path), "--plan", *free]) == 0
    out = capsys.readouterr().out
    assert "found    data/cache/streams/my_notes_2_train.bin" in out and "found    data/cache/sft/qa_set_val.bin" in out
    assert setting(out, "sources")[-1] == "override", out
    passes = next(x for x in out.splitlines() if x.startswith("passes over the training caches: "))
    assert "my_notes_2 " in passes and "roam " in passes, passes
    assert doctor.main(["--config", str(path)]) == 0
    assert "ok    cache        data/cache/sft/qa_set_train.bin" in capsys.readouterr().out
    assert run.main(["--phase", "pipeline", "--config", str(path), "--result-json", "out/result.json", *free]) == 0
    result = json.loads((world / "out/result.json").read_text())
    assert (result["status"], result["exit_code"], result["final_step"], result["verdict"]) == (
        "completed",
        0,
        8,
        "pass",
    )
    assert result["best_pt"] == str((world / "checkpoints/best.pt").resolve()) and result["failure"] is None
    pre_id, sft_id = result["run_ids"]

    pre_m, sft_m = (json.loads((world / "runs" / i / "run.json").read_text()) for i in (pre_id, sft_id))
    pre_best, sft_best = read_meta(world / "checkpoints/pretrain/best"), read_meta(world / "checkpoints/sft/best")
    for m, best in ((pre_m, pre_best), (sft_m, sft_best)):
        assert (m["status"], m["start_step"], m["final_step"], m["processes"], m["device"]) == (
            "completed",
            0,
            8,
            1,
            "cpu",
        )
        assert m["best_val_loss"] == best["best_val_loss"] and m["best_val_step"] == best["best_val_step"]
        assert m["config_fingerprint"] == fingerprint(m["config"]) == best["config_fingerprint"]
        assert m["data_fingerprint"] == best["data_fingerprint"] and best["run_id"] == m["run_id"]
        assert m["code"]["package"] == "0.1.0" and m["started_at"] <= m["finished_at"]
        assert [c["step"] for c in m["checkpoints"]] == [4, 8]
    assert pre_m["parent"] is None
    assert sft_m["parent"]["run_id"] == pre_id and sft_m["parent"]["relation"] == "initialised"
    assert sft_m["parent"]["data_fingerprint"] == pre_best["data_fingerprint"] != sft_best["data_fingerprint"]

    summary = sft_m["eval_summary"]  # baseline = the pretrain best SFT started from, on every val cache
    assert summary["verdict"] == "pass" and summary["baseline"]["run_id"] == pre_id
    assert {s["name"] for s in summary["sets"]} == {
        "streams/wiki",
        "streams/roam",
        "streams/primer",
        "streams/my_notes_2",
        "sft/dolly",
        "sft/oasst1",
        "sft/primer",
        "sft/qa_set",
    }
    assert sft_m["config"]["sft_sources"]["qa_set"] == 0.2 and pre_m["config"]["sources"]["my_notes_2"] == 0.3
    assert all(s["delta"] == pytest.approx(s["candidate"] - s["baseline"]) for s in summary["sets"])

    assert runs.main(["lineage", "checkpoints/best.pt", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [n["kind"] for n in chain] == ["export", "checkpoint", "run", "checkpoint", "run"]
    assert chain[0]["intact"] and chain[0]["verdict"] == "pass"
    assert (chain[2]["run_id"], chain[4]["run_id"]) == (sft_id, pre_id)
    assert (
        chain[4]["data_fingerprint"] == pre_best["data_fingerprint"] and "streams/wiki_train.bin" in chain[4]["caches"]
    )
    assert runs.main(["show", sft_id[:6]]) == 0 and json.loads(capsys.readouterr().out)["run_id"] == sft_id
    assert runs.main(["list"]) == 0
    table = capsys.readouterr().out
    assert f"{sft_id}  sft       completed  8/8" in table and "pass" in table

    # the gate: only weights with a pass verdict export with --deployable-only; a newer fail verdict wins
    assert export.main(["--checkpoint", "checkpoints/sft/best", "--out", "dep.pt", "--deployable-only"]) == 0
    assert export.main(["--checkpoint", "dep.pt", "--out", "dep2.pt", "--deployable-only"]) == 0  # via its record
    assert export.main(["--checkpoint", "checkpoints/pretrain/best", "--out", "x.pt", "--deployable-only"]) == 2
    assert "not deployable: never evaluated" in capsys.readouterr().err
    assert runs.main(["evaluate", "checkpoints/sft/best", "--baseline", "checkpoints/sft/best"]) == 1
    assert "verdict: fail" in capsys.readouterr().out
    assert export.main(["--checkpoint", "checkpoints/sft/best", "--out", "x.pt", "--deployable-only"]) == 2
    err = capsys.readouterr().err
    assert "not deployable: verdict fail (sft/dolly: SFT val loss did not improve" in err and "sft/dolly +0.0000" in err
    assert not (world / "x.pt").exists()

    # the baseline must be the model SFT started from: another one passes nothing, another shape is not compared
    pre_dir = world / "checkpoints/pretrain"
    other = next(d for d in pre_dir.glob("step_*") if read_meta(d)["step"] != pre_best["step"])
    assert runs.main(["evaluate", "checkpoints/sft/best", "--baseline", str(other), "--tolerance", "100"]) == 1
    out = capsys.readouterr().out
    assert (
        "verdict: pass" in out and f"NOT DEPLOYABLE whatever the verdict: the baseline {other.resolve()} is not" in out
    )
    assert export.main(["--checkpoint", "checkpoints/sft/best", "--out", "x.pt", "--deployable-only"]) == 2
    assert "not deployable: its pass was against another model" in capsys.readouterr().err
    assert (
        runs.main(["evaluate", "checkpoints/sft/best", "--baseline", "checkpoints/pretrain/best", "--tolerance", "-1"])
        == 2
    )
    assert "--tolerance: expected a number >= 0" in capsys.readouterr().err
    wide = write_config(world / "wide.json", "pretrain", {"total_steps": 2}, model_cfg={**TINY_MODEL, "C": 48})
    monkeypatch.setenv("TRAINER_ARTIFACTS_DIR", "wide")
    assert run.main(["--phase", "pretrain", "--config", str(wide)]) == 0
    monkeypatch.delenv("TRAINER_ARTIFACTS_DIR")
    assert runs.main(["evaluate", "checkpoints/sft/best", "--baseline", "wide/checkpoints/pretrain/best"]) == 2
    assert "cannot be compared with checkpoints/sft/best: the models differ (C: 48 vs 32" in capsys.readouterr().err
    assert runs.main(["evaluate", "checkpoints/sft/best", "--baseline", "checkpoints/pretrain/best"]) == 0
    assert export.main(["--checkpoint", "checkpoints/sft/best", "--out", "x.pt", "--deployable-only"]) == 0

    # a later run of another phase replaces best.pt; the deployable SFT export is kept, per phase and as deployable
    ck = world / "checkpoints"
    assert run.main(["--phase", "pretrain", "--config", str(world / "c/pretrain.json")]) == 0
    assert json.loads((ck / "best.pt.json").read_text())["phase"] == "pretrain"
    assert (ck / "best.pt").samefile(ck / "best.pretrain.pt")
    assert (ck / "best.sft.pt").samefile(ck / "best.deployable.pt")
    kept = json.loads((ck / "best.deployable.pt.json").read_text())
    assert (kept["phase"], kept["verdict"], kept["run_id"]) == ("sft", "pass", sft_id)
    assert torch.load(ck / "best.deployable.pt", weights_only=True)["step"] == sft_best["step"]
    capsys.readouterr()
    assert export.main(["--checkpoint", str(ck / "best.deployable.pt"), "--out", "back.pt", "--deployable-only"]) == 0


def test_exit_codes_and_result_for_bad_input_and_a_crash(world, monkeypatch):
    cfg = write_config(world / "pre.json", "pretrain")
    bad = run_cli(
        "run",
        "--phase",
        "pretrain",
        "--config",
        str(cfg),
        "--set",
        "train_cfg.B=0",
        "--result-json",
        "r.json",
        cwd=world,
    )
    result = json.loads((world / "r.json").read_text())
    assert bad.returncode == 2 and (result["status"], result["exit_code"]) == ("bad_input", 2)
    assert "train_cfg.B: must be a positive integer, got 0 (from --set train_cfg.B=0)" in result["failure"]
    assert result["run_ids"] == [] and not (world / "checkpoints").exists()

    (world / "checkpoints").mkdir()
    (world / "checkpoints/pretrain").write_text("a file where the phase's folder belongs")  # found at start
    blocked = run_cli("run", "--phase", "pretrain", "--config", str(cfg), "--result-json", "r.json", cwd=world)
    assert blocked.returncode == 2 and "a file where the pretrain checkpoints folder belongs" in blocked.stderr
    assert json.loads((world / "r.json").read_text())["status"] == "bad_input"
    (world / "checkpoints/pretrain").unlink()

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the progress line")

    monkeypatch.setattr(Progress, "train_lines", bug)  # a bug-like failure keeps its traceback and exit 1
    with pytest.raises(RuntimeError, match="a bug in the progress line"):
        run.main(["--phase", "pretrain", "--config", str(cfg), "--result-json", "r.json"])
    result = json.loads((world / "r.json").read_text())
    assert (result["status"], result["exit_code"], result["final_step"]) == ("failed", 1, 2)
    assert result["failure"] == "RuntimeError: a bug in the progress line"
    manifest = json.loads((world / "runs" / result["run_ids"][0] / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["failure"] == result["failure"]


def test_the_gate_fails_a_set_it_could_not_measure():
    """An SFT val set whose eval batches hold no answer tokens (dolly at T=32) used to drop out of the summary,
    and the verdict was `pass` for a source never measured."""
    from trainer_accel.experiments.evaluation import compare_set
    from trainer_accel.phases.sft import promotion_gate as verdict

    dolly = compare_set("sft/dolly", [(0.0, 0), (0.0, 0)], [(0.0, 0), (0.0, 0)])
    primer = compare_set("sft/primer", [(20.0, 10), (22.0, 10)], [(10.0, 10), (11.0, 10)])
    wiki = compare_set("streams/wiki", [(5.0, 10), (5.0, 10)], [(5.0, 10), (5.0, 10)])
    assert dolly["measured"] is False and primer["measured"] and primer["delta"] == pytest.approx(-1.05)
    result, reasons = verdict([dolly, primer, wiki], tolerance=0.1, min_improvement=0.001)
    assert result == "fail" and reasons == [
        "sft/dolly: not measured (its 2 eval batches hold no counted tokens), so nothing shows what SFT did to it"
    ]
    infinite = compare_set("sft/oasst1", [(float("inf"), 10)], [(1.0, 10)])
    assert infinite["measured"] is False and "not finite" in infinite["why"]


@pytest.mark.parametrize(
    "candidate, floor, passes",
    [
        ([(9.99999, 10), (9.99999, 10)], 0.001, False),  # a delta of -1e-6: a real change, far too small to matter
        ([(8.0, 10), (11.9, 10)], 0.0, False),  # -0.005 on average, but the batches disagree: within the noise
        ([(9.0, 10), (9.1, 10)], 0.001, True),  # -0.095, and every batch agrees
    ],
)
def test_the_gate_tells_an_improvement_from_noise(candidate, floor, passes):
    from trainer_accel.experiments.evaluation import compare_set
    from trainer_accel.phases.sft import needed_improvement
    from trainer_accel.phases.sft import promotion_gate as verdict

    s = compare_set("sft/primer", [(10.0, 10), (10.0, 10)], candidate)
    assert s["stderr"] is not None and needed_improvement(s, floor) == max(floor, 2 * s["stderr"])
    result, reasons = verdict([s], tolerance=0.1, min_improvement=floor)
    assert (result == "pass") is passes, reasons
    if not passes:
        assert reasons[0].startswith("sft/primer: SFT val loss did not improve by more than")


def test_runs_evaluate_prints_what_an_improvement_needed_and_fails_a_negligible_one(world):
    pre = write_config(world / "c/pretrain.json", "pretrain", {"total_steps": 4})
    assert run_cli("run", "--phase", "pretrain", "--config", str(pre), cwd=world).returncode == 0
    sft = write_config(
        world / "c/sft.json",
        "sft",
        {"total_steps": 4, "base_lr": 1e-9, "min_lr": 1e-9},
        init_from="checkpoints/pretrain/best",
    )
    assert run_cli("run", "--phase", "sft", "--config", str(sft), cwd=world).returncode == 0
    args = ("runs", "evaluate", "checkpoints/sft/best", "--baseline", "checkpoints/pretrain/best")
    r = run_cli(*args, cwd=world)
    assert r.returncode == 1 and "needed" in r.stdout.splitlines()[0], r.stdout + r.stderr
    assert "SFT val loss did not improve by more than 0.001" in r.stdout, r.stdout
    r = run_cli(*args, "--min-improvement", "-1", cwd=world)
    assert r.returncode == 2 and "--min-improvement: expected a number >= 0" in r.stderr, r.stderr
