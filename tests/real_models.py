"""Model directories as users download them: Qwen3-0.6B's and Llama-3.2-1B's files at tiny widths.

The Hub is not reachable from the tests, so each directory is rebuilt from what the published one holds
(tests/fixtures/models/NAME/): the tokenizer.json's structure as published (normalizer, the pre-tokenizer with its
regex, the post-processor, which for Llama 3 adds <|begin_of_text|>, the decoder, and every added token at its real
id with its special flag), a BPE with as many ranks as the real one (151,643 for Qwen, 128,000 for Llama 3: merges
learnt from the test's own text, then unreachable fillers), the published tokenizer_config.json and chat template
(Qwen3's official one with its think block; Llama 3.2's, which writes a dated system header), generation_config.json
as published (Qwen3's sampling settings and stop ids), and config.json at the real vocabulary, context and rope
settings (151,936 rows and 40,960 positions; 128,256 rows, 131,072 positions and Llama 3's rope scaling) with tiny
widths. So a test meets the context, vocabulary and special tokens a user meets, not values chosen to suit it.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
import transformers

FIXTURES = Path(__file__).parent / "fixtures" / "models"
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
WIDTHS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
MODELS = {
    "qwen3": dict(
        config=lambda: transformers.Qwen3Config(
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            bos_token_id=151643,
            eos_token_id=151645,
            **WIDTHS,
        ),
        generation={
            "bos_token_id": 151643,
            "do_sample": True,
            "eos_token_id": [151645, 151643],
            "pad_token_id": 151643,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        },
    ),
    "llama3": dict(
        config=lambda: transformers.LlamaConfig(
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING,
            bos_token_id=128000,
            eos_token_id=128001,
            **WIDTHS,
        ),
        generation={
            "bos_token_id": 128000,
            "do_sample": True,
            "eos_token_id": 128001,
            "temperature": 0.6,
            "top_p": 0.9,
        },
    ),
}
TEXT = "".join(
    f"Animal {i} lives by the river and eats {['plums', 'fish', 'seeds'][i % 3]}. What does it eat?\n"
    for i in range(120)
)


def tokenizer_json(name: str, texts: list[str]) -> str:
    """A tokenizer.json with the published structure and special tokens of `name`, and a vocabulary of its size."""
    structure = json.loads((FIXTURES / name / "tokenizer_structure.json").read_text(encoding="utf-8"))
    model = dict(structure["model"])
    ranks = model.pop("ranks")
    learner = tokenizers.Tokenizer.from_str(
        json.dumps(
            {
                "version": "1.0",
                "truncation": None,
                "padding": None,
                "added_tokens": [],
                "normalizer": structure["normalizer"],
                "pre_tokenizer": structure["pre_tokenizer"],
                "post_processor": None,
                "decoder": structure["decoder"],
                "model": {**model, "vocab": {}, "merges": []},
            }
        )
    )
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=700, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    learner.train_from_iterator(texts, trainer)
    learnt = json.loads(learner.to_str())["model"]
    vocab = dict(learnt["vocab"])
    vocab.update({f"\u0120\u0121filler{i}": i for i in range(len(vocab), ranks)})  # ids no merge ever reaches
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": structure["added_tokens"],
            "normalizer": structure["normalizer"],
            "pre_tokenizer": structure["pre_tokenizer"],
            "post_processor": structure["post_processor"],
            "decoder": structure["decoder"],
            "model": {**model, "vocab": vocab, "merges": learnt["merges"]},
        },
        ensure_ascii=False,
    )


def model_directory(name: str, folder: Path, seed: int = 0) -> Path:
    """`folder` made into a Hub-style model directory of `name` (qwen3 or llama3) with random tiny weights."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = MODELS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(spec["config"](), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # spread wide enough that greedy choices are not near-ties
        for key, p in model.named_parameters():
            p.copy_(
                1.0 + 0.2 * torch.randn(p.shape, generator=g)
                if key.endswith("norm.weight")
                else torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.15)
            )
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}  # the Hub's layout (transformers 4): rope_theta, rope_scaling
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    config.update(
        rope_theta=rope.get("rope_theta"), rope_scaling=scaling if scaling.get("rope_type") != "default" else None
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(spec["generation"], indent=2))
    (folder / "tokenizer.json").write_text(tokenizer_json(name, [TEXT]), encoding="utf-8")
    config = json.loads((FIXTURES / name / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = (FIXTURES / name / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def write_data(folder: Path) -> None:
    """qa.jsonl (40 questions, two of them two-turn conversations with a system message) and notes.txt."""
    rows = [
        {"prompt": f"What does animal {i} eat?", "response": f"Animal {i} eats {['plums', 'fish', 'seeds'][i % 3]}."}
        for i in range(40)
    ]
    rows += [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"Hi, I am {name}."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What does animal 3 eat?"},
                {"role": "assistant", "content": " Animal 3 eats plums. "},
            ]
        }
        for name in ("Ann", "Bo")
    ]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "notes.txt").write_text(
        "".join(f"Animal {i} lives by the river and eats what it finds.\n\n" for i in range(80))
    )
