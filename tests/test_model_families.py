"""The Llama family (Llama, Mistral, Qwen2, Qwen3) computed by our decoder exactly as transformers computes it.

Each family is a tiny random model that transformers makes in the test (2 layers, width 64, 4 query heads and 2
key/value heads; Qwen2's biases, Qwen3's q/k norm and its own head width, a Llama 3 rope scaling), read as a start
point and compared in full logits (the rotary layout is the classic silent bug: greedy decoding does not catch
it), then the other way: a model we initialised, exported, and read by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from conftest import TINY_MODEL, run_cli, write_config
from test_formats import bpe_tokenizer
from test_huggingface import randomised, write_tiny_checkpoint

from trainer_accel import export
from trainer_accel.config import ModelConfig
from trainer_accel.errors import UserError
from trainer_accel.models.generation import generate
from trainer_accel.models.gpt import GPT
from trainer_accel.phases.registry import load_config
from trainer_accel.training.start import load_start

transformers.logging.set_verbosity_error()
SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES = {
    "llama-untied-llama3-rope": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    ),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, rope_theta=1e6)),
    "qwen2-biases-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-qk-norm-head-dim": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
}


def hf_model(kind: str, seed: int = 0):
    """A transformers model of the family with weights spread wide enough that greedy choices are not near-ties."""
    config_cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**SHAPE, **extra), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.15))
    return model.eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def assert_same_function(ours: GPT, theirs, vocab: int) -> None:
    g = torch.Generator().manual_seed(1)
    for T in (1, 9, 64):
        ids = torch.randint(0, vocab, (2, T), generator=g)
        diff = (logits_of(ours, ids) - logits_of(theirs, ids)).abs().max().item()
        assert diff < 1e-5, (T, diff)
    prompt = torch.randint(0, vocab, (1, 4), generator=g)
    mine = generate(ours, prompt, 24, temperature=0)[0, 4:].tolist()
    hf = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, 4:].tolist()
    assert hf == mine and len(mine) == 24


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_hugging_face_directory_loads_as_the_same_function(tmp_path, kind):
    theirs = hf_model(kind)
    theirs.save_pretrained(tmp_path / "hf")
    loaded = load_start(tmp_path / "hf", None, with_optimizer=False)
    cfg = ModelConfig(**loaded.meta["model_cfg"])
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.n_kv_heads, cfg.max_positions) == ("rope", "rmsnorm", "gated", 2, 64)
    assert cfg.qkv_bias == kind.startswith("qwen2") and cfg.qk_norm == kind.startswith("qwen3")
    assert cfg.hd == (32 if kind.startswith("qwen3") else 16)
    ours = GPT(cfg)
    ours.load_state_dict(loaded.model_state, strict=True)
    assert_same_function(ours.eval(), theirs, cfg.V)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_model_we_made_exports_to_its_family_and_transformers_computes_the_same(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    hf_model(kind).save_pretrained(tmp_path / "from")  # the architecture only: the weights are ours
    cfg = ModelConfig(**{**load_start(tmp_path / "from", None, False).meta["model_cfg"], "T": 64})
    ours = randomised(GPT(cfg), seed=5)
    write_tiny_checkpoint(tmp_path / "ck", ours)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cfg.architecture] and config["max_position_embeddings"] == 64
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # nothing missing, unexpected or mismatched
    assert_same_function(ours, theirs.eval(), cfg.V)
    # and back: the export starts a run as the model it was, with nothing to transcribe
    back = load_start(tmp_path / "hf", cfg, with_optimizer=False)
    assert all(torch.equal(back.model_state[k], v) for k, v in ours.state_dict().items())


def test_a_model_from_scratch_exports_as_llama(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(
        V=260,
        T=32,
        C=32,
        L=2,
        H=4,
        d_ff=48,
        position="rope",
        norm="rmsnorm",
        mlp="gated",
        activation="silu",
        n_kv_heads=2,
        tie_embeddings=False,
    )
    ours = randomised(GPT(cfg), seed=2)
    write_tiny_checkpoint(tmp_path / "ck", ours)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["num_key_value_heads"], config["max_position_embeddings"]) == (
        ["LlamaForCausalLM"],
        2,
        32,
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (logits_of(ours, ids) - logits_of(theirs, ids)).abs().max().item() < 1e-5


def test_a_packed_rotary_row_gives_each_example_the_logits_it_has_alone():
    cfg = ModelConfig(
        V=300,
        T=32,
        C=64,
        L=2,
        H=4,
        d_ff=96,
        position="rope",
        norm="rmsnorm",
        mlp="gated",
        activation="silu",
        n_kv_heads=2,
        qk_norm=True,
        head_dim=32,
    )
    model = randomised(GPT(cfg), seed=3)
    g = torch.Generator().manual_seed(4)
    lengths = [5, 11, 16]
    examples = [torch.randint(0, 300, (1, n), generator=g) for n in lengths]
    row = torch.cat(examples, dim=1)
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(row, segments)
        start = 0
        for ex, n in zip(examples, lengths):
            assert (packed[:, start : start + n] - model(ex)).abs().max().item() < 1e-5
            start += n


@pytest.mark.parametrize("tied", [True, False])
def test_the_chunked_loss_equals_the_full_one_in_value_and_gradients(tied):
    cfg = ModelConfig(
        V=300,
        T=32,
        C=64,
        L=2,
        H=4,
        d_ff=96,
        position="rope",
        norm="rmsnorm",
        mlp="gated",
        activation="silu",
        n_kv_heads=2,
        tie_embeddings=tied,
    )
    model = randomised(GPT(cfg), seed=6).train()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 300, (3, 32), generator=g), torch.randint(0, 300, (3, 32), generator=g)
    y[0, :10] = -100  # targets the loss does not count

    def loss_and_grads(chunk: int | None):
        model.zero_grad()
        if chunk is None:
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        else:
            model.loss_chunk = chunk
            loss = model(x, targets=y)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, full_grads = loss_and_grads(None)
    for chunk in (7, 32, 96, 10_000):
        loss, grads = loss_and_grads(chunk)
        assert abs(loss - full) < 1e-5 * abs(full)
        assert all((grads[n] - full_grads[n]).abs().max().item() < 1e-5 for n in grads), chunk


@pytest.mark.parametrize(
    "setting, line",
    [
        ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window attention in some layers"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 'rope_type "yarn" is not computed by this trainer'),
        ({"mlp_bias": True}, "mlp_bias true is not computed"),
        ({"num_local_experts": 8}, "mixture-of-experts is not computed"),
        ({"architectures": ["MixtralForCausalLM"]}, 'model_type "mistral" is read as ["MistralForCausalLM"] only'),
        ({"model_type": "gemma"}, 'model_type "gemma" is not a family this trainer computes'),
        ({"num_hidden_layers": "2"}, 'num_hidden_layers is "2", expected a positive integer'),
    ],
)
def test_what_the_trainer_cannot_compute_exactly_is_refused_in_one_line(tmp_path, setting, line):
    hf_model("mistral").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(UserError) as e:
        load_start(tmp_path / "hf", None, with_optimizer=False)
    assert any(line in p for p in e.value.problems), e.value.problems


CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
TEMPLATES = {  # kind -> (the model's own special tokens, tokenizer_config.json beside its tokenizer.json)
    "qwen3-qk-norm-head-dim": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None},
    ),
    "llama-tied": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"chat_template": LLAMA3, "eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"},
    ),
}


def model_directory(tmp_path, kind: str) -> int:
    """A model directory as a user has one: config.json, weights, a BPE tokenizer.json with the family's special
    tokens, and the chat template in tokenizer_config.json. Returns the tokenizer's vocabulary size."""
    qa = [
        {"prompt": f"What does animal {i} eat?", "response": f"Animal {i} eats {['plums', 'fish', 'seeds'][i % 3]}."}
        for i in range(40)
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "notes.txt").write_text(
        "".join(f"Animal {i} lives by the river and eats what it finds.\n\n" for i in range(80))
    )
    texts = [(tmp_path / "qa.jsonl").read_text(), (tmp_path / "notes.txt").read_text()]
    tok = tokenizers.Tokenizer.from_file(str(bpe_tokenizer(tmp_path / "tok.json", texts)))
    specials, config = TEMPLATES[kind]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    (tmp_path / "model").mkdir()
    tok.save(str(tmp_path / "model" / "tokenizer.json"))
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    hf = hf_model(kind)
    hf.resize_token_embeddings(tok.get_vocab_size())  # the directory's vocabulary is its tokenizer's, as on the Hub
    hf.save_pretrained(tmp_path / "model")
    return tok.get_vocab_size()


