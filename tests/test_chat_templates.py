"""Templates as models ship them: reasoning templates, template arguments, a user's template file, `{% generation %}`
blocks, templates with no generation prompt, and the built-in format on a model whose vocabulary is full.

Every template here is rendered with the Qwen3 tokenizer of tests/real_models.py (Qwen's special tokens and
pre-tokenizer at their real ids) and compared token for token with transformers' apply_chat_template.
"""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import run_cli
from real_models import FIXTURES, model_directory, write_data

from trainer_accel.data.cache import answer_mask
from trainer_accel.data.chat_template import (
    ChatTemplate,
    TemplateEncoder,
    find_chat_template,
    template_args,
)
from trainer_accel.data.formats.chat import Turns
from trainer_accel.data.tokenizer import HFTokenizer
from trainer_accel.errors import UserError

transformers.logging.set_verbosity_error()
QWEN3 = (FIXTURES / "qwen3" / "chat_template.jinja").read_text()
# Qwen3.5 and QwQ open the answer with the think block in the generation prompt itself
QWEN35 = QWEN3.replace(
    """    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}""",
    """    {{- '<|im_start|>assistant\\n<think>\\n' }}""",
)
BLOCKS = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NO_GENERATION_PROMPT = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi, I am Ann."},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What does animal 3 eat?"},
    {"role": "assistant", "content": "Animal 3 eats plums."},
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = model_directory("qwen3", tmp_path_factory.mktemp("qwen") / "model")
    return folder, HFTokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def encoder_for(qwen, text: str, **kwargs) -> TemplateEncoder:
    folder, tok, _ = qwen
    return TemplateEncoder(tok, ChatTemplate(text, "test.jinja", None, "<|im_end|>", template_args(kwargs)))


def turns() -> Turns:
    return Turns([("Hi, I am Ann.", "Hello!"), ("What does animal 3 eat?", "Animal 3 eats plums.")], "Be brief.")


@pytest.mark.parametrize(
    "text, kwargs, counted",
    [
        (QWEN3, {}, "Hello!<|im_end|><think>\n\n</think>\n\nAnimal 3 eats plums.<|im_end|>"),
        (QWEN3, {"enable_thinking": False}, "Hello!<|im_end|><think>\n\n</think>\n\nAnimal 3 eats plums.<|im_end|>"),
        (QWEN35, {}, "Hello!<|im_end|><think>\n\n</think>\n\nAnimal 3 eats plums.<|im_end|>"),
    ],
)
def test_a_reasoning_template_trains_on_what_the_model_writes_after_the_generation_prompt(qwen, text, kwargs, counted):
    """Qwen3 writes an empty think block after the header of the last answer only; Qwen3.5 puts `<think>\\n` in the
    generation prompt. The tokens are apply_chat_template's, the loss counts the answers with whatever the model
    writes before them, and a prompt (with its arguments) is apply_chat_template's with add_generation_prompt."""
    _, tok, theirs = qwen
    encoder = encoder_for(qwen, text, **kwargs)
    ids = encoder.encode_many([turns()])[0]
    theirs.chat_template = text
    assert (
        ids.tolist() == theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    )
    mask = answer_mask(ids[None], encoder.rule)[0]
    assert tok.decode([t for t, c in zip(ids[1:].tolist(), mask) if c]) == counted
    prompt = encoder.prompt([("Hi, I am Ann.", "Hello!")], "What does animal 3 eat?", "Be brief.")
    assert (
        prompt
        == theirs.apply_chat_template(
            CONVERSATION[:4], add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )["input_ids"]
    )


def test_generation_blocks_are_the_mask_transformers_computes_and_others_are_refused(qwen):
    _, tok, theirs = qwen
    encoder = encoder_for(qwen, BLOCKS)
    ids = encoder.encode_many([turns()])[0]
    theirs.chat_template = BLOCKS
    out = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == out["input_ids"]
    assert answer_mask(ids[None], encoder.rule)[0].tolist() == [bool(m) for m in out["assistant_masks"][1:]]
    outside = BLOCKS.replace(
        "{{- m.content + '<|im_end|>' }}{% endgeneration %}", "{{- m.content }}{% endgeneration %}{{- '<|im_end|>' }}"
    )
    with pytest.raises(UserError, match=r"generation %\} blocks mark .*--chat-template builtin"):
        encoder_for(qwen, outside).encode_many([turns()])


