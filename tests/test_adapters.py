"""LoRA adapters: the converter's numbers, adapter-only checkpoints that resume exactly and refuse another base,
exports PEFT loads equal to ours, a PEFT-made adapter imported, the NF4 base, and the adapter under DDP and
FSDP2."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import TINY_MODEL, events, run_cli, write_config
from safetensors.torch import load_file
from test_device_paths import EMULATED, launch, needs_cpu_fsdp2

from trainer_accel.models import lora
from trainer_accel.models.build import build_model
from trainer_accel.models.config import ModelConfig

FAMILIES = {  # each family's switches at a tiny size (models/llama_hf.py says what each one is)
    "gpt2": dict(TINY_MODEL, bias=True, dropout=0.1),
    "llama": dict(TINY_MODEL, H=4, n_kv_heads=2, d_ff=48, position="rope", norm="rmsnorm", mlp="gated",
                  activation="silu", tie_embeddings=False, dropout=0.1),
    "mistral": dict(TINY_MODEL, H=4, n_kv_heads=1, d_ff=48, position="rope", norm="rmsnorm", mlp="gated",
                    activation="silu", tie_embeddings=False, sliding_window=4096, rope_theta=1e6),
    "qwen2": dict(TINY_MODEL, H=4, n_kv_heads=2, d_ff=48, position="rope", norm="rmsnorm", mlp="gated",
                  activation="silu", qkv_bias=True, ln_eps=1e-6),
    "qwen3": dict(TINY_MODEL, H=4, n_kv_heads=2, head_dim=16, d_ff=48, position="rope", norm="rmsnorm",
                  mlp="gated", activation="silu", qk_norm=True, ln_eps=1e-6),
}  # fmt: skip
SHORT = {"total_steps": 6, "ckpt_every": 2, "eval_every": 2, "B": 2, "accum_steps": 2, "warmup_steps": 2}
QUICK = {**SHORT, "total_steps": 2, "accum_steps": 1, "warmup_steps": 1}  # where a trained adapter is all it takes
ADAPTER = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


def adapted(family: str, adapter: lora.AdapterConfig, seed: int = 0):
    cfg = ModelConfig(**FAMILIES[family])
    torch.manual_seed(seed)
    model = build_model(cfg, converters=[lora.lora_converter(adapter, cfg)], trains=lora.is_adapter_name)
    with torch.no_grad():  # a trained adapter: B away from its zero start, at the scale training gives it
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    return cfg, model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_equals_unmerged_and_adapter_off_is_the_base(family):
    adapter = lora.AdapterConfig(r=4, alpha=8, target_modules="all-linear")
    cfg, model = adapted(family, adapter)
    model.eval()
    x = torch.randint(0, cfg.V, (2, cfg.T))
    state = model.state_dict()
    base = {k: v for k, v in state.items() if not lora.is_adapter_name(k)}
    merged = build_model(cfg, state=lora.merged_state(base, lora.adapter_state(state), adapter, cfg)).eval()
    plain = build_model(cfg, state=base).eval()
    with torch.no_grad():
        on = model(x)
        assert (merged(x) - on).abs().max() < 1e-5
        with lora.adapter_off(model):
            assert torch.equal(model(x), plain(x))
        assert (on - plain(x)).abs().max() > 1e-3  # the adapter does change what the model computes
    trainable, total = lora.parameter_counts(model)
    assert trainable == sum(v.numel() for v in lora.adapter_state(state).values()) and total > trainable


def test_fresh_adapter_computes_the_base_and_targets_follow_peft_names():
    cfg = ModelConfig(**FAMILIES["llama"])
    torch.manual_seed(0)
    base = build_model(cfg).eval()
    torch.manual_seed(0)
    model = build_model(cfg, converters=[lora.lora_converter(lora.AdapterConfig(), cfg)]).eval()
    x = torch.randint(0, cfg.V, (2, 8))
    assert torch.equal(model(x), base(x))  # B starts at zero; the base's draw is unchanged by the converter
    names = {k for k in model.state_dict() if lora.is_adapter_name(k)}
    assert names == {f"blocks.{i}.attn.qkv.lora_{m}.{t}" for i in range(2) for m in "AB" for t in ("q_proj", "v_proj")}
    assert model.blocks[0].attn.qkv.lora_B["v_proj"].shape == (2 * cfg.hd, 8)  # v is n_kv_heads wide
    with pytest.raises(ValueError, match="c_attn is not a module of this model"):
        lora.chosen_targets(lora.AdapterConfig(target_modules=("c_attn",)), cfg)
    gpt2 = ModelConfig(**FAMILIES["gpt2"])
    assert [t.module for t in lora.chosen_targets(lora.AdapterConfig(target_modules=("c_proj",)), gpt2)] == [
        "attn.proj",
        "mlp.down",
    ]  # GPT-2 calls both output projections c_proj, and PEFT adapts both


def test_a_merge_sums_in_fp32_and_casts_once_to_the_base_dtype():
    """A bf16 base: each weight gets base + scale * B A computed in fp32 and rounded to bf16 once (adding the update
    in bf16 rounds twice and lands elsewhere: torchtune#1101's merged model that disagreed with the unmerged one)."""
    adapter = lora.AdapterConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    cfg, model = adapted("llama", adapter)
    state = model.state_dict()
    base = {k: v.to(torch.bfloat16) for k, v in state.items() if not lora.is_adapter_name(k)}
    merged = lora.merged_state(base, lora.adapter_state(state), adapter, cfg)
    for module, names in (("blocks.1.attn.qkv", ("q_proj", "v_proj")), ("blocks.1.mlp.down", ("down_proj",))):
        want = base[f"{module}.weight"].float()
        for t in lora.chosen_targets(adapter, cfg):
            if t.name in names and f"blocks.1.{t.module}" == module:
                a, b = state[f"{module}.lora_A.{t.name}"], state[f"{module}.lora_B.{t.name}"]
                want[t.rows[0] : t.rows[1]] += (b @ a) * adapter.scale
        assert merged[f"{module}.weight"].dtype == torch.bfloat16
        assert torch.equal(merged[f"{module}.weight"], want.to(torch.bfloat16))
    assert torch.equal(merged["blocks.1.attn.qkv.weight"][cfg.H * cfg.hd : (cfg.H + cfg.kv_heads) * cfg.hd],
                       base["blocks.1.attn.qkv.weight"][cfg.H * cfg.hd : (cfg.H + cfg.kv_heads) * cfg.hd])  # fmt: skip


def test_activation_checkpointing_gives_the_same_adapter_gradients_with_dropout():
    adapter = lora.AdapterConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear")
    grads = []
    for every in (0, 1):
        cfg, model = adapted("llama", adapter)
        model.checkpoint_every = every
        model.train()
        x = torch.randint(0, cfg.V, (2, cfg.T))
        torch.manual_seed(123)
        model(x, targets=x).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for n, p in model.named_parameters() if not lora.is_adapter_name(n))
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    assert all(g.abs().sum() > 0 for g in grads[0].values() if g is not None)


