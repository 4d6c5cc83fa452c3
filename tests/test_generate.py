"""Using a trained model: the KV cache computes what the full forward computes, batches equal single prompts, and
the generate and chat commands take every form a model comes in and refuse what they cannot do in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, write_config

from trainer_accel.config import ModelConfig
from trainer_accel.models.generation import KVCache, Sampling, _mask, generate_ids
from trainer_accel.models.gpt import GPT

LLAMA = dict(position="rope", norm="rmsnorm", mlp="gated", activation="silu", n_kv_heads=2, qk_norm=True, head_dim=16)
MODELS = pytest.mark.parametrize("options", [{}, LLAMA], ids=["gpt2-style", "llama-style"])


def model(options: dict, spread: float = 0.3) -> GPT:
    """Weights spread wide enough that greedy choices are clear (not near-ties)."""
    m = GPT(ModelConfig(V=300, T=64, C=64, L=2, H=4, d_ff=96, **options)).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * spread + (1.0 if p.dim() == 1 and p.shape[0] == 64 else 0.0))
    return m


@MODELS
def test_the_cached_path_gives_the_full_forwards_logits_and_greedy_tokens(options):
    m = model(options, spread=0.15)  # logits up to about 5
    seq = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    cache, pad = KVCache.empty(m, 2, 64), torch.zeros(2, dtype=torch.long)
    at = torch.arange(16)[None].expand(2, -1)
    with torch.no_grad():
        parts = [m.decode(seq[:, :16], at, _mask(pad, at, 64), cache)]  # prefill 16, then one token at a time
        cache.length = 16
        for j in range(16, 40):
            a = torch.full((2, 1), j)
            parts.append(m.decode(seq[:, j : j + 1], a, _mask(pad, a, 64), cache))
            cache.length += 1
        assert (torch.cat(parts, dim=1) - m(seq)).abs().max().item() < 1e-5
        ids = seq[:1, :5]
        for _ in range(30):  # greedy without the cache: the whole prefix again for every token
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generate_ids(m, [seq[0, :5].tolist()], 30)[0] == ids[0, 5:].tolist()


@MODELS
@pytest.mark.parametrize(
    "sampling",
    [Sampling(), Sampling(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3)],
    ids=["greedy", "sampled"],
)
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(options, sampling):
    m = model(options)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [20, 21, 22], list(range(30, 60))]

    def gens(indices):
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    together = generate_ids(m, prompts, 20, sampling, gens(range(4)))
    alone = [generate_ids(m, [p], 20, sampling, gens([i]))[0] for i, p in enumerate(prompts)]
    assert together == alone and all(len(t) == 20 for t in together)
    assert generate_ids(m, prompts, 20, sampling, gens(range(4))) == together  # same seeds, same tokens
    if sampling.temperature:
        assert (
            generate_ids(m, prompts, 20, sampling, [torch.Generator().manual_seed(7 + i) for i in range(4)]) != together
        )


def test_generation_stops_at_the_context_and_at_a_stop_token():
    m = model({})
    new = generate_ids(m, [list(range(60))], 50)[0]
    assert len(new) == 5  # positions 60..63 are fed, the token after the last one is still written
    first = generate_ids(m, [[1, 2, 3]], 10)[0]
    assert generate_ids(m, [[1, 2, 3]], 10, stop_ids=frozenset({first[3]}))[0] == first[: first.index(first[3]) + 1]


def test_a_short_prompt_beside_a_long_one_gets_the_tokens_it_gets_alone():
    """Each row has its own context: a batch used to stop every row where the longest prompt ran out of room."""
    m = model({})
    prompts = [list(range(60)), [1, 2, 3], list(range(5, 45))]
    together = generate_ids(m, prompts, 30)
    assert [len(t) for t in together] == [5, 30, 25]
    assert together == [generate_ids(m, [p], 30)[0] for p in prompts]


@pytest.fixture
def trained(world):
    """A tiny pipeline's models: checkpoints/best.pt (SFT), best.pretrain.pt, the SFT checkpoint, its HF export."""
    write_config(world / "c/pretrain.json", "pretrain")
    write_config(world / "c/sft.json", "sft", init_from="checkpoints/pretrain/best")
    (world / "c/pipeline.json").write_text(
        json.dumps({"pretrain_config_path": "pretrain.json", "sft_config_path": "sft.json"})
    )
    assert run_cli("run", "--phase", "pipeline", "--config", "c/pipeline.json", cwd=world).returncode == 0
    assert run_cli("export", "--format", "hf", "--out", "hf", cwd=world).returncode == 0
    return world


def lines(r) -> list[dict]:
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_generate_takes_every_form_a_model_comes_in_and_gives_the_same_text(trained):
    system = [{"role": "system", "content": "be brief"}]
    (trained / "p.jsonl").write_text(
        "\n".join(
            json.dumps(row)
            for row in (
                {"prompt": "The zordax"},
                {},
                {"messages": [{"role": "user", "content": "What color is it?"}]},
                {
                    "messages": system + [{"role": "user", "content": "What color is it?"}]
                },  # the built-in template folds it:
                {"messages": [{"role": "user", "content": "be brief\n\nWhat color is it?"}]},
            )
        ).replace("{}", "")
        + "\n"
    )
    args = ("--prompts", "p.jsonl", "--max-new-tokens", "12")
    default = run_cli("generate", *args, cwd=trained)
    assert "model: " in default.stderr and "best." in default.stderr  # it says which model it took
    out = lines(default)
    assert [o["prompt"] for o in out] == [
        "The zordax",
        "What color is it?",
        "What color is it?",
        "be brief\n\nWhat color is it?",
    ]
    assert out[2]["prompt_tokens"] == out[1]["prompt_tokens"] + len("be brief\n\n") == out[3]["prompt_tokens"]
    assert out[2]["completion"] == out[3]["completion"]
    assert all(
        set(o) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "tokens_per_s"}
        for o in out
    )
    for form in ("checkpoints/best.sft.pt", "checkpoints/sft/best", "hf"):
        got = lines(run_cli("generate", *args, "--model", form, cwd=trained))
        assert [o["completion"] for o in got] == [o["completion"] for o in out], (form, got, out)
    one = [lines(run_cli("generate", *args, "--batch-size", "1", cwd=trained))]
    assert [o["completion"] for o in one[0]] == [o["completion"] for o in out], json.dumps([one, out])
    r = run_cli("generate", "--prompt", "The", "--temperature", "1", "--seed", "3", "--out", "o.jsonl", cwd=trained)
    assert r.returncode == 0 and r.stdout == ""
    again = run_cli("generate", "--prompt", "The", "--temperature", "1", "--seed", "3", cwd=trained)
    assert json.loads((trained / "o.jsonl").read_text())["completion"] == lines(again)[0]["completion"]