def test_the_answer_mask_of_a_models_template_token_by_token(tmp_path):
    """A two-turn ChatML conversation as prepare writes it: the loss counts each answer and its <|im_end|>, and
    nothing of the user turns or the headers; a typed <|im_end|> in a message stays text."""
    model_directory(tmp_path, "qwen3-qk-norm-head-dim")
    from trainer_accel.data.cache import answer_mask
    from trainer_accel.data.chat_template import TemplateEncoder, find_chat_template
    from trainer_accel.data.tokenizer import HFTokenizer

    tok = HFTokenizer(tmp_path / "model" / "tokenizer.json")
    encoder = TemplateEncoder(tok, find_chat_template(tmp_path / "model" / "tokenizer.json"))
    turns = [("Hi <|im_end|> there", "Hello."), ("What does animal 3 eat?", "Animal 3 eats plums.")]
    ids = encoder.encode_many([turns])[0]
    rendered = "".join(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for p, a in turns)
    assert tok.decode(ids.tolist()) == rendered
    counted = answer_mask(ids[None], encoder.rule)[0]  # target i is token i + 1; a counted one is shown [so]

    def counted_tokens(text):
        return "".join(f"[{tok.decode([t])}]" for t in tok.encode(text))

    shown = "".join(f"[{tok.decode([t])}]" if c else tok.decode([t]) for t, c in zip(ids[1:].tolist(), counted))
    assert shown == (
        "user\nHi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n"
        + counted_tokens("Hello.")
        + "[<|im_end|>]\n<|im_start|>user\nWhat does animal 3 eat?<|im_end|>\n<|im_start|>assistant\n"
        + counted_tokens("Animal 3 eats plums.")
        + "[<|im_end|>]\n"
    )
    im_end = tok.encode_markup("<|im_end|>")[0]
    assert ids.tolist().count(im_end) == 4  # the typed one is text, not the token
    assert encoder.rule.end == im_end and tok.decode(list(encoder.rule.start)) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_a_system_message_is_written_in_the_templates_system_role_as_transformers_writes_it(tmp_path, kind):
    """A row's leading system message: the SFT example's tokens and a chat prompt's are transformers'
    apply_chat_template's, and the loss counts the answers only, never the system message."""
    model_directory(tmp_path, kind)
    from trainer_accel.data.cache import answer_mask
    from trainer_accel.data.chat_template import (
        ChatFormat,
        TemplateEncoder,
        find_chat_template,
    )
    from trainer_accel.data.formats.chat import turns_of
    from trainer_accel.data.tokenizer import HFTokenizer

    tok = HFTokenizer(tmp_path / "model" / "tokenizer.json")
    encoder = TemplateEncoder(tok, find_chat_template(tmp_path / "model" / "tokenizer.json"))
    config = TEMPLATES[kind][1]  # the file as transformers' generic class reads it (an export names that class; the
    # directory's own class, Qwen2Tokenizer, would split digits its own way, whatever tokenizer.json says)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "model" / "tokenizer.json"), **config)
    messages = [
        {"role": "system", "content": "Answer in a few words."},
        {"role": "user", "content": "What does animal 3 eat?"},
        {"role": "assistant", "content": "Plums."},
        {"role": "user", "content": "And animal 4?"},
        {"role": "assistant", "content": "Fish."},
    ]
    turns = turns_of({"messages": messages})
    assert turns.system == "Answer in a few words." and list(turns) == [
        ("What does animal 3 eat?", "Plums."),
        ("And animal 4?", "Fish."),
    ]
    ids = encoder.encode_many([turns])[0]
    assert ids.tolist() == theirs.apply_chat_template(messages, tokenize=True, return_dict=True).input_ids
    counted = answer_mask(ids[None], encoder.rule)[0]
    end = tok.decode([encoder.rule.end])
    assert tok.decode([t for t, c in zip(ids[1:].tolist(), counted) if c]) == f"Plums.{end}Fish.{end}"
    prompt = ChatFormat(tok, encoder).prompt(
        "And animal 4?", [("What does animal 3 eat?", "Plums.")], "Answer in a few words."
    )
    assert (
        prompt
        == theirs.apply_chat_template(
            messages[:4], add_generation_prompt=True, tokenize=True, return_dict=True
        ).input_ids
    )


