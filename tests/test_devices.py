"""Launch files, start-up warnings, FSDP checkpoint state, memory-mapped caches and the bench command."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, run_cli, write_config
from test_device_paths import needs_cpu_fsdp2

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILES = ["cpu.yaml", "cpu_2proc.yaml", "mps.yaml", "gpu_bf16.yaml", "ddp.yaml", "fsdp.yaml", "multi_node.yaml"]


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_files_load_and_are_documented(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch" / name))  # Accelerate's own parser: unknown keys are errors
    header = (ROOT / "launch" / name).read_text().split("\n")
    assert header[0].startswith("# ") and any(
        f"--config_file launch/{name}" in line for line in header if line.startswith("#")
    )
    assert f"--config_file launch/{name}" in (ROOT / "docs" / "devices.md").read_text()
    expected = {
        "fsdp.yaml": "FSDP",
        "ddp.yaml": "MULTI_GPU",
        "multi_node.yaml": "MULTI_GPU",
        "cpu_2proc.yaml": "MULTI_GPU",
    }
    assert cfg.distributed_type.value == expected.get(name, "NO")
    if name == "multi_node.yaml":
        assert cfg.num_machines == 2 and cfg.main_process_ip and cfg.main_process_port
    if name in ("gpu_bf16.yaml", "ddp.yaml", "fsdp.yaml"):
        assert cfg.mixed_precision == "bf16"


def test_start_up_warnings(monkeypatch):
    from trainer_accel.devices import hardware

    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    monkeypatch.setattr(hardware, "usable_cores", lambda: 8)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    try:
        torch.set_num_threads(1)
        lone = hardware.compute_warnings(cpu, "no", processes=1)
        assert len(lone) == 1 and "1 CPU thread of 8 cores" in lone[0] and "launch/cpu.yaml" in lone[0]
        torch.set_num_threads(8)
        assert hardware.compute_warnings(cpu, "no", processes=1) == []
        bf16 = hardware.compute_warnings(cpu, "bf16", processes=1)
        assert len(bf16) == 1 and "without bf16 instructions" in bf16[0] and "mixed_precision" in bf16[0]
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
        assert hardware.compute_warnings(cpu, "bf16", processes=1) == []
        assert hardware.compute_warnings(torch.device("cuda"), "bf16", processes=1) == []
    finally:
        torch.set_num_threads(threads)


def test_run_logs_its_compute_plan_and_warns_about_one_thread(world):
    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "eval_every": 2, "ckpt_every": 2})
    r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "compute: 1 process(es) on cpu, precision no, 1 CPU threads per process" in r.stderr
    from trainer_accel.devices.hardware import usable_cores

    assert ("trains on 1 CPU thread" in r.stderr) == (usable_cores() > 1)


@needs_cpu_fsdp2
def test_fsdp_sharded_optimizer_state_round_trips_to_the_checkpoint_form(world):
    """FSDP2 on 2 gloo CPU processes (torch's own launcher: Accelerate runs FSDP on GPUs only)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(ROOT / "tests" / "fsdp_state_roundtrip.py"),
        ],
        cwd=world,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "FSDP STATE ROUNDTRIP OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_caches_are_unmapped_after_each_batch(world):
    """A map kept open would hold every page it touched in resident memory; no map outlives a batch."""
    from trainer_accel.data.cache import open_cache, stream_rows

    path = world / "data/cache/streams/wiki_train.bin"
    cache = open_cache(path, "stream")
    rows = stream_rows([cache], np.ones(1), np.random.default_rng(0), 8, 16)
    assert rows.shape == (8, 17)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path.resolve()) not in maps.read_text()