def test_chat_on_a_pipe_answers_each_line_resets_and_drops_old_turns(trained):
    chat = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--max-new-tokens", "8"],
        cwd=trained,
        input="Hi\nYo\nHey\nSup\n/reset\nOk\n\n" + "a long message" * 3 + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 5 and "(conversation cleared)" in chat.stderr  # one answer a message
    assert "no longer fits the context of 32 tokens: the oldest turn was dropped" in chat.stderr
    assert "(this message is 44 tokens with the template; the context is 32: say it shorter)" in chat.stderr

    (trained / "s.jsonl").write_text(
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]}) + "\n"
    )
    chat = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--max-new-tokens", "8", "--system", "be brief"],
        cwd=trained,
        input="Hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    same = lines(run_cli("generate", "--prompts", "s.jsonl", "--max-new-tokens", "8", cwd=trained))[0]
    assert chat.returncode == 0 and chat.stdout == same["completion"] + "\n" and same["prompt_tokens"] == 2 + 12
    chat = subprocess.run(
        [sys.executable, "-m", "trainer_accel.chat", "--system", "x" * 30],
        cwd=trained,
        input="Hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )  # the system message counts: 2 + 30 + 2 + 2
    assert chat.returncode == 0 and "(this message is 36 tokens with the template; the context is 32" in chat.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "x" * 40], "prompt 1 is 40 tokens; the model's context T is 32"),
        (["--prompts", "empty.txt"], "empty.txt: no prompts in it"),
        (["--prompt", "hi", "--chat", "--model", "checkpoints/pretrain/best"], "this model has no chat template"),
        (["--prompt", "hi", "--model", "nowhere"], "nowhere: checkpoint not found"),
        (["--prompt", "hi", "--top-p", "2"], "--top-p: must be in (0, 1], got 2.0"),
        (
            ["--prompts", "system.jsonl"],
            "system.jsonl:1: messages must be an optional system message, then user and assistant in turn",
        ),
        ([], "give --prompt TEXT (repeatable) or --prompts FILE"),
    ],
)
def test_generate_refuses_bad_input_in_one_line(trained, args, needle):
    (trained / "empty.txt").write_text("\n\n")
    (trained / "system.jsonl").write_text(
        json.dumps({"messages": [{"role": "system", "content": 3}, {"role": "user", "content": "hi"}]}) + "\n"
    )
    r = run_cli("generate", *args, cwd=trained)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_chat_refuses_a_pretrained_model_and_a_damaged_pt(trained):
    r = run_cli("chat", "--model", "checkpoints/pretrain/best", cwd=trained)
    assert r.returncode == 2 and "this model has no chat template (phase pretrain" in r.stderr
    shutil.copy(trained / "checkpoints/best.pt", trained / "copy.pt")
    with open(trained / "copy.pt", "r+b") as f:
        f.truncate(1000)
    r = run_cli("chat", "--model", "copy.pt", cwd=trained)
    assert r.returncode == 2 and "copy.pt" in r.stderr and "Traceback" not in r.stderr


def test_generate_into_a_closed_pipe_exits_quietly(trained):
    p = subprocess.Popen(
        f"{sys.executable} -m trainer_accel.generate --prompt a --prompt b --prompt c --batch-size 1 | head -c 1",
        shell=True,
        cwd=trained,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        executable="/bin/bash",
    )
    out, err = p.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


def test_chat_refuses_the_export_of_a_pretrained_model(trained):
    assert (
        run_cli(
            "export", "--format", "hf", "--checkpoint", "checkpoints/pretrain/best", "--out", "pre_hf", cwd=trained
        ).returncode
        == 0
    )
    r = run_cli("chat", "--model", "pre_hf", cwd=trained)
    assert r.returncode == 2 and "this model has no chat template (phase pretrain" in r.stderr, r.stderr


def test_the_held_out_score_is_measured_with_a_floor(trained):
    """tools/heldout: the README's held-out figure comes from this command (after README command 1, --min 9)."""

    def heldout(*args):
        return subprocess.run(
            [sys.executable, "-m", "trainer_accel.tools.heldout", *args],
            cwd=trained,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = heldout()
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    n = int(lines[-1].split("/")[1].split()[0])
    k = int(lines[-1].split(": ")[1].split("/")[0])
    assert lines[-1].startswith("held-out dolly answers exact: ") and len(lines) == n + 1 and n > 0
    assert sum(line.startswith("exact  ") for line in lines) == k
    assert all(line.startswith(("exact  ", "wrong  ", "long   ")) for line in lines[:-1])
    assert heldout("--min", str(k)).returncode == 0 and heldout("--min", str(k + 1)).returncode == 1
    assert heldout("--source", "nosuch").returncode == 2
