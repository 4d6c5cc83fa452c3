"""Out to Hugging Face transformers and back: `export --format hf`, and `init_from` a GPT-2 directory.

transformers is a test dependency only: these tests load what the trainer wrote with the library everyone else
uses, and give the trainer what that library writes.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
from conftest import TINY_MODEL, edit_sidecar, run_cli, write_config
from safetensors.torch import load_file

from trainer_accel import export
from trainer_accel.checkpoints import loading, writing
from trainer_accel.checkpoints.full_state import tied_aliases
from trainer_accel.config import ModelConfig, SamplePrompt
from trainer_accel.data.cache import open_cache
from trainer_accel.data.chat_template import ChatFormat
from trainer_accel.data.tokenizer import (
    ASST,
    ByteTokenizer,
    HFTokenizer,
    encode_chat,
    encode_chat_prompt,
)
from trainer_accel.faults import HF_EXPORT_POINTS
from trainer_accel.models.generation import generate
from trainer_accel.models.gpt import GPT
from trainer_accel.observability.samples import sample_text
from trainer_accel.training.start import load_start

transformers.logging.set_verbosity_error()
MIXED = "Plain ASCII, accents: é à ü ñ, emoji 🙂🚀\nnew line\n\n  indented\ta typed <|user|> and <|eot|> stay text"


def randomised(model: GPT, seed: int) -> GPT:
    """Weights far from the near-uniform initialisation, so greedy choices are clear and every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == model.cfg.C else 0.0)
            )
    return model.eval()


