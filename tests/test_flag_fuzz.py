"""Every numeric flag of generate, chat and run, and every key a family's config.json is read for, given what a
careless or hostile user gives: NaN, infinity, negative, zero, huge, not a number; a wrong type, a missing value, a
value that contradicts the weights. Each is exit 2 with one `error:` line, no traceback, and no file changed."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers
from conftest import run_cli, write_config

GENERATE_FLAGS = {  # flag -> values it must refuse
    "--max-new-tokens": ["nan", "inf", "-1", "0", "abc"],
    "--temperature": ["nan", "inf", "-inf", "-1", "abc"],
    "--top-k": ["nan", "-1", "0", "abc"],
    "--top-p": ["nan", "inf", "-1", "0", "1.5", "abc"],
    "--repetition-penalty": ["nan", "inf", "-1", "0", "abc"],
    "--seed": ["nan", "-1", str(2**64), "abc"],
    "--batch-size": ["-1", "0", "abc"],
}
RUN_KEYS = {  # a config value given with --set -> values the run must refuse
    "train_cfg.base_lr": ["nan", "inf", "-1", "abc"],
    "train_cfg.min_lr": ["nan", "-1"],
    "train_cfg.total_steps": ["nan", "-1", "0", "1e400"],
    "train_cfg.B": ["nan", "0", "abc"],
    "train_cfg.warmup_steps": ["nan", "-1"],
    "train_cfg.grad_clip": ["nan", "inf", "-1"],
    "model_cfg.dropout": ["nan", "inf", "1"],
    "model_cfg.C": ["nan", "-1", str(2**40), "abc"],
}


def one_error_line(r) -> list[str]:
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1, r.stderr[-1500:]
    return lines


def files_of(world) -> dict[str, str]:
    return {
        str(p.relative_to(world)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(world.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    import shutil

    world = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(demo_data, world / "data")
    write_config(world / "pre.json", "pretrain", {"total_steps": 2})
    assert run_cli("run", "--phase", "pretrain", "--config", "pre.json", cwd=world).returncode == 0
    (world / "results.jsonl").write_text('{"earlier": "results"}\n')
    return world


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_numeric_flag_refuses_what_is_not_a_number_in_range(trained, command, monkeypatch, capsys):
    """Each value through the command's own main() in this process (the CLI is `exit(main())`), one run each
    through the real command below."""
    import importlib

    main = importlib.import_module(f"trainer_accel.{command}").main
    monkeypatch.chdir(trained)
    before = files_of(trained)
    for flag, values in GENERATE_FLAGS.items():
        if command == "chat" and flag == "--batch-size":
            continue
        for value in values:
            extra = ["--prompt", "The", "--out", "results.jsonl"] if command == "generate" else []
            try:
                code = main([*extra, f"{flag}={value}"])
            except SystemExit as e:  # argparse's refusal of a value that is not a number
                code = e.code
            err = capsys.readouterr().err
            lines = [x for x in err.splitlines() if "error:" in x]
            assert code == 2 and "Traceback" not in err and len(lines) == 1 and flag in lines[0], (flag, value, err)
    assert files_of(trained) == before
    r = run_cli(command, *(["--prompt", "The"] if command == "generate" else []), "--temperature", "nan", cwd=trained)
    assert "--temperature: must be a finite number >= 0" in one_error_line(r)[0]
    r = run_cli("generate", "--prompt", "The", "--stop", "", cwd=trained)
    assert "--stop: an empty text would stop every completion" in one_error_line(r)[0]


def test_every_numeric_run_setting_refuses_what_is_not_a_number_in_range(trained, monkeypatch, capsys):
    """Through run's main() in this process (a config is refused before anything starts), once through the CLI."""
    from trainer_accel import run

    monkeypatch.chdir(trained)
    before = files_of(trained)
    for key, values in RUN_KEYS.items():
        for value in values:
            code = run.main(["--phase", "pretrain", "--config", "pre.json", "--plan", "--set", f"{key}={value}"])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err, (key, value, err[-1500:])
            lines = [x for x in err.splitlines() if "error:" in x]  # and what follows from it (min_lr > base_lr)
            assert lines and all(x.startswith("error: ") for x in lines) and key in lines[0], (key, value, lines)
    assert files_of(trained) == before
    r = run_cli("run", "--phase", "pretrain", "--config", "pre.json", "--set", "train_cfg.base_lr=nan", cwd=trained)
    assert "train_cfg.base_lr" in one_error_line(r)[0]


SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
CONFIG_CASES = [  # (key, value or DROP, what the one error line names)
    ("vocab_size", "300", "vocab_size"),
    ("vocab_size", 200, "model.embed_tokens.weight"),
    ("vocab_size", "DROP", "model.embed_tokens.weight"),
    ("hidden_size", 3.5, "hidden_size"),
    ("hidden_size", 80, "weight"),
    ("hidden_size", "DROP", "weight"),
    ("intermediate_size", [96], "intermediate_size"),
    ("intermediate_size", 95, "mlp.gate_proj"),
    ("num_hidden_layers", -2, "num_hidden_layers"),
    ("num_hidden_layers", 3, "missing"),
    ("num_attention_heads", "4", "num_attention_heads"),
    ("num_attention_heads", 3, "n_kv_heads"),
    ("num_key_value_heads", True, "num_key_value_heads"),
    ("num_key_value_heads", 3, "n_kv_heads"),
    ("num_key_value_heads", 4, "k_proj"),
    ("head_dim", "16", "head_dim"),
    ("head_dim", 8, "q_proj"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
    ("hidden_act", ["silu"], "hidden_act"),
    ("hidden_act", "relu", "hidden_act"),
    ("rms_norm_eps", "x", "rms_norm_eps"),
    ("rms_norm_eps", -1, "rms_norm_eps"),
    ("rope_theta", "x", "rope_theta"),
    ("rope_theta", 0, "rope_theta"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"),
    ("tie_word_embeddings", True, "lm_head"),
    ("layer_types", 2, "layer_types"),
    ("layer_types", ["sliding_attention", "full_attention"], "sliding"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("rope_scaling", "x", "rope_scaling"),
    ("model_type", ["llama"], "model_type"),
    ("architectures", "LlamaForCausalLM", "architectures"),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)).save_pretrained(folder / "model")
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chr(33 + i): i for i in range(94)}, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(folder / "model" / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("key, value, named", CONFIG_CASES)
def test_every_config_json_key_with_a_wrong_value_is_one_line(
    llama_dir, tmp_path, key, value, named, monkeypatch, capsys
):
    """generate --model DIR reads the directory as a run's start point does: one line, no traceback, whether the
    value has the wrong type, is missing, or contradicts the weights (through generate's main() in this process;
    the first case through the command as well)."""
    model = tmp_path / "model"
    model.mkdir()
    for f in (llama_dir / "model").iterdir():
        (model / f.name).symlink_to(f)
    config = json.loads((llama_dir / "model" / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0
    if value == "DROP":
        config.pop(key)
    else:
        config[key] = value
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps(config))
    args = ["--model", "model", "--prompt", "ab", "--max-new-tokens", "2"]
    if (key, value) == CONFIG_CASES[0][:2]:
        assert named in one_error_line(run_cli("generate", *args, cwd=tmp_path))[0]
    from trainer_accel import generate

    monkeypatch.chdir(tmp_path)
    code = generate.main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and named in lines[0], (key, value, err)
