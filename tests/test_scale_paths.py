"""What issue 27's GPU paths rest on, checked on the CPU: the dependency floors, the masked attention path chosen
on purpose (its numbers equal SDPA's own), and the count of what torch.compile did (graphs, graph breaks,
compiles after the warm-up). The kernels themselves and compile's speed are gpu_check's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import events, write_config

from trainer_accel.dependency_floors import FLOORS, floor_problems, release
from trainer_accel.models.attention import masked_attention, pinned_kernel
from trainer_accel.models.gpt import packed_layout
from trainer_accel.observability.compile_report import CompileWatch

ROOT = Path(__file__).resolve().parent.parent


# -- dependency floors ---------------------------------------------------------------------------------------------


def test_the_floors_name_the_package_the_version_found_and_the_floor():
    assert floor_problems({"torch": "2.13.0+cpu", "accelerate": "1.16.0"}) == []
    assert floor_problems({"torch": "2.6.0", "accelerate": "1.13.0"}) == []
    assert floor_problems({"torch": "2.7.0a0+git1234", "accelerate": "1.13.0.dev0"}) == []
    old = floor_problems({"torch": "2.5.1+cu124", "accelerate": "1.12.0"})
    assert old[0].startswith("torch 2.5.1+cu124 is installed; trainer_accel needs torch >= 2.6 (FSDP2")
    assert old[0].endswith("pip install 'torch>=2.6'")
    assert old[1].startswith("accelerate 1.12.0 is installed; trainer_accel needs accelerate >= 1.13")
    assert floor_problems({"torch": "2.10.0", "accelerate": None}) == [
        f"accelerate is not installed; trainer_accel needs accelerate >= 1.13 ({FLOORS['accelerate'][1]})"
    ]
    assert release("2.10.1") == (2, 10) and release("nightly") is None


@pytest.fixture
def old_torch_metadata(tmp_path):
    """A directory that, first on the path, makes the installed torch's metadata say 2.5.1 (torch itself still
    imports from the environment): what a user with an old torch has."""
    dist = tmp_path / "old" / "torch-2.5.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.5.1\n")
    return {"PYTHONPATH": f"{tmp_path / 'old'}:{ROOT}"}


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "trainer_accel.run", "--phase", "pretrain", "--config", "x.json"],
        ["-m", "trainer_accel.export", "--help"],
    ],
)
def test_a_command_on_a_too_old_torch_stops_at_start_with_one_line(tmp_path, old_torch_metadata, command):
    r = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **old_torch_metadata},
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: torch 2.5.1 is installed; trainer_accel needs torch >= 2.6 (FSDP2 "
        "through Accelerate, and SDPA's grouped-query attention): pip install 'torch>=2.6'"
    ]
    assert r.stdout == ""


def test_importing_the_package_on_a_too_old_torch_raises_importerror(tmp_path, old_torch_metadata):
    r = subprocess.run(
        [sys.executable, "-c", "import trainer_accel"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **old_torch_metadata},
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("ImportError: torch 2.5.1 is installed; trainer_accel needs")


# -- masked attention ----------------------------------------------------------------------------------------------


def test_masked_attention_runs_on_chosen_kernels_only_on_cuda_in_half_precision():
    for device_is_cuda, dtype, pinned in (
        (True, torch.bfloat16, True),
        (True, torch.float16, True),
        (True, torch.float32, False),
        (False, torch.bfloat16, False),
    ):
        assert pinned_kernel(SimpleNamespace(is_cuda=device_is_cuda, dtype=dtype)) == pinned


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_the_pinned_path_gives_sdpa_own_numbers_and_gradients(kv_heads):
    """The pinned path repeats k and v per query head for the memory-efficient kernel; on the CPU it runs the same
    arithmetic as SDPA's enable_gqa path, so forward and gradients must agree, packed mask and all."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 4, 24, 8
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 7 + [2] * 12])
    _, mask = packed_layout(segments)

    def run(pin: bool):
        torch.manual_seed(3)
        q = torch.randn(B, H, T, hd, generator=torch.Generator().manual_seed(1), requires_grad=True)
        k, v = (torch.randn(B, kv_heads, T, hd, generator=g.manual_seed(s), requires_grad=True) for s in (2, 3))
        y = masked_attention(q, k, v, mask, 0.0, pin=pin)
        (y * torch.linspace(-1, 1, hd)).sum().backward()
        return y.detach(), q.grad, k.grad, v.grad

    plain, pinned = run(False), run(True)
    for a, b in zip(plain, pinned):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    reference = F.scaled_dot_product_attention(  # the mask means causal within each example
        *(
            t[:, :, :10]
            for t in (
                torch.randn(B, H, T, hd, generator=torch.Generator().manual_seed(1)),
                torch.randn(B, kv_heads, T, hd, generator=g.manual_seed(2)).repeat_interleave(H // kv_heads, dim=1),
                torch.randn(B, kv_heads, T, hd, generator=g.manual_seed(3)).repeat_interleave(H // kv_heads, dim=1),
            )
        ),
        is_causal=True,
    )
    assert torch.allclose(pinned[0][:1, :, :10], reference[:1], rtol=0, atol=1e-5)


# -- what torch.compile did ----------------------------------------------------------------------------------------


def test_the_compile_watch_counts_warm_up_later_compiles_and_graph_breaks(caplog):
    torch._dynamo.reset()

    def loss(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos().sum()

    compiled = torch.compile(loss, backend="eager", dynamic=False)
    watch = CompileWatch()
    with watch.mode("eval"), torch.no_grad():
        compiled(torch.randn(4))
    with watch.mode("train"):
        compiled(torch.randn(4, requires_grad=True))
    assert watch.compiled_later == 0 and watch.warmup_frames >= 2
    with watch.mode("train"):  # the same shape again: nothing compiles
        compiled(torch.randn(4, requires_grad=True))
    assert watch.compiled_later == 0
    with caplog.at_level(logging.DEBUG, logger="trainer_accel.observability.compile_report"):
        first = watch.report("pretrain")
        assert watch.report("pretrain") is None  # nothing new: nothing said
        with watch.mode("train"):  # a new shape with dynamic=False: a recompile after the warm-up
            compiled(torch.randn(5, requires_grad=True))
        later = watch.report("pretrain")
    assert first["graph_breaks"] >= 2 and first["graphs"] >= 2 and first["compiled_later"] == 0
    assert later["compiled_later"] >= 1 and later["frames"] > first["frames"]
    ours = [r for r in caplog.records if r.name == "trainer_accel.observability.compile_report"]
    breaks = [r.getMessage() for r in ours if r.levelno == logging.DEBUG]
    assert breaks and all(m.startswith("pretrain: graph break x") for m in breaks)
    assert any("graph_break" in m for m in breaks), breaks  # torch 2.13: "Call to `torch._dynamo.graph_break()`"
    info = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert info[0].startswith(
        f"pretrain: torch.compile: {first['frames']} frame(s) compiled ("
        f"{first['warmup_frames']} in the first train and eval calls, 0 later)"
    )


# -- samples under FSDP: no full fp32 copy on a GPU that is short of memory -----------------------------------------


def test_the_sampling_copy_goes_where_it_fits_in_the_precision_the_run_computes_in(monkeypatch):
    from trainer_accel.checkpoints.full_state import plain_model
    from trainer_accel.config import ModelConfig
    from trainer_accel.devices.hardware import fits_in_free_memory
    from trainer_accel.models.gpt import GPT

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert fits_in_free_memory(gpu, 8 * 2**30)  # 8 GiB and a quarter to spare: 10 GiB
    assert not fits_in_free_memory(gpu, int(8.1 * 2**30))
    assert fits_in_free_memory(torch.device("cpu"), 2**60)  # the host's memory: not read here
    cfg = ModelConfig(V=260, T=16, C=16, L=1, H=2, d_ff=32)
    state = GPT(cfg).state_dict()
    state.pop("lm_head.weight")
    copy = plain_model(cfg, state, {"lm_head.weight": "tok_emb.weight"}, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert copy.lm_head.weight is copy.tok_emb.weight
    assert torch.equal(copy.tok_emb.weight, state["tok_emb.weight"].bfloat16())


# -- the GPU benches' configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, params", [("llama_135m.json", 134_515_008), ("llama_1b.json", 1_235_814_400)])
def test_the_llama_bench_configs_load_and_have_the_shapes_they_name(config, params):
    """SmolLM2-135M's and Llama-3.2-1B's shapes (their parameter counts as transformers gives them), so gpu_check's
    bench rows measure the models users train."""
    from trainer_accel.models.gpt import GPT
    from trainer_accel.phases.registry import load_config

    cfg = load_config(ROOT / "configs/bench" / config, "pretrain")
    with torch.device("meta"):
        assert GPT(cfg.model).num_params() == params
    assert cfg.train.mixed_precision == "bf16" and cfg.train.compile


def test_gpu_check_only_picks_checks_by_word_with_the_check_each_reads_from():
    """A GPU lent for minutes runs the rows it needs: `--only WORDS`; a check that reads an earlier check's run
    keeps that one."""
    from trainer_accel.tools.gpu_check import selected

    chain = [
        ("FSDP2 fp16", 1),
        ("FSDP2 + activation checkpointing, Llama-style, resume", 2),
        ("HF export of that FSDP2 checkpoint, read by transformers", 3),
    ]
    assert selected(chain, None) == chain
    assert selected(chain, "fp16") == chain[:1]
    assert selected(chain, "HF export") == chain[1:]
    assert selected(chain, "activation, nothing") == chain[1:2]
    assert selected(chain, "nothing") == []


def test_a_compiled_run_says_what_compile_did_in_its_log_and_event_log(world):
    """The loop's compile path through the real command, with dynamo's eager backend standing in for inductor (the
    same graphs, without minutes of code generation on 2 cores): one process compiles the forward and the loss
    without a graph break, nothing after the first train and eval calls, and says so."""
    cfg = write_config(world / "c.json", "pretrain", {"total_steps": 4, "compile": True})
    code = (
        "import functools, sys, torch; torch.compile = functools.partial(torch.compile, backend='eager'); "
        "from trainer_accel.run import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "--phase", "pretrain", "--config", str(cfg)],
        cwd=world,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRAINER_ARTIFACTS_DIR": str(world / "a")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    compiled = events(world / "a", "compile")
    assert compiled and compiled[-1]["graph_breaks"] == 0 and compiled[-1]["compiled_later"] == 0
    assert compiled[-1]["frames"] == compiled[-1]["warmup_frames"] >= 2
    assert (
        f"pretrain: torch.compile: {compiled[-1]['frames']} frame(s) compiled ({compiled[-1]['frames']} in the "
        f"first train and eval calls, 0 later)"
    ) in r.stderr