def write_tiny_checkpoint(path, model: GPT, phase: str = "sft", **meta):
    """A checkpoint directory as the loop writes one (byte tokenizer), without training."""
    opt = torch.optim.AdamW(model.parameters())
    return writing.write_checkpoint(
        path,
        model.state_dict(),
        tied_aliases(model),
        opt.state_dict(),
        {
            "phase": phase,
            "run_id": "r1",
            "step": 3,
            "best_val_loss": 1.5,
            "model_cfg": model.cfg.to_dict(),
            "train_cfg": {"B": 4},
            "tokenizer": "byte-v1",
            "tokenizer_path": None,
            **meta,
        },
    )


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize(
    "options",
    [
        {},  # today's default: no biases, tied head, exact GELU
        {"bias": True, "tie_embeddings": False, "activation": "gelu_tanh", "ln_eps": 1e-6},
    ],
    ids=["bias-free-tied", "gpt2-like-untied"],
)
def test_export_gives_transformers_the_same_logits_and_greedy_tokens(tmp_path, monkeypatch, options):
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(**{**TINY_MODEL, **options})
    ours = randomised(GPT(cfg), seed=1)
    write_tiny_checkpoint(tmp_path / "ck", ours)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_accel_export.json",
    ]
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not cfg.tie_embeddings)  # a tied head is stored once
    if not cfg.bias:
        assert not stored["transformer.h.0.attn.c_attn.bias"].any() and not stored["transformer.ln_f.bias"].any()

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    hf.eval()
    config = hf.config
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions, config.vocab_size) == (32, 2, 2, 32, 260)
    assert config.tie_word_embeddings == cfg.tie_embeddings and config.layer_norm_epsilon == cfg.ln_eps
    g = torch.Generator().manual_seed(0)
    for T in (1, 7, 32):
        ids = torch.randint(0, cfg.V, (3, T), generator=g)
        with torch.no_grad():
            diff = (ours(ids) - hf_logits(hf, ids)).abs().max().item()
        assert diff < 1e-5, (T, diff)

    prompt = torch.randint(0, 256, (1, 5), generator=g)
    mine = generate(ours, prompt, 20, temperature=0)[0, 5:].tolist()
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=256,
    )[0, 5:].tolist()
    assert theirs == mine and len(mine) == 20


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A byte-level BPE trained here (no download), with merges that cross the words of MIXED."""
    import tokenizers

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(
        [MIXED * 3, "the cat sat on the mat " * 20],
        tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(path))
    return path


@pytest.mark.parametrize("which", ["bytes", "tokenizer.json"])
def test_the_exported_tokenizer_gives_our_ids_and_our_chat_format(tmp_path, monkeypatch, bpe_json, which):
    monkeypatch.chdir(tmp_path)
    if which == "bytes":
        tok, extra = ByteTokenizer(), {}
    else:
        tok = HFTokenizer(bpe_json, chat_tokens=True)  # as prepare reads a tokenizer with no chat template
        extra = {"tokenizer": tok.identity, "tokenizer_path": str(bpe_json), "added_tokens": list(tok.added)}
    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**{**TINY_MODEL, "V": 320})), **extra)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")

    ids = tok.encode(MIXED)
    assert theirs(MIXED, add_special_tokens=False, split_special_tokens=True).input_ids == ids
    assert theirs.decode(ids) == MIXED == tok.decode(ids)
    assert len(ids) < len(MIXED.encode()) if which != "bytes" else ids == list(MIXED.encode())
    for name, i in tok.special.items():  # the special tokens have our ids both ways
        assert theirs.convert_tokens_to_ids(name) == i and theirs.decode([i]) == name

    question, answer = "Where does the kestrel live? é🙂", "On the cliffs."
    prompt = theirs.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
    ).input_ids
    assert prompt == encode_chat_prompt(tok, question)
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}] * 2
    full = theirs.apply_chat_template(turns, tokenize=True, return_dict=True).input_ids
    assert full == encode_chat(tok, [(question, answer)] * 2)
    assert theirs.eos_token == "<|eot|>" and theirs.pad_token == "<|endoftext|>"
    system = [{"role": "system", "content": "be brief"}]  # at the start of the first user message, as SFT wrote it
    assert theirs.apply_chat_template(
        system + turns[:1], add_generation_prompt=True, tokenize=True, return_dict=True
    ).input_ids == ChatFormat(tok).prompt(question, (), "be brief")
    assert ChatFormat(tok).prompt(question, (), "be brief") == encode_chat_prompt(tok, "be brief\n\n" + question)
    with pytest.raises(Exception, match="user and assistant turns .after one system message. only"):
        theirs.apply_chat_template(turns[:2] + system, tokenize=False)


def test_an_sft_model_answers_through_the_pipeline_as_through_our_sampler(world):
    """The user's way: SFT, export the newest best with one command, ask transformers' pipeline. A few steps of
    SFT from strong random weights: a tiny model trained that briefly from scratch answers only spaces, which
    would not show that every byte of an answer comes through."""
    model = {**TINY_MODEL, "T": 128}  # a demo question and its answer fit
    write_tiny_checkpoint(world / "start", randomised(GPT(ModelConfig(**model)), seed=3), phase="pretrain")
    write_config(
        world / "sft.json",
        "sft",
        {"total_steps": 4, "eval_every": 4, "ckpt_every": 4, "base_lr": 1e-4, "min_lr": 1e-5},
        model_cfg=model,
        init_from=str(world / "start"),
    )
    assert run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=world).returncode == 0
    done = run_cli("export", "--format", "hf", cwd=world)
    assert done.returncode == 0, done.stderr
    assert "exported checkpoints/hf (Hugging Face transformers) from checkpoints/sft/best (step 4" in done.stderr

    tok = ByteTokenizer()
    held_out = open_cache(world / "data" / "cache" / "sft" / "dolly_val.bin", "sft")
    example = held_out.tokens[held_out.starts[0] : held_out.starts[1]].tolist()
    question = tok.decode(example[1 : example.index(tok.special[ASST])])
    assert question.endswith("?")

    loaded = loading.load_checkpoint(world / "checkpoints" / "sft" / "best", with_optimizer=False)
    ours = GPT(ModelConfig(**loaded.meta["model_cfg"]))
    ours.load_state_dict(loaded.model_state)
    budget = 128 - len(encode_chat_prompt(tok, question))
    expected = sample_text(ours, tok, SamplePrompt(question, max_new_tokens=budget, temperature=0.0, task="chat"), 0)
    chat = transformers.pipeline("text-generation", model=str(world / "checkpoints" / "hf"), device="cpu")
    reply = chat([{"role": "user", "content": question}], max_new_tokens=budget, do_sample=False)
    assert len(set(expected)) > 10  # many different characters, none lost on the way
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": expected}


def test_export_refuses_what_it_cannot_write_exactly_and_keeps_what_is_there(tmp_path, monkeypatch, capsys, bpe_json):
    monkeypatch.chdir(tmp_path)
    model = GPT(ModelConfig(**TINY_MODEL))
    write_tiny_checkpoint(tmp_path / "future", model)
    # an option a later trainer may have, which GPT-2 has no place for
    edit_sidecar(tmp_path / "future", lambda meta: meta["model_cfg"].update(rope=True))
    assert export.main(["--format", "hf", "--checkpoint", "future", "--out", "hf"]) == 2
    assert "model_cfg.rope=true has no GPT-2 equivalent; not exported" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))

    write_tiny_checkpoint(tmp_path / "ck", model)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "mine"]) == 2
    assert "--out mine: a directory with other files in it" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]

    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0  # new, then replaced
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not list(tmp_path.glob(".*hf*"))

    write_tiny_checkpoint(
        tmp_path / "moved", model, tokenizer="hf-0123456789abcdef", tokenizer_path="gone/tokenizer.json"
    )
    assert export.main(["--format", "hf", "--checkpoint", "moved", "--out", "hf2"]) == 2
    assert (
        "its tokenizer.json (hf-0123456789abcdef) is not at gone/tokenizer.json; pass the file the caches were "
        "made with as --tokenizer PATH"
    ) in capsys.readouterr().err
    moved = HFTokenizer(bpe_json)  # a tokenizer.json that moved after training: --tokenizer names it, checked
    write_tiny_checkpoint(
        tmp_path / "moved",
        GPT(ModelConfig(**{**TINY_MODEL, "V": 320})),
        tokenizer=moved.identity,
        tokenizer_path="gone/tokenizer.json",
    )
    assert export.main(["--format", "hf", "--checkpoint", "moved", "--out", "hf2", "--tokenizer", str(bpe_json)]) == 0
    (tmp_path / "edited.json").write_text(json.dumps(json.loads(bpe_json.read_text())))  # the same, other bytes
    assert export.main(["--format", "hf", "--checkpoint", "moved", "--out", "hf2", "--tokenizer", "edited.json"]) == 2
    assert (
        f"but the checkpoint was trained on {moved.identity} (another file, or this one changed)"
        in capsys.readouterr().err
    )


def test_a_re_export_replaces_only_what_an_export_writes(tmp_path, monkeypatch, caplog):
    """A README.md or lm-eval's eval_results/ beside an earlier export used to be deleted by the next export."""
    from trainer_accel.hf.export import EXPORT_FILES

    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO")
    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    # what an export writes, all of it (one weights file: the shard index only comes with shards)
    assert {p.name for p in (tmp_path / "hf").iterdir()} == EXPORT_FILES - {"model.safetensors.index.json"}
    (tmp_path / "hf" / "README.md").write_text("# my model card")
    (tmp_path / "hf" / "eval_results" / "run1").mkdir(parents=True)
    (tmp_path / "hf" / "eval_results" / "run1" / "results.json").write_text('{"acc": 0.5}')
    (tmp_path / "hf" / "config.json").write_text("{}")  # ours to replace
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    assert "hf: kept README.md, eval_results (not written by an export)" in caplog.text
    assert (tmp_path / "hf" / "README.md").read_text() == "# my model card"
    assert (tmp_path / "hf" / "eval_results" / "run1" / "results.json").read_text() == '{"acc": 0.5}'
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert not list(tmp_path.glob(".*hf*"))