def pretrain_and_adapter_config(world, family="gpt2", adapter=ADAPTER, train=SHORT, **top):
    model = {"model_cfg": FAMILIES[family]}
    write_config(world / "c/pretrain.json", "pretrain", train, **model)
    sft = {**train, "pack": True}  # packed rows, as the demo's SFT: block-diagonal attention under the adapter too
    write_config(
        world / "c/sft.json", "sft", sft, init_from="checkpoints/pretrain/best", adapter=adapter, **model, **top
    )
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    return ("run", "--phase", "pipeline", "--config", "c/pipeline.json")


def test_adapter_sft_checkpoints_hold_the_adapter_and_everything_reads_it(world):
    args = pretrain_and_adapter_config(
        world, train=QUICK, sample_prompts=[{"prompt": "Hi", "task": "chat", "max_new_tokens": 4}]
    )
    r = run_cli(*args, cwd=world)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable: adapter rank 4 on a frozen base" in r.stderr
    best = world / "checkpoints/sft/best"
    tensors = load_file(str(best / "model.safetensors"))
    assert tensors and all(lora.is_adapter_name(k) for k in tensors)
    meta = json.loads((best / "meta.json").read_text())
    base = meta["adapter"]["base"]
    assert base["source"] == str((world / "checkpoints/pretrain/step_0000002").resolve()) and len(base["sha256"]) == 64
    assert meta["adapter"]["config"]["r"] == 4 and meta["adapter"]["trainable_parameters"] == sum(
        t.numel() for t in tensors.values()
    )
    sizes = [e["size_mb"] for e in events(world, "checkpoint") if "/sft/" in e["path"]]
    pre = [e["size_mb"] for e in events(world, "checkpoint") if "/pretrain/" in e["path"]]
    assert sizes and max(sizes) < min(pre) / 2
    assert "checkpoint checkpoints/sft/step_0000002 written" in r.stderr
    # best.pt: the six keys, the adapter merged into the base; it computes what the adapter run's model computes
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    assert set(blob) == {"model_cfg", "train_cfg", "model_state", "optimizer_state", "step", "best_val_loss"}
    assert blob["optimizer_state"] is None and not any(lora.is_adapter_name(k) for k in blob["model_state"])
    from trainer_accel.inference.load import load_model
    from trainer_accel.paths import resolve_paths

    ours = load_model(best, resolve_paths()).model
    cfg = ModelConfig(**blob["model_cfg"])
    merged = build_model(cfg, state=blob["model_state"]).eval()
    x = torch.randint(0, cfg.V, (2, cfg.T))
    with torch.no_grad():
        assert (merged(x) - ours(x)).abs().max() < 1e-5
    # the gate ran on the adapter checkpoint against the base; samples were written; generate reads it directly
    assert "verdict:" in r.stderr and list((world / "samples/sft").glob("*.json"))
    g = run_cli("generate", "--model", "checkpoints/sft/best", "--prompt", "The zordax", "--max-new-tokens", "4",
                "--temperature", "0", cwd=world)  # fmt: skip
    assert g.returncode == 0, g.stderr
    # --format peft: a user's directory is refused whole, an earlier export of ours is replaced
    (world / "mine").mkdir()
    (world / "mine/notes.txt").write_text("keep")
    r = run_cli("export", "--format", "peft", "--checkpoint", "checkpoints/sft/best", "--out", "mine", cwd=world)
    assert r.returncode == 2 and "not an earlier PEFT export" in r.stderr
    assert (world / "mine/notes.txt").read_text() == "keep" and sorted(p.name for p in (world / "mine").iterdir()) == [
        "notes.txt"
    ]
    for _ in range(2):
        r = run_cli("export", "--format", "peft", "--checkpoint", "checkpoints/sft/best", "--out", "ours", cwd=world)
        assert r.returncode == 0, r.stderr[-1500:]
    r = run_cli("export", "--base-name", "meta-llama/Llama-3.2-1B", cwd=world)
    assert r.returncode == 2 and "--base-name: only for --format peft" in r.stderr
    plan = run_cli("run", "--phase", "sft", "--config", "c/sft.json", "--plan", cwd=world)
    assert "adapter: " in plan.stdout and "trainable parameters" in plan.stdout, plan.stdout + plan.stderr


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_run_killed_anywhere_resumes_exactly(world, family):
    args = pretrain_and_adapter_config(world, family)
    assert run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")}).returncode == 0
    env = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    killed = run_cli(*args, cwd=world, env={**env, "TRAINER_FAULT": "after_meta:5"})  # in SFT, after a checkpoint
    assert killed.returncode == -9
    again = run_cli(*args, cwd=world, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "sft/latest at step" in again.stderr
    for pointer in ("latest", "best"):
        a = load_file(str(world / "ref/checkpoints/sft" / pointer / "model.safetensors"))
        b = load_file(str(world / "cut/checkpoints/sft" / pointer / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_pt = torch.load(world / "ref/checkpoints/best.pt", weights_only=True)
    cut_pt = torch.load(world / "cut/checkpoints/best.pt", weights_only=True)
    assert all(torch.equal(ref_pt["model_state"][k], cut_pt["model_state"][k]) for k in ref_pt["model_state"])


def test_resume_on_another_base_and_wrong_adapter_settings_are_refused(world):
    args = pretrain_and_adapter_config(world, train=QUICK)
    assert run_cli(*args, cwd=world).returncode == 0
    sft = ("run", "--phase", "sft", "--config", "c/sft.json", "--set", "train_cfg.total_steps=8")
    # another base: a pretrain of another seed, named by adapter.base
    write_config(world / "c/other.json", "pretrain", {**QUICK, "seed": 99}, model_cfg=FAMILIES["gpt2"])
    other = {"TRAINER_CHECKPOINTS_DIR": str(world / "other")}
    assert run_cli("run", "--phase", "pretrain", "--config", "c/other.json", cwd=world, env=other).returncode == 0
    r = run_cli(*sft, "--set", f"adapter.base={world / 'other/pretrain/best'}", cwd=world)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "this adapter was trained on the base" in line and "step_0000002" in line and "other/pretrain/best" in line
    r = run_cli(*sft, "--set", "adapter.r=8", cwd=world)
    assert r.returncode == 2 and "r 4 vs 8" in r.stderr, r.stderr[-2000:]
    # a resumed run whose recorded base is gone says so, by path
    shutil.move(world / "checkpoints/pretrain", world / "moved")
    r = run_cli("generate", "--model", "checkpoints/sft/best", "--prompt", "Hi", "--max-new-tokens", "2", cwd=world)
    assert r.returncode == 2 and "its base" in r.stderr and "is not there" in r.stderr, r.stderr[-2000:]


def test_adapter_config_mistakes_are_one_line_each(world):
    write_config(world / "p.json", "pretrain", QUICK)
    assert run_cli("run", "--phase", "pretrain", "--config", "p.json", cwd=world).returncode == 0
    for adapter, message in (
        ({"r": 0}, "adapter.r: expected a rank >= 1"),
        ({"target_modules": ["q_proj"]}, "q_proj is not a module of this model (it has c_attn, c_proj, c_fc"),
        ({"target_modules": "everything"}, 'expected a list of module names, "all-linear" or null'),
        ({"dropout": 1.5}, "adapter.dropout: expected a probability"),
        ({"rank": 4}, "adapter.rank: unknown key (known: alpha, base, dropout"),
        ({"quantize_base": "int8"}, "adapter.quantize_base: expected null or nf4"),
    ):
        cfg = write_config(world / "s.json", "sft", QUICK, adapter=adapter, init_from="checkpoints/pretrain/best")
        r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world)
        assert r.returncode == 2 and message in r.stderr, (adapter, r.stderr[-1500:])
    cfg = write_config(world / "s.json", "sft", QUICK, adapter={})
    r = run_cli("run", "--phase", "sft", "--config", str(cfg), "--no-resume", cwd=world)
    assert r.returncode == 2 and "an adapter trains on a base model, and this config names none" in r.stderr
    # a checkpoint of full training does not resume an adapter run
    full = write_config(world / "full.json", "sft", QUICK, init_from="checkpoints/pretrain/best")
    assert run_cli("run", "--phase", "sft", "--config", str(full), cwd=world).returncode == 0
    cfg = write_config(world / "s.json", "sft", QUICK, adapter={}, init_from="checkpoints/pretrain/best")
    r = run_cli("run", "--phase", "sft", "--config", str(cfg), cwd=world)
    assert r.returncode == 2 and "a checkpoint of full training cannot resume an adapter run" in r.stderr
    r = run_cli("export", "--format", "peft", "--checkpoint", "checkpoints/sft/best", cwd=world)
    assert r.returncode == 2 and "has no adapter; --format peft is for a run with an adapter section" in r.stderr


def hf_base_and_peft(world, family):
    """The pipeline's base exported as a Hugging Face directory, and its adapter as PEFT's directory on it."""
    args = pretrain_and_adapter_config(world, family, train=QUICK)
    assert run_cli(*args, cwd=world).returncode == 0
    r = run_cli("export", "--format", "hf", "--checkpoint", "checkpoints/pretrain/best", "--out", "base", cwd=world)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("export", "--format", "peft", "--checkpoint", "checkpoints/sft/best", "--out", "adapter",
                "--base-name", str(world / "base"), cwd=world)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return world / "base", world / "adapter"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_peft_export_loads_in_peft_and_computes_ours(world, family):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from trainer_accel.inference.load import load_model
    from trainer_accel.paths import resolve_paths

    base_dir, adapter_dir = hf_base_and_peft(world, family)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # vLLM's loader rules: its required fields, LoRA matrices alone, no bias or extra modules
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["base_model_name_or_path"] == str(base_dir) and not config["modules_to_save"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert keys and all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )
    if family != "gpt2":  # q, k and v: one of our stacked projections, split into PEFT's three
        assert {k.split(".")[-3] for k in keys} >= {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    ours = load_model(world / "checkpoints/sft/best", resolve_paths()).model
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-5


def test_an_adapter_made_by_peft_imports_equal_and_trains_on(world):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from trainer_accel.inference.load import load_model
    from trainer_accel.paths import resolve_paths

    base_dir, _ = hf_base_and_peft(world, "llama")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"],
                               lora_dropout=0.0, task_type="CAUSAL_LM", use_rslora=True)  # fmt: skip
    theirs = peft.get_peft_model(hf, settings)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(world / "made_by_peft")
    theirs.eval()
    ours = load_model(world / "made_by_peft", resolve_paths()).model  # its base from base_model_name_or_path
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max() < 1e-5
    # as adapters come from the Hub: base_model_name_or_path a Hub id, which is no directory here
    hub = world / "from_the_hub"
    shutil.copytree(world / "made_by_peft", hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    )
    r = run_cli("generate", "--model", str(hub), "--prompt", "Hi", "--max-new-tokens", "2", cwd=world)
    assert r.returncode == 2 and "base_model_name_or_path (meta-llama/Llama-3.2-1B) is no directory here" in r.stderr
    adapter = {"r": 4, "alpha": 16, "rslora": True, "target_modules": ["q_proj", "o_proj", "down_proj"]}
    model = {"model_cfg_path": str(base_dir / "config.json"), "model_cfg": {"T": 32}}  # as a user names an HF base
    cfg = write_config(world / "c/go_on.json", "sft", QUICK, **model, init_from=str(hub),  # its base named here
                       adapter={**adapter, "base": str(base_dir)})  # fmt: skip
    r = run_cli("run", "--phase", "sft", "--config", str(cfg), "--no-resume", cwd=world)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((world / "checkpoints/sft/latest/meta.json").read_text())["adapter"]
    assert saved["config"]["rslora"] and saved["base"]["source"] == str(base_dir.resolve())
    # it went on from PEFT's matrices (2 AdamW steps at lr 3e-3 move each value by at most ~0.006), not from a
    # fresh draw (Kaiming-uniform A, B zero: values up to 1/sqrt(C) ~ 0.18 away)
    trained = load_file(str(world / "checkpoints/sft/latest/model.safetensors"))
    made = load_file(str(world / "made_by_peft/adapter_model.safetensors"))
    a = made["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = made["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert (trained["blocks.1.attn.qkv.lora_A.q_proj"] - a).abs().max() < 0.01
    assert (trained["blocks.1.mlp.down.lora_B.down_proj"] - b).abs().max() < 0.01 and b.abs().max() > 0.05
    cfg2 = write_config(world / "c/wrong.json", "sft", QUICK, **model, init_from=str(world / "made_by_peft"),
                        adapter={"r": 8, "base": str(base_dir)})  # fmt: skip
    r = run_cli("run", "--phase", "sft", "--config", str(cfg2), "--no-resume", cwd=world)
    assert r.returncode == 2 and "the adapter differs from the config's adapter section" in r.stderr


NF4_MODEL = dict(TINY_MODEL, C=64, H=4, d_ff=256, position="rope", norm="rmsnorm", mlp="gated", activation="silu")


def test_nf4_base_trains_resumes_and_exports(world):
    pytest.importorskip("torchao")
    adapter = {**ADAPTER, "quantize_base": "nf4"}
    model = {"model_cfg": NF4_MODEL}
    write_config(world / "c/pretrain.json", "pretrain", SHORT, **model)
    write_config(world / "c/sft.json", "sft", SHORT, init_from="checkpoints/pretrain/best", adapter=adapter, **model)
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    args = ("run", "--phase", "pipeline", "--config", "c/pipeline.json")
    assert run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")}).returncode == 0
    env = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    assert run_cli(*args, cwd=world, env={**env, "TRAINER_FAULT": "after_meta:5"}).returncode == -9
    again = run_cli(*args, cwd=world, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    a = load_file(str(world / "ref/checkpoints/sft/latest/model.safetensors"))
    b = load_file(str(world / "cut/checkpoints/sft/latest/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and all(lora.is_adapter_name(k) for k in a)
    losses = [e["train/loss"] for e in events(world / "ref", "train") if e["phase"] == "sft"]
    assert losses and all(math.isfinite(v) for v in losses)
    r = run_cli("export", "--format", "peft", "--checkpoint", "ref/checkpoints/sft/best", "--out", "nf4_adapter",
                cwd=world)  # fmt: skip
    assert r.returncode == 0 and "trained against its NF4 copy" in r.stderr, r.stderr[-2000:]
    record = json.loads((world / "nf4_adapter/trainer_accel_export.json").read_text())
    assert record["trained_against"] == "the base quantized to NF4"


# NF4 under FSDP2 shards each weight's second-level scale groups among the processes: at least 2 groups a weight
NF4_SHARDABLE = dict(NF4_MODEL, C=256, d_ff=512)


@needs_cpu_fsdp2
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["fp32-base", "nf4-base"])
def test_adapter_under_ddp_and_fsdp2_equals_one_process(world, quantize):
    """The adapter's gradients are those of one big batch whatever the split: 2 gloo processes under DDP and under
    FSDP2 (frozen and trainable parameters sharded in the same units; an NF4 base sharded as torchao's NF4Tensor)
    end where one process with twice the accumulation ends."""
    if quantize:
        pytest.importorskip("torchao")
    model = {"model_cfg": NF4_SHARDABLE} if quantize else {}
    write_config(world / "pre.json", "pretrain", SHORT, **model)
    assert run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world).returncode == 0
    base = str(world / "checkpoints/pretrain/best")
    adapter = {**ADAPTER, "dropout": 0.0, "quantize_base": quantize}
    one = write_config(world / "one.json", "sft", {**SHORT, "accum_steps": 4, "grad_clip": 0.0}, init_from=base,
                       adapter=adapter, **model)  # fmt: skip
    two = write_config(world / "two.json", "sft", {**SHORT, "grad_clip": 0.0}, init_from=base, adapter=adapter, **model)
    r = run_cli(
        "run", "--phase", "sft", "--config", str(one), cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "a1")}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {
        "ddp": ("cpu_2proc.yaml", ["-m", "trainer_accel.run"], ()),
        "fsdp": ("fsdp.yaml", [str(EMULATED), "fsdp"], ("--num_processes", "2", "--mixed_precision", "no")),
    }
    ref = load_file(str(world / "a1/checkpoints/sft/latest/model.safetensors"))
    for name, (launch_file, target, launcher) in runs.items():
        r = launch(
            world, launch_file, target, "--phase", "sft", "--config", str(two), artifacts=name, launcher=launcher
        )
        assert r.returncode == 0, r.stderr[-3000:]
        got = load_file(str(world / name / "checkpoints/sft/latest/model.safetensors"))
        assert got.keys() == ref.keys()
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert all(torch.allclose(got[k], ref[k], atol=1e-6, rtol=1e-5) for k in ref), (name, worst)
    if quantize:  # the NF4 base resumes exactly in test_nf4_base_trains_resumes_and_exports
        return
    # 2 processes stopped after step 4 (as a crash after that checkpoint leaves them) resume bit for bit
    shutil.copytree(world / "ddp", world / "cut")
    for d in ("latest", "best", "step_0000006"):
        shutil.rmtree(world / "cut/checkpoints/sft" / d, ignore_errors=True)
    launch_file, target, launcher = runs["ddp"]
    r = launch(world, launch_file, target, "--phase", "sft", "--config", str(two), artifacts="cut", launcher=launcher)
    assert r.returncode == 0 and "at step 4" in r.stderr, r.stderr[-3000:]
    a = load_file(str(world / "cut/checkpoints/sft/latest/model.safetensors"))
    b = load_file(str(world / "ddp/checkpoints/sft/latest/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_run_compiles_without_graph_breaks_and_trains_under_fp16(world):
    """The loop's compile path (dynamo's eager backend standing in for inductor, as in test_scale_paths) with
    adapters on every linear of a Llama-style model: one graph for the forward and the loss, no break, nothing
    compiled after the warm-up. And fp16 with a loss scaler, as Accelerate sets it up on a GPU (tests/emulated_run.py):
    the adapter trains and its losses stay finite."""
    import os
    import subprocess
    import sys

    write_config(world / "p.json", "pretrain", SHORT, model_cfg=FAMILIES["llama"])
    assert run_cli("run", "--phase", "pretrain", "--config", "p.json", cwd=world).returncode == 0
    top = {"init_from": "checkpoints/pretrain/best", "adapter": ADAPTER, "model_cfg": FAMILIES["llama"]}
    cfg = write_config(world / "c.json", "sft", {**SHORT, "compile": True, "pack": True}, **top)
    code = (
        "import functools, sys, torch; torch.compile = functools.partial(torch.compile, backend='eager'); "
        "from trainer_accel.run import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "TRAINER_ARTIFACTS_DIR": str(world / "a"), "TRAINER_CHECKPOINTS_DIR": str(world / "a/ck")}
    (world / "a/ck").mkdir(parents=True)
    shutil.copytree(world / "checkpoints/pretrain", world / "a/ck/pretrain")
    r = subprocess.run([sys.executable, "-c", code, "--phase", "sft", "--config", str(cfg)], cwd=world,
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    compiled = events(world / "a", "compile")
    assert compiled and compiled[-1]["graph_breaks"] == 0 and compiled[-1]["compiled_later"] == 0, compiled
    fp16 = write_config(world / "f.json", "sft", SHORT, **top)
    r = subprocess.run([sys.executable, str(EMULATED), "fp16", "--phase", "sft", "--config", str(fp16)], cwd=world,
                       capture_output=True, text=True, timeout=300, env={**os.environ})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [e["train/loss"] for e in events(world, "train") if e["phase"] == "sft"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(lora.is_adapter_name(k) for k in load_file(str(world / "checkpoints/sft/latest/model.safetensors")))