def test_bench_prints_and_writes_every_figure(world):
    cfg = write_config(world / "bench.json", "pretrain", {"log_every": 2, "eval_batches": 1})
    out = world / "figures.json"
    r = run_cli("bench", "--config", str(cfg), "--windows", "2", "--json", str(out), cwd=world)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(out.read_text())
    for loop in ("plain loop", "trainer"):
        f = figures[loop]
        assert f["ms_per_step"] > 0 and f["tokens_per_sec"] > 0 and 0 < f["mfu"] and f["peak_memory"] > 0
        assert f["eval_s"] > 0 and len(f["alone_window_ms"]) == 2
    # paired windows after the warm-up one: on CPU the plain loop ran one step per trainer step inside each,
    # with a matmul peak measured in each
    windows = figures["windows"]
    assert len(windows) == 2 and all(w["steps"] == w["plain_steps"] == 2 for w in windows)
    assert all(w["trainer_ms"] > 0 and w["plain_ms"] > 0 and w["peak_flops"] > 0 for w in windows)
    assert figures["ratio"] == pytest.approx(statistics.median(w["ratio"] for w in windows))
    assert figures["peak_flops"] > 0 and figures["sampling_tokens_per_sec"] > 0
    t = figures["trainer"]
    assert t["save_s"] > 0 and t["save_durable_s"] > 0 and t["load_s"] > 0 and t["torch_save_s"] > 0
    for line in (
        "trainer / plain step time <= 1.02",
        "checkpoint save",
        "checkpoint load",
        "data sampling",
        "peak memory",
        "MFU",
    ):
        assert line in r.stdout
    assert "ms/step" in r.stdout and "tokens/s" in r.stdout


def test_bench_window_interleave_pairs_each_window_with_as_many_plain_steps(world):
    """A GPU's default pairing, run on CPU: the plain loop runs one window's worth of steps inside each window."""
    from trainer_accel.tools import bench

    cfg = write_config(world / "bench.json", "pretrain", {"log_every": 4, "eval_batches": 1})
    job = bench.Job(str(cfg), "pretrain", "cpu", "cpu", 2, str(world / "data"), str(world / "paired"), "window")
    out = bench.in_fresh_process(bench.paired_run, job)
    windows = out["windows"]
    assert len(windows) == 2 and all(w["steps"] == w["plain_steps"] == 4 for w in windows)
    assert all(w["trainer_ms"] > 0 and w["plain_ms"] > 0 and w["peak_flops"] > 0 for w in windows)
    assert out["eval_s"]["trainer"] > 0 and out["eval_s"]["plain"] > 0


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_one_default_device_rule_for_run_bench_and_evaluate(monkeypatch, cuda, mps, expected):
    """CUDA, else MPS, else CPU: what Accelerate picks for `run`, and so what bench and `runs evaluate` must pick
    (on a Mac, bench used to measure the CPU while run trained on MPS)."""
    from trainer_accel.devices import accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(accelerator, "mps_available", lambda: mps)
    assert accelerator.pick_device(None) == torch.device(expected)
    assert accelerator.pick_device("cpu") == torch.device("cpu")


BENCH = ["bench", "--config", "configs/demo/pretrain.json"]
PACKING = ["bench", "--config", "configs/demo/sft.json", "--phase", "sft", "--packing"]
EVALUATE = ["runs", "evaluate", "nowhere", "--baseline", "nowhere"]


@pytest.mark.parametrize(
    "command, device, says",
    [
        (BENCH, "cuda", "--device cuda: CUDA is not available"),
        (PACKING, "cuda", "--device cuda: CUDA is not available"),
        (EVALUATE, "cuda", "--device cuda: CUDA is not available"),
        (EVALUATE, "cuda:1", "--device cuda: CUDA is not available"),
        (EVALUATE, "gpu", "--device gpu: expected one of cpu, mps, cuda"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line_from_every_command(tmp_path, command, device, says):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    r = run_cli(*command, "--device", device, cwd=ROOT, env={"TRAINER_ARTIFACTS_DIR": str(tmp_path)})
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_collective_timeout_covers_the_main_processes_own_work_and_can_be_set(monkeypatch):
    from datetime import timedelta

    from trainer_accel.devices import accelerator
    from trainer_accel.errors import UserError

    monkeypatch.delenv(accelerator.COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert accelerator.process_group_kwargs().timeout == timedelta(hours=1)  # not NCCL's 10 minutes
    monkeypatch.setenv(accelerator.COLLECTIVE_TIMEOUT_ENV, "7200")
    assert accelerator.process_group_kwargs().timeout == timedelta(hours=2)
    for bad in ("0", "soon", "-5"):
        monkeypatch.setenv(accelerator.COLLECTIVE_TIMEOUT_ENV, bad)
        with pytest.raises(
            UserError, match=f"TRAINER_COLLECTIVE_TIMEOUT_S={bad}: expected a number of seconds above 0"
        ):
            accelerator.process_group_kwargs()