@pytest.mark.parametrize(
    "record",
    [
        "{}",
        "not json",
        '{"format": "trainer_accel.export.hf"}',
        "[1, 2]",
        '{"format": "trainer_accel.export.hf", "step": "3", "model_cfg": {}, "exported_at": "x", "source": "y"}',
    ],
)
def test_a_directory_with_a_record_that_is_not_ours_is_left_alone(tmp_path, monkeypatch, capsys, record):
    """`echo {} > d/trainer_accel_export.json` made any directory an "earlier export", replaced whole."""
    monkeypatch.chdir(tmp_path)
    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "trainer_accel_export.json").write_text(record)
    (tmp_path / "d" / "thesis.tex").write_text("three years")
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "d"]) == 2
    err = capsys.readouterr().err
    assert "--out d: trainer_accel_export.json" in err and "thesis.tex" in err and "nothing was written" in err, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["thesis.tex", "trainer_accel_export.json"]
    assert (tmp_path / "d" / "thesis.tex").read_text() == "three years"


@pytest.mark.parametrize("point", HF_EXPORT_POINTS)
def test_a_killed_hf_export_leaves_the_earlier_one_whole_and_the_next_cleans_up(tmp_path, point):
    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    args = ("export", "--format", "hf", "--checkpoint", "ck", "--out", "hf")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    killed = run_cli(*args, cwd=tmp_path, env={"TRAINER_FAULT": point})
    assert killed.returncode == -9, killed.stderr
    if (tmp_path / "hf").exists():  # killed before the swap: the earlier export, whole; between its renames: none
        assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == earlier
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]  # leftovers swept
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # a whole export, every weight in it


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> ours