def test_a_template_without_a_generation_prompt_still_completes_and_says_the_way_out_for_sft(qwen, tmp_path):
    folder, _, _ = qwen
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "model").mkdir()
    for f in folder.iterdir():
        (tmp_path / "model" / f.name).symlink_to(f)
    (tmp_path / "model" / "tokenizer_config.json").unlink()
    (tmp_path / "model" / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": NO_GENERATION_PROMPT})
    )
    r = run_cli("generate", "--model", "model", "--prompt", "Animal 3 eats", "--max-new-tokens", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 3
    write_data(tmp_path)
    r = run_cli("prepare", "--tokenizer", "model", "--sft", "qa=qa.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model/tokenizer_config.json: add_generation_prompt does not append an assistant "
        "header to the conversation, so the answers cannot be found in its tokens; train in the built-in format "
        "(--chat-template builtin) or give a template of your own (--chat-template PATH)"
    )
    (tmp_path / "mine.jinja").write_text(QWEN3)
    r = run_cli(
        "prepare",
        "--tokenizer",
        "model",
        "--sft",
        "qa=qa.jsonl",
        "--chat-template",
        "mine.jinja",
        "--template-arg",
        "enable_thinking=false",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    chat = json.loads((tmp_path / "data/cache/sft/qa_train.bin.meta.json").read_text())["chat"]
    assert chat["template_source"] == "mine.jinja" and chat["template_args"] == {"enable_thinking": False}


@pytest.mark.parametrize(
    "given, line",
    [
        (["--template-arg", "enable-thinking"], "--template-arg enable-thinking: expected NAME=VALUE"),
        (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: cannot be read as a template file"),
        (
            ["--chat-template", "builtin", "--template-arg", "x=1"],
            "the built-in chat format takes no template arguments",
        ),
    ],
)
def test_bad_template_choices_are_one_line(qwen, tmp_path, given, line):
    folder, _, _ = qwen
    write_data(tmp_path)
    r = run_cli("prepare", "--tokenizer", str(folder), "--sft", "qa=qa.jsonl", *given, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and line in r.stderr, r.stderr


def test_tokenizer_takes_the_model_directory_and_names_what_it_lacks(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("some text\n")
    r = run_cli("prepare", "--tokenizer", "empty", "--stream", "n=notes.txt", cwd=tmp_path)
    assert r.returncode == 2 and "empty: a directory without a tokenizer.json" in r.stderr, r.stderr


def test_the_built_in_format_on_a_full_vocabulary_says_what_to_set_and_the_export_says_what_it_carries(tmp_path):
    """Llama 3's tokenizer fills its 128,256 rows: the built-in format's three tokens need rows, said once at prepare
    and once at the run with the V to set; with it the embedding grows, and the export carries the built-in
    template, saying it is not the one the model came with."""
    model_directory("llama3", tmp_path / "model")
    write_data(tmp_path)
    r = run_cli(
        "prepare",
        "--tokenizer",
        "model",
        "--stream",
        "notes=notes.txt",
        "--sft",
        "qa=qa.jsonl",
        "--chat-template",
        "builtin",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert (
        "added <|user|>, <|assistant|>, <|eot|> to the tokenizer (ids 128256-128258) for the built-in chat "
        "format; the model in model has 128,256 embedding rows: set model_cfg.V to 128,259"
    ) in r.stderr
    cfg = {
        "model_cfg_path": "model/config.json",
        "init_from": "model",
        "model_cfg": {"T": 48},
        "sft_sources": {"qa": 1.0},
        "val_source": "notes",
        "tracking": {"log_with": []},
        "train_cfg": {
            "total_steps": 2,
            "B": 2,
            "eval_every": 2,
            "eval_batches": 1,
            "ckpt_every": 2,
            "log_every": 2,
            "warmup_steps": 1,
        },
    }
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    r = run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=tmp_path)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert (
        "the tokenizer has 128,259 tokens; prepare added <|user|>, <|assistant|>, <|eot|> to the model's own "
        "128,256, model_cfg.V=128,256 has rows for 128,256: set model_cfg.V to 128,259"
    ) in errors[0]
    cfg["model_cfg"]["V"] = 128259
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    r = run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "embedding grown from 128256 to 128259 rows" in r.stderr
    assert (
        "SFT examples are in the built-in <|user|> ... <|eot|> format, not the template the model came with "
        f"({(tmp_path / 'model' / 'tokenizer_config.json').resolve()})"
    ) in r.stderr
    r = run_cli("export", "--format", "hf", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "chat template in the export: the built-in <|user|> ... <|eot|> format" in r.stderr
    assert (
        "trained in the built-in chat format, so the export carries it, not the template the model came with"
        in r.stderr
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<|eot|>") == 128258 and len(tokenizer) == 128259
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 128259


def test_a_model_directory_template_is_found_beside_its_tokenizer_with_arguments(qwen):
    folder, _, _ = qwen
    template = find_chat_template(folder / "tokenizer.json", "model", template_args(["enable_thinking=false"]))
    assert template.text == QWEN3 and template.kwargs == {"enable_thinking": False}
    assert template.args == (("enable_thinking", "false"),)


def test_continued_pretraining_exports_with_the_template_and_eos_the_model_came_with(qwen, tmp_path):
    """Pretraining changes no end of turn: the export of a pretrain run from Qwen3's directory keeps its
    `<|im_end|>` eos and its own template, and says it changed nothing."""
    folder, _, _ = qwen
    write_data(tmp_path)
    assert run_cli("prepare", "--tokenizer", str(folder), "--stream", "notes=notes.txt", cwd=tmp_path).returncode == 0
    cfg = {
        "model_cfg_path": str(folder / "config.json"),
        "init_from": str(folder),
        "model_cfg": {"T": 32},
        "sources": {"notes": 1.0},
        "val_source": "notes",
        "tracking": {"log_with": []},
        "train_cfg": {
            "total_steps": 2,
            "B": 2,
            "eval_every": 2,
            "eval_batches": 1,
            "ckpt_every": 2,
            "log_every": 2,
            "warmup_steps": 1,
        },
    }
    (tmp_path / "pre.json").write_text(json.dumps(cfg))
    r = run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("export", "--format", "hf", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    exported = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert exported["eos_token"] == "<|im_end|>" and exported["chat_template"] == QWEN3
    assert json.loads((tmp_path / "out" / "trainer_accel_export.json").read_text())["changed"] == []
    assert "changed from what the model came with" not in r.stderr
