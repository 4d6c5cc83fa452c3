"""The compare command: a PNG of the runs' losses and a table of their figures."""

from __future__ import annotations

import json

from conftest import events, run_cli, write_config


def test_compare_two_runs(world):
    for sub, lr in (("slow", 1e-3), ("fast", 3e-3)):
        cfg = write_config(world / f"{sub}.json", "pretrain", {"base_lr": lr, "min_lr": lr / 10})
        assert (
            run_cli(
                "run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"TRAINER_ARTIFACTS_DIR": sub}
            ).returncode
            == 0
        )
    r = run_cli("compare", "slow", "fast/metrics/events.jsonl", "--out", "out/cmp.png", cwd=world)
    assert r.returncode == 0, r.stderr
    png = (world / "out/cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(world / "out/cmp.png").shape[:2] == (800, 1200)

    rows = [line.split() for line in r.stdout.splitlines()[2:] if line.strip() and not line.startswith("wrote")]
    assert [row[0] for row in rows] == ["slow", "fast"]
    for row, sub in zip(rows, ("slow", "fast")):
        evals = [e for e in events(world / sub, "eval") if e["step"] > 0]
        best = min(evals, key=lambda e: e["val/loss"])
        assert row[2] == "pretrain" and row[3] == "8" and row[4] == f"{8 * 4 * 32:,}"
        assert row[5] == f"{best['val/loss']:.4f}" and row[6] == str(best["step"])

    # without matplotlib the table still prints (it used to refuse everything); asked for a picture, exit 2
    (world / "nomatplotlib/matplotlib").mkdir(parents=True)
    (world / "nomatplotlib/matplotlib/__init__.py").write_text("raise ImportError('matplotlib is not installed')")
    env = {"PYTHONPATH": str(world / "nomatplotlib")}
    bare = run_cli("compare", "slow", "fast", cwd=world, env=env)
    assert bare.returncode == 0 and bare.stdout.splitlines()[2].split()[0] == "slow", bare.stderr
    assert "no picture (drawing needs matplotlib" in bare.stderr and not (world / "compare.png").exists()
    asked = run_cli("compare", "slow", "fast", "--out", "x.png", cwd=world, env=env)
    assert asked.returncode == 2 and "--out: drawing needs matplotlib" in asked.stderr and "slow" in asked.stdout


def test_compare_names_what_is_missing(world):
    (world / "empty.jsonl").write_text(json.dumps({"event": "run_start", "step": 0}) + "\n")
    r = run_cli("compare", "nowhere", "empty.jsonl", cwd=world)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nowhere: no event log" in r.stderr and "empty.jsonl: holds no training records" in r.stderr
