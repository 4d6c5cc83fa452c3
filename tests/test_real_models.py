"""Real models as they come: Qwen3-0.6B's and Llama-3.2-1B's directories (tests/real_models.py), trained the way the
README says, at a context far below the model's maximum, and compared with what transformers does with the same
files: the cached SFT tokens, the logits of the export, the prompts, the stops and the greedy answers.

Each family's directory is prepared, fine-tuned (SFT at T=64 and 128 against 40,960 and 131,072 positions) and
exported once per module; the tests then read what that left, as a user would look at it.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import run_cli
from real_models import model_directory, write_data

from trainer_accel.data.cache import answer_mask, answer_rule
from trainer_accel.models.config import ModelConfig
from trainer_accel.models.gpt import GPT

# one worker runs these: the two model directories are trained once each, under a lock the other worker would wait on
pytestmark = pytest.mark.xdist_group("real_models")

transformers.logging.set_verbosity_error()
DATE = "26 Jul 2024"  # Llama 3.2's template dates its system header with today's date unless told one
ARGS = {"qwen3": [], "llama3": ["--template-arg", f"date_string={DATE}"]}
TEMPLATE_KWARGS = {"qwen3": {}, "llama3": {"date_string": DATE}}
MAXIMUM = {"qwen3": 40960, "llama3": 131072}
ROWS = {"qwen3": 151936, "llama3": 128256}
CONTEXT = {"qwen3": 64, "llama3": 128}  # Llama 3.2's template writes a dated system header before every conversation


def sft_config(folder: Path, T: int, **train) -> Path:
    cfg = {
        "model_cfg_path": "model/config.json",
        "init_from": "model",
        "model_cfg": {"T": T},
        "sft_sources": {"qa": 1.0},
        "val_source": "notes",
        "tracking": {"log_with": []},
        "sample_prompts": [{"prompt": "What does animal 7 eat?", "task": "chat", "temperature": 0.0}],
        "train_cfg": {
            "total_steps": 24,
            "B": 4,
            "base_lr": 3e-3,
            "warmup_steps": 3,
            "min_lr": 3e-4,
            "eval_every": 12,
            "eval_batches": 2,
            "ckpt_every": 12,
            "log_every": 12,
            **train,
        },
    }
    (folder / "sft.json").write_text(json.dumps(cfg))
    return folder / "sft.json"


@pytest.fixture(params=["qwen3", "llama3"])
def trained(request, tmp_path_factory):
    """(family, folder, what prepare and export said): the model directory, prepared with --tokenizer DIR,
    fine-tuned at a T far below its maximum in its own template, exported as a Hugging Face directory to out/.
    Made once per test session: the first worker to need a family makes it under a lock in the folder the workers
    share, the others read what it left (the tests only read it)."""
    shared = tmp_path_factory.getbasetemp().parent
    with open(shared / f"real-{request.param}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / f"real-{request.param}.json"
        if not done.is_file():
            name, folder, said = train(request.param, shared / f"real-{request.param}")
            done.write_text(json.dumps({"folder": str(folder), "said": said}))
    made = json.loads(done.read_text())
    return request.param, Path(made["folder"]), made["said"]


def train(name: str, folder: Path):
    folder.mkdir()
    model_directory(name, folder / "model")
    write_data(folder)
    r = run_cli(
        "prepare",
        "--tokenizer",
        "model",
        "--stream",
        "notes=notes.txt",
        "--sft",
        "qa=qa.jsonl",
        *ARGS[name],
        cwd=folder,
    )
    assert r.returncode == 0, r.stderr
    prepared = r.stderr
    r = run_cli("run", "--phase", "sft", "--config", str(sft_config(folder, CONTEXT[name])), cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--format", "hf", "--out", "out", cwd=folder)
    assert r.returncode == 0, r.stderr[-3000:]
    return name, folder, prepared + r.stderr


def cache(folder: Path, kind: str, name: str) -> tuple[dict, np.ndarray, np.ndarray | None]:
    path = folder / "data" / "cache" / kind / name
    meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
    tokens = np.fromfile(path, dtype=meta["dtype"]).astype(np.int64)
    starts = (
        np.fromfile(path.with_name(path.name + ".idx"), dtype=np.uint64).astype(np.int64) if kind == "sft" else None
    )
    return meta, tokens, starts


def conversations(folder: Path) -> list[list[dict]]:
    out = []
    for line in (folder / "qa.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append(
            row.get("messages")
            or [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        )
    return out


def test_the_models_own_tokens_are_used_and_none_is_added(trained):
    """prepare --tokenizer DIR adds nothing to a model that has its own end-of-text token and is trained in its own
    template: Llama 3's 128,256 tokens fill its 128,256 rows exactly and no V is needed; documents start with the
    model's BOS where it has one and end with its own end-of-text token."""
    name, folder, said = trained
    meta, tokens, _ = cache(folder, "streams", "notes_train.bin")
    _, tail, _ = cache(folder, "streams", "notes_val.bin")  # notes.txt is one document: val holds its end
    assert meta["added_tokens"] == [] and "added <|" not in said
    assert meta["vocab_size"] == {"qwen3": 151669, "llama3": 128256}[name]
    doc_end = {"qwen3": 151643, "llama3": 128001}[name]
    assert tail[-1] == doc_end and meta["special_tokens"]["<|endoftext|>"] == doc_end
    assert (tokens[0] == 128000) == (name == "llama3") and meta.get("bos_ids", []) == (
        [128000] if name == "llama3" else []
    )
    config = json.loads((folder / "out" / "config.json").read_text())
    assert config["vocab_size"] == ROWS[name]  # never grown


