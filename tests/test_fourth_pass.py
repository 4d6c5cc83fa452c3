"""The hostile pass over generate, chat, model directories and exports (issue 35), one case each: what was a
traceback, a silently wrong result or a misleading message, now one line naming the problem, or the right result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, write_config
from safetensors.torch import load_file, save_file
from test_flag_fuzz import SMALL  # noqa: F401 (the tiny Llama config those tests use)

from trainer_accel.errors import UserError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama directory with a chat template and a word-level tokenizer of 100 tokens."""
    import tokenizers
    import transformers

    folder = tmp_path_factory.mktemp("llama") / "model"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chr(33 + i): i for i in range(94)}, merges=[]))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    return folder


def copy_of(llama, tmp_path, **config):
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    if config:
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, **config}))
    return model


def one_line(r, needle):
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda w: {**w, "model.norm.weight": torch.full_like(w["model.norm.weight"], float("nan"))},
            "weight model.norm.weight holds NaN or infinite values",
        ),
        (lambda w: {**w, "model.norm.weight": w["model.norm.weight"].to(torch.int8)}, "is int8, not floating point"),
        (
            lambda w: {
                **w,
                "model.layers.0.self_attn.o_proj.weight": w["model.layers.0.self_attn.o_proj.weight"][
                    :, :48
                ].contiguous(),
            },
            "o_proj.weight is [64, 48], config.json gives it [64, 64]",
        ),
    ],
)
def test_weights_a_model_cannot_be_are_refused_before_generating(llama, tmp_path, edit, needle):
    model = copy_of(llama, tmp_path)
    save_file(edit(load_file(model / "model.safetensors")), model / "model.safetensors")
    one_line(run_cli("generate", "--model", "model", "--prompt", "ab", cwd=tmp_path), needle)


def test_a_tokenizer_larger_than_the_model_is_refused(llama, tmp_path):
    import tokenizers

    model = copy_of(llama, tmp_path)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={f"t{i}": i for i in range(400)}, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(model / "tokenizer.json"))
    one_line(
        run_cli("generate", "--model", "model", "--prompt", "ab", cwd=tmp_path),
        "its tokenizer has 401 tokens, the model 300 rows",
    )


@pytest.mark.parametrize(
    "template, needle",
    [
        ("{{ 1 / 0 }}", "the chat template failed (ZeroDivisionError"),
        ("{% for i in range(10**9) %}x{% endfor %}", "the chat template failed (OverflowError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template recursed without end"),
        (
            "{%- for m in messages %}{%- if m.role == 'system' %}{{ raise_exception('no system role') }}{%- endif %}"
            "{{- m.content }}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>{%- endif %}",
            "no system role",
        ),
    ],
)
def test_a_template_that_fails_is_its_one_line_in_chat(llama, tmp_path, template, needle):
    model = copy_of(llama, tmp_path)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    r = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--model", "model", "--system", "Be brief."],
        cwd=tmp_path,
        input="Hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line(r, needle)