def test_model_cfg_path_beside_an_inline_model_cfg_takes_only_what_the_file_leaves_to_the_run(tmp_path):
    hf_model("qwen3-qk-norm-head-dim").config.save_pretrained(tmp_path / "hf")
    base = {"model_cfg_path": "hf/config.json", "sources": {"wiki": 1.0}}
    (tmp_path / "ok.json").write_text(json.dumps({**base, "model_cfg": {"T": 32, "dropout": 0.1, "head_dim": 32}}))
    cfg = load_config(tmp_path / "ok.json", "pretrain")
    assert (cfg.model.T, cfg.model.dropout, cfg.model.max_positions, cfg.model.architecture) == (
        32,
        0.1,
        64,
        "Qwen3ForCausalLM",
    )
    assert cfg.provenance["model_cfg.C"] == "model_cfg_path" and cfg.provenance["model_cfg.T"] == "file"
    (tmp_path / "bad.json").write_text(json.dumps({**base, "model_cfg": {"T": 128, "C": 96}}))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "bad.json", "pretrain")
    assert any("model_cfg.C: 96 contradicts model_cfg_path" in p and "the file says 64" in p for p in e.value.problems)
    assert any(
        "model_cfg.T: 128 is longer than the model's own context max_positions=64" in p for p in e.value.problems
    )
    (tmp_path / "missing.json").write_text(json.dumps({**base, "model_cfg_path": "nowhere/config.json"}))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "missing.json", "pretrain")
    assert any("model_cfg_path" in p and "not found" in p for p in e.value.problems), e.value.problems