def test_cached_sft_examples_are_apply_chat_templates_tokens_and_the_loss_counts_what_the_model_writes(trained):
    """Every cached example equals transformers' apply_chat_template on the same messages (system messages,
    two-turn conversations and trimmed contents included); the loss counts what the model must write after the
    generation header: Qwen3's empty think block in the last turn, the answer and its end-of-turn token."""
    name, folder, _ = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "model")
    expected = [
        tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, **TEMPLATE_KWARGS[name])["input_ids"]
        for c in conversations(folder)
    ]
    cached = []
    for split in ("train", "val"):
        meta, tokens, starts = cache(folder, "sft", f"qa_{split}.bin")
        cached += [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    assert len(cached) == len(expected) == 42
    assert sorted(cached) == sorted(expected)
    two_turn = next(ids for ids in cached if len(ids) == max(map(len, cached)))
    counted = answer_mask(np.array([two_turn]), answer_rule(meta))[0]
    shown = tokenizer.decode([t for t, c in zip(two_turn[1:], counted) if c])
    end = {"qwen3": "<|im_end|>", "llama3": "<|eot_id|>"}[name]
    assert (
        shown
        == {
            "qwen3": f"Hello!{end}<think>\n\n</think>\n\n Animal 3 eats plums. {end}",  # lstrip("\\n")
            "llama3": f"Hello!{end}Animal 3 eats plums.{end}",
        }[name]
    )


def test_a_context_below_the_maximum_trains_and_the_export_keeps_the_models_own(trained):
    """T=64 / 128 trains against a maximum of 40,960 / 131,072; the export keeps the maximum, the rope settings, the
    tokenizer files, the stop ids and the recommended sampling the model came with, says what training changed,
    and computes in transformers the logits our best.pt computes."""
    name, folder, said = trained
    config = json.loads((folder / "out" / "config.json").read_text())
    own = json.loads((folder / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == MAXIMUM[name] == own["max_position_embeddings"]
    for key in ("rope_theta", "rope_scaling", "bos_token_id"):
        assert config.get(key) == own.get(key), key
    assert (folder / "out" / "tokenizer.json").read_bytes() == (folder / "model" / "tokenizer.json").read_bytes()
    exported = json.loads((folder / "out" / "tokenizer_config.json").read_text())
    theirs = json.loads((folder / "model" / "tokenizer_config.json").read_text())
    for key in (
        "bos_token",
        "pad_token",
        "tokenizer_class",
        "model_max_length",
        "additional_special_tokens",
        "add_bos_token",
        "chat_template",
    ):
        assert exported.get(key) == theirs.get(key), key
    generation = json.loads((folder / "out" / "generation_config.json").read_text())
    if name == "qwen3":
        assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
        assert generation["eos_token_id"] == [151645, 151643] and exported["eos_token"] == "<|im_end|>"
    else:  # a base model trained to end its answers with <|eot_id|>: said, and a stop id
        assert generation["eos_token_id"] == [128001, 128009] and exported["eos_token"] == "<|eot_id|>"
        assert "eos_token '<|end_of_text|>' -> '<|eot_id|>'" in said
    assert "chat template in the export: the model's own" in said

    blob = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    assert blob["model_cfg"]["T"] == CONTEXT[name] and blob["model_cfg"]["max_positions"] == MAXIMUM[name]
    ours = GPT(ModelConfig(**blob["model_cfg"]))
    ours.load_state_dict(blob["model_state"])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "out").eval()
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(folder / "out")("Animal 7 eats fish.").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ours.eval()(ids), atol=1e-4)


def greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    """transformers' greedy continuation with the export's own generation config (its stop ids)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "out").eval()
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_generate_encodes_and_stops_as_transformers_does(trained):
    """A plain prompt gets the model's BOS as `tokenizer(p)` gives it (Llama 3), a chat prompt the template's tokens,
    and a completion stops where transformers' generate stops with the same files (Qwen's <|im_end|>, a stop id of
    its generation_config.json, even in a plain completion)."""
    name, folder, _ = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "out")
    stops = json.loads((folder / "out" / "generation_config.json").read_text())["eos_token_id"]
    for chat, prompt in ((False, "What does animal 7 eat?"), (True, "What does animal 12 eat?")):
        r = run_cli(
            "generate",
            "--model",
            "out",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "24",
            *(["--chat"] * chat),
            *ARGS[name],
            cwd=folder,
        )
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        ids = (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **TEMPLATE_KWARGS[name],
            )["input_ids"]
            if chat
            else tokenizer(prompt).input_ids
        )
        assert record["prompt_tokens"] == len(ids)
        theirs = greedy(folder, ids, 24)
        stopped = bool(theirs) and theirs[-1] in stops
        assert record["finish_reason"] == ("stop" if stopped else "length"), (record, theirs)
        assert record["completion_tokens"] == len(theirs)
        assert record["completion"] == tokenizer.decode(theirs[:-1] if stopped else theirs)
    assert stopped  # the chat answer ended at the end-of-turn token, as trained


def test_chat_answers_as_transformers_does_in_the_models_template(trained):
    name, folder, _ = trained
    r = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--model", "out", *ARGS[name]],
        cwd=folder,
        input="What does animal 12 eat?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "out")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does animal 12 eat?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        **TEMPLATE_KWARGS[name],
    )["input_ids"]
    assert r.stdout.strip() == tokenizer.decode(greedy(folder, ids, 256), skip_special_tokens=True).strip()


def test_runs_lineage_names_the_model_directory_the_run_started_from(trained):
    name, folder, _ = trained
    r = run_cli("runs", "lineage", "checkpoints/best.pt", cwd=folder)
    assert r.returncode == 0, r.stderr
    start = [line for line in r.stdout.splitlines() if line.startswith("huggingface")]
    assert len(start) == 1 and str(folder / "model") in start[0] and "(gone)" not in r.stdout, r.stdout