def test_chat_says_non_utf8_input_in_one_line_and_a_chat_template_jinja_that_is_not_text(llama, tmp_path):
    model = copy_of(llama, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--model", "model"],
        cwd=tmp_path,
        input=b"Hi \xff\xfe\n",
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 2 and b"standard input is not UTF-8 text" in r.stderr and b"Traceback" not in r.stderr
    (model / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    one_line(
        run_cli("generate", "--model", "model", "--prompt", "ab", "--chat", cwd=tmp_path),
        "chat_template.jinja: cannot be read as UTF-8 text",
    )


def test_prompts_files_are_read_as_written(llama, tmp_path):
    """A .json (or .JSONL) file of rows is JSONL; a form feed or U+2028 inside a line is part of its prompt; a file
    without end (/dev/zero) is refused."""
    from trainer_accel.inference.complete import read_prompts

    (tmp_path / "p.JSON").write_text('{"prompt": "a\\u2028b"}\n{"prompt": "c"}\n')
    assert [p.text for p in read_prompts(tmp_path / "p.JSON")] == ["a\u2028b", "c"]
    (tmp_path / "p.txt").write_text("one\fstill one\u2028and still\r\ntwo\n")
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["one\fstill one\u2028and still", "two"]
    import trainer_accel.inference.complete as complete

    complete.MAX_PROMPTS_BYTES, limit = 1 << 10, complete.MAX_PROMPTS_BYTES
    try:
        with pytest.raises(UserError, match="larger than 0 MiB; not a prompts file"):
            read_prompts(complete.Path("/dev/zero"))
    finally:
        complete.MAX_PROMPTS_BYTES = limit


def test_misleading_messages_now_name_the_problem(llama, tmp_path):
    """A missing shard is a missing shard, not an unsafe pytorch_model.bin; a harmless extra key beside rope_type
    default is no rope scaling; a config understating vocab_size names the embedding's real rows."""
    from trainer_accel.training.start import load_start

    model = copy_of(llama, tmp_path, rope_scaling={"rope_type": "default", "note": "harmless"})
    assert load_start(model, None, with_optimizer=False).meta["model_cfg"]["rope_scaling"] is None
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(UserError) as e:
        load_start(model, None, with_optimizer=False)
    assert "shard '../elsewhere.safetensors' is not a file name beside the index" in e.value.problems[0]
    smaller = copy_of(llama, tmp_path / "b", vocab_size=200)
    with pytest.raises(UserError, match=r"model.embed_tokens.weight is \[300, 64\], config.json gives it \[200, 64\]"):
        load_start(smaller, None, with_optimizer=False)


def test_generate_with_a_moved_tokenizer_says_what_generate_can_do(world):
    write_config(world / "pre.json", "pretrain", {"total_steps": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world).returncode == 0
    from conftest import edit_sidecar

    edit_sidecar(
        world / "checkpoints/pretrain/latest",
        lambda m: m.update(tokenizer="hf-0123456789abcdef", tokenizer_path="/nowhere/tokenizer.json"),
    )
    r = run_cli("generate", "--model", "checkpoints/pretrain/latest", "--prompt", "The", cwd=world)
    one_line(r, "export the model with python -m trainer_accel.export --format hf --tokenizer PATH")
    assert "pass the file the caches were made with as --tokenizer" not in r.stderr


def test_export_out_dot_a_symlink_and_a_stale_chat_template_jinja(tmp_path):
    from conftest import TINY_MODEL
    from test_huggingface import write_tiny_checkpoint

    from trainer_accel.models.config import ModelConfig
    from trainer_accel.models.gpt import GPT

    write_tiny_checkpoint(tmp_path / "ck", GPT(ModelConfig(**TINY_MODEL)))
    (tmp_path / "empty").mkdir()
    r = run_cli("export", "--format", "hf", "--checkpoint", "../ck", "--out", ".", cwd=tmp_path / "empty")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "empty" / "config.json").is_file() and not list(tmp_path.glob("*.lock"))
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    one_line(
        run_cli("export", "--format", "hf", "--checkpoint", "ck", "--out", "link", cwd=tmp_path),
        "--out link: a symbolic link",
    )
    (tmp_path / "empty" / "chat_template.jinja").write_text("{{ 'stale' }}")  # an earlier transformers save
    assert (
        run_cli("export", "--format", "hf", "--checkpoint", "../ck", "--out", ".", cwd=tmp_path / "empty").returncode
        == 0
    )
    assert not (tmp_path / "empty" / "chat_template.jinja").exists()


def test_plan_renders_the_sample_prompts_in_the_template_the_run_trains_in(tmp_path):
    """A sample's system message that the template refuses is said by --plan, not at the first checkpoint."""
    from real_models import model_directory, write_data

    model_directory("qwen3", tmp_path / "model")
    write_data(tmp_path)
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{%- if messages[0].role == 'system' %}",
        "{%- if messages[0].role == 'system' %}{{ raise_exception('no system messages here') }}",
    )
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    assert (
        run_cli(
            "prepare", "--tokenizer", "model", "--stream", "notes=notes.txt", "--sft", "qa=qa.jsonl", cwd=tmp_path
        ).returncode
        == 2
    )  # the data's own system messages are refused at prepare already
    (tmp_path / "qa.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "qa.jsonl").read_text().splitlines() if "system" not in line)
    )
    assert (
        run_cli(
            "prepare", "--tokenizer", "model", "--stream", "notes=notes.txt", "--sft", "qa=qa.jsonl", cwd=tmp_path
        ).returncode
        == 0
    )
    cfg = {
        "model_cfg_path": "model/config.json",
        "init_from": "model",
        "model_cfg": {"T": 64},
        "sft_sources": {"qa": 1.0},
        "val_source": "notes",
        "tracking": {"log_with": []},
        "sample_prompts": [{"prompt": "Hi", "task": "chat", "system": "Be brief."}],
        "train_cfg": {"total_steps": 2, "B": 2, "warmup_steps": 1, "eval_every": 2, "ckpt_every": 2},
    }
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    r = run_cli("run", "--phase", "sft", "--config", "sft.json", "--plan", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "  - sample_prompts[0]: " in r.stdout + r.stderr and "no system messages here" in r.stdout + r.stderr
    one_line(run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=tmp_path), "sample_prompts[0]:")


def test_a_start_checkpoint_with_nan_weights_is_refused_naming_them(world):
    """It used to start, diverge at its first step and advise a lower learning rate."""
    from conftest import edit_sidecar
    from safetensors.torch import load_file, save_file

    write_config(world / "pre.json", "pretrain", {"total_steps": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world).returncode == 0
    ckpt = world / "checkpoints" / "pretrain" / "latest"
    weights = load_file(ckpt / "model.safetensors")
    weights["ln_f.weight"] = torch.full_like(weights["ln_f.weight"], float("nan"))
    (ckpt / "model.safetensors").unlink()  # break the hard links shared with the step directory and best/
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    from trainer_accel.fsio import sha256_file

    edit_sidecar(
        ckpt,
        lambda m: m["files"]["model.safetensors"].update(
            sha256=sha256_file(ckpt / "model.safetensors"), size=(ckpt / "model.safetensors").stat().st_size
        ),
    )
    write_config(world / "sft.json", "sft", {"total_steps": 2}, init_from="checkpoints/pretrain/latest")
    one_line(
        run_cli("run", "--phase", "sft", "--config", "sft.json", cwd=world),
        "weights ln_f.weight hold NaN or infinite values; start from an earlier checkpoint",
    )