GPT2_TINY = {"V": 260, "T": 32, "C": 32, "L": 2, "H": 2, "d_ff": 128, "bias": True, "activation": "gelu_tanh"}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel as transformers saves one (no download); its biases made non-zero."""
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=260, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=256, eos_token_id=256
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


def our_model_from(path, **options) -> GPT:
    cfg = ModelConfig(**{**GPT2_TINY, **options})
    loaded = load_start(path, cfg, with_optimizer=False)
    model = GPT(cfg)
    model.load_state_dict(loaded.model_state, strict=True)
    return model.eval()


def test_a_transformers_gpt2_gives_the_same_logits_in_our_model(gpt2_dir, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (our_model_from(gpt2_dir)(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-5

    legacy = tmp_path / "legacy"  # the older layout: pytorch_model.bin, no `transformer.` prefix, mask buffers
    legacy.mkdir()
    shutil.copy(gpt2_dir / "config.json", legacy)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril().bool() for i in range(2)}
    torch.save(state, legacy / "pytorch_model.bin")
    with torch.no_grad():
        assert (our_model_from(legacy)(ids) - hf_logits(hf, ids)).abs().max().item() < 1e-5

    grown = our_model_from(gpt2_dir, V=264)  # room for tokens the checkpoint lacks: its own logits unchanged
    with torch.no_grad():
        assert (grown(ids)[..., :260] - hf_logits(hf, ids)).abs().max().item() < 1e-5
        assert torch.equal(grown.tok_emb.weight[260], grown.tok_emb.weight[:260].mean(0))

    torch.save({"weights": torch.zeros(2), "code": print}, legacy / "pytorch_model.bin")  # not plain tensors
    with pytest.raises(
        Exception,
        match="holds more than tensors, so it is not loaded .loading it would run code in it: .*Unsupported global",
    ):
        load_start(legacy, None, with_optimizer=False)


def test_shards_come_only_from_beside_their_index_and_each_is_hashed(gpt2_dir, tmp_path):
    """An index could name ../other/model.safetensors and it was loaded; only the index was hashed, so a swapped
    shard kept the weights' identity."""
    from safetensors.torch import load_file, save_file

    from trainer_accel.errors import UserError
    from trainer_accel.hf.directory import weights_sha256

    def sharded(where, names):
        where.mkdir()
        shutil.copy(gpt2_dir / "config.json", where)
        state = load_file(str(gpt2_dir / "model.safetensors"))
        keys = sorted(state)
        halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2 :]}
        for name, part in halves.items():
            if "/" not in name:
                save_file({k: state[k] for k in part}, str(where / name))
        weight_map = {k: name for name, part in halves.items() for k in part}
        (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return where

    good = sharded(tmp_path / "good", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(our_model_from(good)(ids), our_model_from(gpt2_dir)(ids))
    before = weights_sha256(good)
    other = load_file(str(good / "model-00002-of-00002.safetensors"))
    save_file({k: v + 1 for k, v in other.items()}, str(good / "model-00002-of-00002.safetensors"))
    assert weights_sha256(good) != before  # a swapped shard is other weights

    (tmp_path / "other").mkdir()
    shutil.copy(good / "model-00002-of-00002.safetensors", tmp_path / "other" / "model.safetensors")
    escaping = sharded(tmp_path / "escaping", ["model-00001-of-00002.safetensors", "../other/model.safetensors"])
    with pytest.raises(UserError, match=r"shard '../other/model.safetensors' is not a file name beside the index"):
        load_start(escaping, None, with_optimizer=False)
    (escaping / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(UserError, match='"weight_map" must be an object of tensor name -> shard file name, got list'):
        load_start(escaping, None, with_optimizer=False)


def test_sft_from_a_gpt2_directory_exports_back_with_the_trained_weights(world, gpt2_dir, bpe_json):
    write_config(world / "bad.json", "sft", init_from=str(gpt2_dir))  # today's defaults: no biases, exact GELU
    done = run_cli("run", "--phase", "sft", "--config", "bad.json", cwd=world)
    assert done.returncode == 2
    where = f"{gpt2_dir}/config.json"
    assert (
        f"error: {where}: n_inner (4 x n_embd when null) is 128 there, model_cfg.d_ff is 64 (set model_cfg.d_ff to 128)"
    ) in done.stderr
    assert (
        f"error: {where}: GPT-2 layers have biases, model_cfg.bias is false (set model_cfg.bias to true)" in done.stderr
    )
    assert f'error: {where}: activation_function is "gelu_new" there, model_cfg.activation is "gelu"' in done.stderr
    assert not (world / "checkpoints" / "sft").exists() or not any((world / "checkpoints" / "sft").iterdir())

    other = world / "gpt2-own-tokenizer"  # a GPT-2 whose tokenizer.json is not the one the caches were made with
    shutil.copytree(gpt2_dir, other)
    shutil.copy(bpe_json, other / "tokenizer.json")
    write_config(world / "other.json", "sft", model_cfg=GPT2_TINY, init_from=str(other))
    for plan in ([], ["--plan"]):
        done = run_cli("run", "--phase", "sft", "--config", "other.json", *plan, cwd=world)
        assert done.returncode == 2
        assert (
            f"{other}: its weights learnt the ids of tokenizer {HFTokenizer(bpe_json).identity}, this phase's "
            "caches were made with byte-v1"
        ) in done.stdout + done.stderr

    write_config(
        world / "pre.json",
        "pretrain",
        {"total_steps": 2, "eval_every": 2, "ckpt_every": 2},
        model_cfg=GPT2_TINY,
        init_from=str(gpt2_dir),
    )  # continued pretraining starts from it too
    done = run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world)
    assert done.returncode == 0 and f"initialised weights from {gpt2_dir} (step 0" in done.stderr, done.stderr

    write_config(
        world / "sft.json",
        "sft",
        {"total_steps": 4, "eval_every": 4, "ckpt_every": 4},
        model_cfg=GPT2_TINY,
        init_from=str(gpt2_dir),
    )
    done = run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=world)
    assert done.returncode == 0, done.stderr
    assert f"initialised weights from {gpt2_dir} (step 0" in done.stderr
    assert f"eval summary of checkpoints/sft/best against {gpt2_dir}:" in done.stderr  # the gate's baseline: its start
    assert "verdict: pass" in done.stderr
    assert run_cli("export", "--format", "hf", "--out", "back", cwd=world).returncode == 0

    trained = loading.load_checkpoint(world / "checkpoints" / "sft" / "best", with_optimizer=False).model_state
    start = load_start(gpt2_dir, None, with_optimizer=False).model_state
    assert not torch.equal(trained["blocks.0.mlp.up.weight"], start["blocks.0.mlp.up.weight"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(world / "back").eval()
    assert torch.equal(reloaded.transformer.h[0].mlp.c_fc.weight, trained["blocks.0.mlp.up.weight"].t())
    assert torch.equal(reloaded.transformer.h[1].attn.c_attn.bias, trained["blocks.1.attn.qkv.bias"])
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(2))
    ours = our_model_from(world / "checkpoints" / "sft" / "best")
    with torch.no_grad():
        assert (ours(ids) - hf_logits(reloaded, ids)).abs().max().item() < 1e-5


def test_a_pt_without_its_record_exports_to_hf_when_told_its_tokenizer(tmp_path, monkeypatch, capsys, caplog):
    """It used to say "an export made before tokenizers were recorded" with no way out, even for the byte
    tokenizer, which has no file to pass."""
    monkeypatch.chdir(tmp_path)
    model = randomised(GPT(ModelConfig(**TINY_MODEL)), seed=2)
    write_tiny_checkpoint(tmp_path / "ck", model)
    assert export.main(["--checkpoint", "ck", "--out", "model.pt"]) == 0
    (tmp_path / "model.pt.json").unlink()  # the record is gone: nothing says which tokenizer the model learnt
    capsys.readouterr()
    assert export.main(["--format", "hf", "--checkpoint", "model.pt", "--out", "hf"]) == 2
    assert "or --tokenizer bytes for the built-in byte tokenizer" in capsys.readouterr().err
    assert export.main(["--format", "hf", "--checkpoint", "model.pt", "--out", "hf", "--tokenizer", "bytes"]) == 0
    assert "records no tokenizer; exported with the built-in byte tokenizer" in caplog.text
    assert "records neither its phase nor the chat template it was trained in" in caplog.text  # nor is it silent
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5


def test_a_second_export_to_the_same_out_is_refused_while_the_first_writes(tmp_path, monkeypatch, capsys):
    """By reading: the second export's sweep deleted the first one's temporary directory."""
    from trainer_accel.fsio import held_alone

    monkeypatch.chdir(tmp_path)
    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    with held_alone(tmp_path / ".hf.export.lock", "held by this test"):  # as a first export holds it
        assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 2
    assert f"--out hf: another export is writing there; wait for it (pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0  # free again