def test_a_bias_free_gpt2_export_starts_a_run_with_the_config_it_was_trained_with(tmp_path, monkeypatch):
    """GPT-2 files always hold biases, and an export writes zeros for a model without them: read back for a
    bias-free config, the zeros are dropped, not refused, and bos is the same token in both files."""
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(**TINY_MODEL)  # bias false by default
    ours = randomised(GPT(cfg), seed=9)
    write_tiny_checkpoint(tmp_path / "ck", ours)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    back = load_start(tmp_path / "hf", cfg, with_optimizer=False)
    assert back.model_state.keys() == ours.state_dict().keys() and back.meta["model_cfg"]["bias"] is False
    assert all(torch.equal(back.model_state[k], v) for k, v in ours.state_dict().items())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert tokenizer.bos_token_id == config["bos_token_id"] == 256
    assert tokenizer("abc")["input_ids"] == [97, 98, 99]  # bos is named, never added


def test_a_llama_style_pipeline_on_the_demo_data_passes_its_promotion_gate_and_exports_as_llama(world):
    """configs/demo_llama's model (rope, RMSNorm, SwiGLU, GQA) at test size, named by model_cfg_path in both
    phases: pretrain, SFT with packing and replay, the gate, best.pt, and an export transformers computes."""
    model = json.loads((Path(__file__).resolve().parent.parent / "configs/demo_llama/model.json").read_text())
    (world / "c").mkdir()
    (world / "c/model.json").write_text(json.dumps({**model, "T": 32, "C": 32, "d_ff": 48}))
    write_config(world / "c/pretrain.json", "pretrain", model_cfg_path="model.json", model_cfg=None)
    write_config(
        world / "c/sft.json",
        "sft",
        {"pack": True},
        model_cfg_path="model.json",
        model_cfg=None,
        replay={"wiki": 0.3},
        init_from="checkpoints/pretrain/best",
    )
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    r = run_cli("run", "--phase", "pipeline", "--config", "c/pipeline.json", "--result-json", "result.json", cwd=world)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((world / "result.json").read_text())
    assert (result["status"], result["verdict"]) == ("completed", "pass"), r.stderr[-3000:]
    blob = torch.load(world / "checkpoints/best.pt", weights_only=True)
    assert (blob["model_cfg"]["position"], blob["model_cfg"]["n_kv_heads"]) == ("rope", 2)
    assert run_cli("export", "--format", "hf", "--out", "hf", cwd=world).returncode == 0
    assert json.loads((world / "hf/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ours = GPT(ModelConfig(**blob["model_cfg"]))
    ours.load_state_dict(blob["model_state"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(world / "hf").eval()
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (logits_of(ours.eval(), ids) - logits_of(theirs, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "template, line",
    [
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "add_generation_prompt does not append an assistant header",
        ),
        (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "changes a message's content",
        ),
        (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}",
            "closes an assistant turn with no special token",
        ),
        ("{{ raise_exception('no') }}", "the chat template refused the conversation (no)"),
        ("{% for m in messages %}", "the chat template does not compile"),
    ],
)
def test_a_chat_template_whose_answers_cannot_be_found_is_refused_and_builtin_still_works(tmp_path, template, line):
    model_directory(tmp_path, "qwen3-qk-norm-head-dim")
    config = tmp_path / "model" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    r = run_cli("prepare", "--tokenizer", "model/tokenizer.json", "--sft", "qa=qa.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and line in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "data" / "cache" / "sft").exists() or not any((tmp_path / "data/cache/sft").iterdir())
    r = run_cli(
        "prepare",
        "--tokenizer",
        "model/tokenizer.json",
        "--sft",
        "qa=qa.jsonl",
        "--chat-template",
        "builtin",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data/cache/sft/qa_train.bin.meta.json").read_text())
    assert "chat" not in meta and meta["version"] == 2


def test_a_large_export_is_sharded_with_its_index_and_reads_back_both_ways(tmp_path, monkeypatch):
    from trainer_accel.hf import export as hf_export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_export, "SHARD_BYTES", 40_000)  # a few shards of a tiny model, as 5 GiB shards a big one
    hf_model("qwen2-biases-tied").save_pretrained(tmp_path / "from")
    cfg = ModelConfig(**load_start(tmp_path / "from", None, False).meta["model_cfg"])
    ours = randomised(GPT(cfg), seed=8)
    write_tiny_checkpoint(tmp_path / "ck", ours)
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert (
        sorted(set(index["weight_map"].values())) == shards
        and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    )
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert_same_function(ours, theirs.eval(), cfg.V)
    back = load_start(tmp_path / "hf", cfg, with_optimizer=False)
    assert all(torch.equal(back.model_state[k], v) for k, v in ours.state_dict().items())
    assert export.main(["--format", "hf", "--checkpoint", "ck", "--out", "hf"]) == 0  # a re-export replaces its shards


READ_KEYS = {  # config.json key -> (our model_cfg option, how transformers' config object holds it)
    "vocab_size": ("V", lambda c: c.vocab_size),
    "hidden_size": ("C", lambda c: c.hidden_size),
    "intermediate_size": ("d_ff", lambda c: c.intermediate_size),
    "num_hidden_layers": ("L", lambda c: c.num_hidden_layers),
    "num_attention_heads": ("H", lambda c: c.num_attention_heads),
    "num_key_value_heads": ("n_kv_heads", lambda c: c.num_key_value_heads),
    "head_dim": ("head_dim", lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
    "max_position_embeddings": ("max_positions", lambda c: c.max_position_embeddings),
    "rms_norm_eps": ("ln_eps", lambda c: c.rms_norm_eps),
    "hidden_act": ("activation", lambda c: c.hidden_act),
    "rope_theta": (
        "rope_theta",
        lambda c: (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None)),
    ),
    "tie_word_embeddings": ("tie_embeddings", lambda c: c.tie_word_embeddings),
    "sliding_window": ("sliding_window", lambda c: getattr(c, "sliding_window", None)),
}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("key", list(READ_KEYS))
def test_a_key_a_config_json_leaves_out_means_what_it_means_to_transformers(kind, key):
    """Each key the trainer reads, left out of a family's config.json, takes that family's own default in the
    installed transformers (Mistral's 4,096-token window and 131,072 positions, Qwen3's head_dim 128, Qwen's 32
    key/value heads), not Llama's."""
    from trainer_accel.models.families import model_cfg_from_hf

    full = {
        "model_type": kind,
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 5e5,
        "tie_word_embeddings": True,
        **({"sliding_window": 8192} if kind == "mistral" else {}),
    }
    given = {k: v for k, v in full.items() if k != key}
    if key == "num_attention_heads":
        given.pop("num_key_value_heads")  # 32 heads over the 2 key/value heads given would be another model
    ours = model_cfg_from_hf(given, "config.json")
    theirs = transformers.AutoConfig.for_model(**given)
    option, read = READ_KEYS[key]
    value = read(theirs)
    assert ours[option] == value, (kind, key, ours[option], value)


def test_a_mistral_window_shorter_than_the_context_is_refused_by_name(tmp_path):
    """Mistral's config.json without sliding_window has transformers' 4,096-token window: a run at T up to it is
    exact (full attention is the window there), a longer T is refused naming the window, and the export keeps it."""
    config = {
        "model_type": "mistral",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = {"model_cfg_path": "config.json", "sources": {"wiki": 1.0}}
    (tmp_path / "ok.json").write_text(json.dumps({**base, "model_cfg": {"T": 4096}}))
    cfg = load_config(tmp_path / "ok.json", "pretrain")
    assert (cfg.model.sliding_window, cfg.model.max_positions) == (4096, 131072)
    (tmp_path / "long.json").write_text(json.dumps({**base, "model_cfg": {"T": 8192}}))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "long.json", "pretrain")
    assert any("T: 8192 is longer than the model's attention window sliding_window=4096" in p for p in e.value.problems)
    from trainer_accel.models.llama_hf import hf_config

    assert hf_config(cfg.model.to_dict(), {"x": 0}, "x", "x")["sliding_window"] == 4096


def test_a_context_taken_from_a_large_maximum_is_warned_about(tmp_path, caplog):
    """Qwen3 declares 40,960 positions: a config that names no T trains every row at that length, so it is said
    (with what to set), and a T the user gives up to the maximum is taken without a word."""
    config = {
        "model_type": "qwen3",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 40960,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "a.json").write_text(json.dumps({"model_cfg_path": "config.json", "sources": {"wiki": 1.0}}))
    with caplog.at_level("WARNING"):
        assert load_config(tmp_path / "a.json", "pretrain").model.T == 40960
    assert "model_cfg.T is 40,960, the model's max_position_embeddings" in caplog.text
    caplog.clear()
    (tmp_path / "b.json").write_text(
        json.dumps({"model_cfg_path": "config.json", "sources": {"wiki": 1.0}, "model_cfg": {"T": 2048}})
    )
    with caplog.at_level("WARNING"):
        cfg = load_config(tmp_path / "b.json", "pretrain")
    assert (cfg.model.T, cfg.model.max_positions) == (2048, 40960) and "max_position_embeddings" not in caplog.text
