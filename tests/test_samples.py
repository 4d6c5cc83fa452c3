"""What the model says at each checkpoint: files, settings, determinism."""

from __future__ import annotations

import json

import torch
from conftest import TINY_MODEL, events, run_cli, write_config

PROMPTS = [
    "The zorba is",
    {"prompt": "What color is the zorba?", "task": "chat", "seed": 5, "max_new_tokens": 12, "temperature": 0.0},
    {"prompt": "one and two make", "max_new_tokens": 8, "top_k": 3, "temperature": 1.0},
]


def test_samples_at_every_checkpoint_are_deterministic(world):
    cfg = write_config(
        world / "pre.json", "pretrain", {"total_steps": 4, "ckpt_every": 2}, sample_prompts=PROMPTS, sample_seed=9
    )
    texts = []
    for sub in ("a", "b"):
        r = run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world, env={"TRAINER_ARTIFACTS_DIR": sub})
        assert r.returncode == 0, r.stderr
        files = sorted((world / sub / "samples" / "pretrain").iterdir())
        assert [f.name for f in files] == [f"step-{s:08d}-{i:02d}.json" for s in (2, 4) for i in range(3)]
        recs = [json.loads(f.read_text()) for f in files]
        texts.append([r["text"] for r in recs])
    assert texts[0] == texts[1]
    first, chat, third = recs[3:]
    assert (
        first["prompt"] == "The zorba is"
        and first["seed"] == 9
        and first["task"] == "completion"
        and first["step"] == 4
    )
    assert chat["seed"] == 5 and chat["task"] == "chat" and "<|eot|>" not in chat["text"]
    assert third["top_k"] == 3 and third["max_new_tokens"] == 8
    assert len(events(world / "a", "samples")) == 2


def test_sample_text_works_on_an_exported_model(world):
    from trainer_accel.config import ModelConfig, SamplePrompt
    from trainer_accel.data.tokenizer import ByteTokenizer
    from trainer_accel.models.gpt import GPT
    from trainer_accel.observability.samples import sample_text

    cfg = write_config(world / "pre.json", "pretrain", {"total_steps": 2, "ckpt_every": 2}, sample_prompts=["The"])
    assert run_cli("run", "--phase", "pretrain", "--config", str(cfg), cwd=world).returncode == 0
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    model = GPT(ModelConfig(**blob["model_cfg"]))
    model.load_state_dict(blob["model_state"])
    saved = json.loads((world / "samples/pretrain/step-00000002-00.json").read_text())
    assert sample_text(model, ByteTokenizer(), SamplePrompt("The"), 1234) == saved["text"]
    # a chat sample's system message: the built-in format writes it at the start of the question, as SFT did
    with_system = SamplePrompt("What is it?", task="chat", temperature=1.0, seed=3, system="be brief")
    folded = SamplePrompt("be brief\n\nWhat is it?", task="chat", temperature=1.0, seed=3)
    assert sample_text(model, ByteTokenizer(), with_system, 0) == sample_text(model, ByteTokenizer(), folded, 0)
    assert "system" not in SamplePrompt("The").to_dict()  # configs written before it keep their fingerprint


def test_bad_sample_prompts_are_named(tmp_path):
    import pytest

    from trainer_accel.errors import UserError
    from trainer_accel.phases.registry import load_config

    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "model_cfg": TINY_MODEL,
                "sample_prompts": [3, {"prompt": "x", "task": "poem"}, {"prompt": "x", "system": "be brief"}],
            }
        )
    )
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "c.json", "pretrain")
    assert any("sample_prompts[0]: expected a JSON object" in p for p in e.value.problems)
    assert any('sample_prompts[1].task: expected "completion" or "chat", got "poem"' in p for p in e.value.problems)
    assert any('sample_prompts[2].system: only for task "chat"' in p for p in e.value.problems)
