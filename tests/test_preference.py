"""Preference tuning: pairs as people publish them, the four losses against their papers and TRL, the reference
model (live and precomputed), exact resume, equal splits of a batch, and the three-phase pipeline with its gate."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, events, run_cli, write_config
from real_models import model_directory
from safetensors.torch import load_file
from test_device_paths import EMULATED
from test_device_paths import launch as launch_with
from test_exact_resume import LLAMA_MODEL
from test_numerics import launch

from trainer_accel.config import ModelConfig
from trainer_accel.data.cache import open_cache
from trainer_accel.errors import UserError
from trainer_accel.models.build import build_model
from trainer_accel.phases.preference import (
    PreferenceConfig,
    pair_losses,
    preference_gate,
    preference_loss,
)
from trainer_accel.phases.registry import load_config
from trainer_accel.training.batches import Batch, PairSource, fit_pair, last_answer

LN2 = math.log(2)
TRAIN = {"total_steps": 6, "B": 2, "accum_steps": 2, "ckpt_every": 2, "eval_every": 2, "warmup_steps": 2}
LLAMA = {**LLAMA_MODEL["model_cfg"], "dropout": 0.0}  # test_exact_resume's Llama-style shape, no dropout


def pref_config(path: Path, train: dict | None = None, preference: dict | None = None, **top) -> Path:
    return write_config(
        path,
        "preference",
        {**TRAIN, **(train or {})},
        pref_sources={"facts": 1.0},
        preference=preference or {"loss": "dpo"},
        **{"init_from": None, **top},
    )


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_sequences(cache_path: Path) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    cache = open_cache(cache_path, "pref")
    tokens = cache.tokens
    seqs = [tokens[cache.starts[i] : cache.starts[i + 1]].tolist() for i in range(cache.num_examples)]
    return cache.meta, list(zip(seqs[0::2], seqs[1::2]))


# ---------------------------------------------------------------------------------------------------------------
# Data


HH = "\n\nHuman: Where do the zorba live?\n\nAssistant: In Kelm.\n\nHuman: And what do they eat?\n\nAssistant: "
ROWS = [
    {"prompt": "What color is the zorba?", "chosen": "Black.", "rejected": "Red."},
    {  # TRL's conversational form, a system message in the prompt
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Kelm?"}],
        "chosen": [{"role": "assistant", "content": "North."}],
        "rejected": [{"role": "assistant", "content": "I cannot say where Kelm is."}],
    },
    {  # UltraFeedback-binarized: a string prompt, answers that repeat it as a user message
        "prompt": "Name a food.",
        "chosen": [{"role": "user", "content": "Name a food."}, {"role": "assistant", "content": "Plums."}],
        "rejected": [{"role": "user", "content": "Name a food."}, {"role": "assistant", "content": "Rocks."}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    },
    {  # full conversations sharing a prefix, no prompt field (HH as TRL ships it)
        "chosen": [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How many legs?"},
            {"role": "assistant", "content": "Four."},
        ],
        "rejected": [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How many legs?"},
            {"role": "assistant", "content": "Legs are many, who can count them."},
        ],
    },
    {"chosen": HH + "Plums.", "rejected": HH + "Stones and sand."},  # Anthropic HH's raw text
    {"prompt": "Empty?", "chosen": "Yes.", "rejected": "  "},  # dropped: an empty answer
    {"prompt": "Same?", "chosen": "Same.", "rejected": "Same."},  # dropped: the same text
    {  # dropped: the conversations differ before their last answer
        "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
        "rejected": [{"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}],
    },
]


def test_prepare_reads_pairs_as_published_and_counts_what_it_leaves_out(world):
    data = jsonl(world / "pairs.jsonl", ROWS * 3)  # each shape thrice, so the hash split has both sides
    import pyarrow as pa
    import pyarrow.parquet as pq

    # UltraFeedback-binarized as the Hub serves it: Parquet, the answers list<struct<content, role>> columns
    uf = [
        {
            "prompt": (q := f"Name food {i}."),
            "chosen": [{"content": q, "role": "user"}, {"content": "Plums.", "role": "assistant"}],
            "rejected": [{"content": q, "role": "user"}, {"content": "Rocks.", "role": "assistant"}],
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        }
        for i in range(4)
    ]
    pq.write_table(pa.Table.from_pylist(uf), world / "uf.parquet")
    r = run_cli("prepare", "--pref", f"mine={data}", "--pref", "mine=uf.parquet", "--val-fraction", "0.3", cwd=world)
    assert r.returncode == 0, r.stderr
    assert "mine: left out 9 pairs that teach no preference: 3 with an empty answer, 3 with chosen and rejected " \
           "the same text, 3 with conversations that differ before their last answer" in r.stderr  # fmt: skip
    train_meta, train = pair_sequences(world / "data/cache/pref/mine_train.bin")
    val_meta, val = pair_sequences(world / "data/cache/pref/mine_val.bin")
    assert train_meta["num_pairs"] + val_meta["num_pairs"] == 19 and len(train) + len(val) == 19
    assert train_meta["dropped"] == {
        "an empty answer": 3,
        "chosen and rejected the same text": 3,
        "conversations that differ before their last answer": 3,
    }
    s = train_meta["special_tokens"]
    rule_end, asst = s["<|eot|>"], s["<|assistant|>"]
    for chosen, rejected in train + val:
        a, b = chosen.index(asst), rejected.index(asst)
        assert chosen[: a + 1] == rejected[: b + 1]  # one prompt
        assert chosen[-1] == rejected[-1] == rule_end  # each answer ends with its end-of-turn token
    # the HH row is its conversation in the built-in format: two user turns, the last answer scored
    text = lambda ids: bytes(t for t in ids if t < 256).decode()  # noqa: E731
    hh = [c for c, _ in train + val if "Kelm" in text(c) and text(c).endswith("Plums.")]
    assert len(hh) == 3 and hh[0].count(asst) == 2 and hh[0].count(s["<|user|>"]) == 2
    # every pair of one prompt on one side of the split
    prompts = lambda pairs: {tuple(c[: c.index(asst)]) for c, _ in pairs}  # noqa: E731
    assert not prompts(train) & prompts(val)

    bad = jsonl(world / "bad.jsonl", [ROWS[0], {"prompt": "x", "chosen": 3, "rejected": "y"}, "not json"])
    before = (world / "data/cache/pref/mine_train.bin").read_bytes()
    r = run_cli("prepare", "--pref", f"mine={bad}", cwd=world)
    assert r.returncode == 2
    assert f"{bad}:2: " in r.stderr and '"chosen" must be a string or a non-empty list of messages' in r.stderr
    assert f"{bad}:3: " in r.stderr
    assert (world / "data/cache/pref/mine_train.bin").read_bytes() == before  # nothing published


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_pair_tokens_are_the_sft_tokens_of_the_same_turns_in_real_templates(tmp_path, family):
    """Qwen3's official template (its think block on the last answer) and Llama 3.2's (its BOS and dated system
    header), in model directories as published (tests/real_models.py; not the session's trained ones, whose lock
    would keep a worker waiting): a pair's chosen conversation is token for token the SFT example of the same
    turns, one BOS, the generation header once, and the answer scored from its first token to its end-of-turn
    token."""
    model_directory(family, tmp_path / "model")
    conversation = [
        {"role": "user", "content": "Hi, I am Ann."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What does animal 3 eat?"},
    ]
    chosen, rejected = "Animal 3 eats plums.", "Animal 3 eats rocks, sand and more rocks."
    jsonl(tmp_path / "sft.jsonl", [{"messages": [*conversation, {"role": "assistant", "content": chosen}]}] * 2)
    jsonl(
        tmp_path / "pref.jsonl",
        [
            {
                "prompt": conversation,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        ]
        * 2,
    )
    r = run_cli("prepare", "--tokenizer", "model", "--sft", "qa=sft.jsonl", "--pref", "qa=pref.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta, pairs = pair_sequences(tmp_path / "data/cache/pref/qa_train.bin")
    sft = open_cache(tmp_path / "data/cache/sft/qa_train.bin", "sft")
    example = sft.tokens[sft.starts[0] : sft.starts[1]].tolist()
    assert pairs[0][0] == example
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "model/tokenizer.json"))
    rule_start, rule_end = meta["chat"]["answer_start"], meta["chat"]["answer_end"]
    for seq, answer in zip(pairs[0], (chosen, rejected)):
        text = tok.decode(seq, skip_special_tokens=False)
        if family == "llama3":
            assert seq.count(tok.token_to_id("<|begin_of_text|>")) == 1 and seq[0] == tok.token_to_id(
                "<|begin_of_text|>"
            )
        start, stop = last_answer(np.array(seq), PairSource([sft], np.ones(1), 64, ["x"]).answers)
        assert seq[start - len(rule_start) : start] == rule_start  # the generation header, once before the answer
        assert seq[stop - 1] == rule_end and answer in tok.decode(seq[start:stop], skip_special_tokens=False)
        assert text.count(answer) == 1 and stop >= len(seq) - 1  # after it at most the template's newline


def test_a_long_pair_is_cut_prompt_first_from_the_left_and_never_loses_its_answer(world):
    assert fit_pair(10, (5, 7), 40) == (10, 7)  # fits: whole
    assert fit_pair(30, (5, 7), 32) == (25, 7)  # the prompt cut from the left, the answers whole
    assert fit_pair(30, (5, 40), 32) == (16, 16)  # the prompt down to half the row, then the answers cut
    cache = open_cache(world / "data/cache/pref/facts_train.bin", "pref")
    for T in (12, 24, 256):
        source = PairSource([cache], np.ones(1), T, ["pref/facts"])
        batch = source.batch_of([(0, i) for i in range(cache.num_examples // 2)])
        counted = (batch.y_masked != -100).sum(dim=1)
        assert (counted >= T // 2).all() or T == 256  # an answer keeps at least half a row
        assert (counted > 0).all()
        if T == 256:  # nothing cut: each row's scored targets are exactly its last answer, <|eot|> included
            eot = cache.meta["special_tokens"]["<|eot|>"]
            last = batch.y_masked.gather(1, (batch.y_masked != -100).cumsum(1).argmax(1, keepdim=True))
            assert (last == eot).all()


# ---------------------------------------------------------------------------------------------------------------
# The losses


def test_each_loss_is_its_papers_formula_on_a_hand_made_batch():
    pc, pr = torch.tensor([-3.0, -8.0, -2.5]), torch.tensor([-4.0, -7.0, -9.0])  # summed answer log-probs
    nc, nr = torch.tensor([3, 4, 2]), torch.tensor([2, 5, 6])
    rc, rr = torch.tensor([-3.5, -7.5, -3.0]), torch.tensor([-3.5, -7.5, -8.0])
    logps, counts, ref = torch.cat([pc, pr]), torch.cat([nc, nr]), torch.cat([rc, rr])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(3):
        a, b, ra, rb, na, nb = (float(v[i]) for v in (pc, pr, rc, rr, nc, nr))
        dpo = -math.log(sig(0.1 * ((a - ra) - (b - rb))))  # Rafailov et al., eq. 7
        ipo = ((a - ra) / na - (b - rb) / nb - 1 / (2 * 0.1)) ** 2  # Azar et al., eq. 17 (per-token log-ratios)
        simpo = -math.log(sig(2.0 * a / na - 2.0 * b / nb - 1.0))  # Meng et al., eq. 6
        odds = lambda p: p / (1 - p)  # noqa: E731
        pa, pb = math.exp(a / na), math.exp(b / nb)
        orpo_ratio = -0.1 * math.log(sig(math.log(odds(pa) / odds(pb))))  # Hong et al., eq. 6-7
        for cfg, want in (
            (PreferenceConfig("dpo", beta=0.1), dpo),
            (PreferenceConfig("ipo", tau=0.1), ipo),
            (PreferenceConfig("simpo", beta=2.0, gamma=1.0), simpo),
            (PreferenceConfig("orpo", lambda_=0.1), orpo_ratio),
        ):
            got = pair_losses(cfg, logps.double(), counts, ref.double())["loss"][i].item()
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), cfg.loss
    # the policy is its reference: DPO's loss is ln 2 for every pair
    assert torch.allclose(pair_losses(PreferenceConfig("dpo", beta=0.1), ref, counts, ref)["loss"], torch.tensor(LN2))


def trl_inputs():
    """A tiny Llama-style model of ours and the same weights as a transformers model (and a second pair of them for a
    reference), and a tokenizer TRL can render two pairs with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from trainer_accel.models import families

    cfg = ModelConfig(**LLAMA)
    mapping = families.writing(cfg.to_dict())

    def both(seed):
        torch.manual_seed(seed)
        ours = build_model(cfg, "cpu").eval()
        hf_cfg = mapping.hf_config(cfg.to_dict(), {"<|endoftext|>": 256}, "<|endoftext|>", "<|endoftext|>")
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg), dtype=torch.float32)
        hf.load_state_dict(mapping.state_to_hf(ours.state_dict(), cfg.to_dict()))
        return ours, hf

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(260)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t256", eos_token="t256")  # pad = eos, as TRL's
    rows = [
        {"prompt": "t1 t2 t3", "chosen": " t4 t5", "rejected": " t6 t7 t8 t9"},
        {"prompt": "t10 t11", "chosen": " t12 t13 t14 t15 t16", "rejected": " t17"},
    ]
    return both(0), both(1), tok, rows


def test_dpo_and_orpo_equal_trl_on_the_same_model_and_pair_tokens(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from trainer_accel.training.losses import answer_logps

    (ours, hf), (ref_ours, ref_hf), tok, rows = trl_inputs()
    common = dict(report_to="none", use_cpu=True, per_device_train_batch_size=2, bf16=False)
    dpo = DPOTrainer(
        model=hf,
        ref_model=ref_hf,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), beta=0.1, **common),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = dpo.data_collator([dpo.train_dataset[i] for i in range(2)])
    theirs = dpo.compute_loss(dpo.model, batch).item()
    ids, answer, real = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
    # TRL pads with its eos and masks by position: the first eos after an answer is scored, the padding is not
    assert (ids[answer == 1] == 256).sum() == 4
    y = ids[:, 1:]
    ours_batch = Batch(ids[:, :-1], y, torch.where(answer[:, 1:] == 1, y, -100))
    with torch.no_grad():
        ours_batch.ref_logps = answer_logps(ref_ours, ours_batch, ours_batch.y_masked)[1]
        out = preference_loss(PreferenceConfig("dpo", beta=0.1))(ours, ours_batch)
    assert (out.total / out.weight).item() == pytest.approx(theirs, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert (out.metrics[name] / out.weight).item() == pytest.approx(dpo._metrics["train"][name][-1], abs=1e-5)

    orpo = ORPOTrainer(
        model=hf,
        args=ORPOConfig(output_dir=str(tmp_path / "orpo"), beta=0.1, max_length=32, **common),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = orpo.data_collator([orpo.train_dataset[i] for i in range(2)])
    theirs, metrics = orpo.get_batch_loss_metrics(orpo.model, batch)
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    real = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    y = ids[:, 1:]
    ours_batch = Batch(ids[:, :-1], y, labels[:, 1:], y_all=torch.where(real[:, 1:] == 1, y, -100))
    with torch.no_grad():  # TRL's ORPO counts the prompt in its NLL: our switch on
        out = preference_loss(PreferenceConfig("orpo", lambda_=0.1, nll_counts_prompt=True))(ours, ours_batch)
    assert (out.total / out.weight).sum().item() == pytest.approx(theirs.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "log_odds_ratio", "log_odds_chosen"):
        assert (out.metrics[name] / out.weight[0]).item() == pytest.approx(metrics[name], abs=1e-5)
    nll = out.metrics["nll_loss"]
    assert (nll[0] / nll[1]).item() == pytest.approx(metrics["nll_loss"], abs=1e-5)


def test_activation_checkpointing_gives_the_same_preference_gradients(world):
    cache = open_cache(world / "data/cache/pref/facts_train.bin", "pref")
    batch = PairSource([cache], np.ones(1), 32, ["pref/facts"]).batch_of([(0, i) for i in range(4)])
    grads = []
    for every in (0, 1):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**TINY_MODEL, "dropout": 0.2}), "cpu")
        model.checkpoint_every = every
        torch.manual_seed(5)
        out = preference_loss(PreferenceConfig("simpo", beta=2.0, gamma=1.0))(model, batch)
        out.total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_the_gate_wants_better_pairs_kept_answers_kept_text_and_answers_that_end():
    def pairs(b, c, **gen):
        g = {"baseline_length": 10.0, "candidate_length": 11.0, "baseline_ended": 0.9, "candidate_ended": 0.9, **gen}
        return {"name": "pref/facts", "kind": "pref", "baseline": b, "candidate": c, "delta": c - b, "generation": g}

    sft = {"name": "sft/dolly", "kind": "sft", "baseline": 1.0, "candidate": 1.05, "delta": 0.05}
    wiki = {"name": "streams/wiki", "kind": "stream", "baseline": 2.0, "candidate": 2.02, "delta": 0.02}
    assert preference_gate([pairs(0.6, 0.8), sft, wiki], 0.1) == ("pass", [])
    verdict, reasons = preference_gate([pairs(0.6, 0.6), {**sft, "delta": 0.3}, {**wiki, "delta": 0.2}], 0.1)
    assert verdict == "fail" and len(reasons) == 3
    assert "pair accuracy did not rise (0.600 -> 0.600)" in reasons[0]
    assert "SFT val loss rose by +0.3000" in reasons[1] and "pretrain val loss rose by +0.2000" in reasons[2]
    verdict, reasons = preference_gate([pairs(0.6, 0.9, candidate_length=40.0, candidate_ended=0.5)], 0.1)
    assert verdict == "fail" and "grew from 10.0 to 40.0 tokens" in reasons[0] and "fell from 90% to 50%" in reasons[1]
    assert preference_gate([sft], 0.1)[1] == ["no measured preference validation set to show an improvement on"]


def test_a_preference_config_says_each_mistake_in_one_line(world):
    def problems(section, adapter=None):
        path = pref_config(world / "p.json", preference=section, adapter=adapter)
        with pytest.raises(UserError) as e:
            load_config(path, "preference")
        return e.value.problems

    assert problems({"loss": "kto"}) == [
        f'{world / "p.json"}.preference.loss: expected one of dpo, ipo, simpo, orpo, got "kto"'
    ]
    assert problems({"loss": "dpo", "gamma": 1.0}) == [
        f"{world / 'p.json'}.preference.gamma: not a setting of loss dpo (it takes beta, reference); gamma is simpo's"
    ]
    assert 'use "precomputed"' in problems({"loss": "dpo", "reference": "live"})[0]
    assert problems({"loss": "orpo", "lambda": -1})[0].endswith("preference.lambda: must be positive, got -1.0")
    cfg = load_config(pref_config(world / "ok.json", preference={"loss": "ipo"}, adapter={}), "preference")
    assert cfg.settings.reference == "live" and cfg.resolved()["preference"] == {
        "loss": "ipo",
        "tau": 0.1,
        "reference": "live",
    }


# ---------------------------------------------------------------------------------------------------------------
# Runs


def losses(world: Path, sub: str) -> list[float]:
    found = [json.loads(x) for x in (world / sub / "metrics/events.jsonl").read_text().splitlines()]
    return [e["train/loss"] for e in found if e["event"] == "train" and e["phase"] == "preference"]


def weights(world: Path, sub: str) -> dict:
    return load_file(str(world / sub / "checkpoints/preference/latest/model.safetensors"))


def test_dpo_starts_at_ln2_keeps_its_reference_and_resumes_exactly(world):
    cfg = pref_config(world / "dpo.json")
    args = ("run", "--phase", "preference", "--config", str(cfg))
    ref = run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "computing the reference log-probabilities of its pairs (none computed yet)" in ref.stderr
    assert "preference step 0 | val loss 0.6931 (before training)" in ref.stderr
    found = [json.loads(x) for x in (world / "ref/metrics/events.jsonl").read_text().splitlines()]
    first = next(e for e in found if e["event"] == "train")
    assert first["train/loss"] == pytest.approx(LN2, abs=1e-6)  # the policy is its reference at step 1
    assert first["train/rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["train/rewards/margins"] == 0
    for name in ("rewards/accuracies", "logps/chosen", "logps/rejected", "lengths/chosen"):
        assert f"train/{name}" in first and any(f"val/{name}" in e for e in found if e["event"] == "eval")
    assert (world / "data/cache/pref/facts_train.bin.ref.safetensors").is_file()

    # killed right after its second checkpoint and resumed: the same bytes as never stopped, the reference read back
    cut = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    assert run_cli(*args, cwd=world, env={**cut, "TRAINER_FAULT": "after_meta:2"}).returncode == -9
    again = run_cli(*args, cwd=world, env=cut)
    assert again.returncode == 0 and "resumed from" in again.stderr and "at step 2" in again.stderr, again.stderr
    assert "computing the reference" not in again.stderr
    assert all(torch.equal(a, b) for a, b in zip(weights(world, "cut").values(), weights(world, "ref").values()))
    assert losses(world, "cut")[-2:] == losses(world, "ref")[-2:]

    # another T cuts other pairs: their reference is computed again, saying why
    other = pref_config(world / "t16.json", {"T": 16})
    r = run_cli(
        "run",
        "--phase",
        "preference",
        "--config",
        str(other),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": str(world / "t16")},
    )
    assert (
        r.returncode == 0
        and "was computed for another start model, cache, tokenizer, template, T or precision" in r.stderr
    )


def test_orpo_on_two_processes_with_accumulation_equals_one_batch(world):
    """ORPO's loss is two means (pairs, and the NLL's tokens): both are global over the step, so any split of
    the batch into micro-steps and processes trains the same model."""
    orpo = {"loss": "orpo", "nll_counts_prompt": True}
    one = pref_config(world / "one.json", {"B": 4, "accum_steps": 1}, orpo)
    r = run_cli(
        "run",
        "--phase",
        "preference",
        "--config",
        str(one),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": str(world / "one")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    two = pref_config(world / "two.json", {"B": 1, "accum_steps": 2}, orpo)
    r = launch(
        world, "cpu_2proc.yaml", "--phase", "preference", "--config", str(two), "--device", "cpu",
        env={"TRAINER_ARTIFACTS_DIR": str(world / "two")},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(world, "two") == pytest.approx(losses(world, "one"), abs=1e-5)
    a, b = weights(world, "one"), weights(world, "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ends = [e for e in events(world / "two") if e["event"] == "train"][-1]
    assert 0 < ends["train/nll_loss"] and "train/nll_loss/answer" in ends and "train/log_odds_chosen" in ends


def test_dpo_under_fsdp2_reads_one_processes_reference_and_resumes_recomputing_it(world):
    """The reference is the same for any process count: FSDP2 on 2 processes reads the file one process wrote and
    trains the same model; stopped after step 4 with the file gone, it recomputes it from the run's parent (the
    sharded model's own state is never what is hashed; a run from random weights draws them from its seed again)
    and ends bit for bit as never stopped."""
    one = pref_config(world / "one.json", {"B": 2, "accum_steps": 2, "grad_clip": 0.0})
    r = run_cli(
        "run",
        "--phase",
        "preference",
        "--config",
        str(one),
        cwd=world,
        env={"TRAINER_ARTIFACTS_DIR": str(world / "one")},
    )
    assert r.returncode == 0 and "computing the reference" in r.stderr, r.stderr[-2000:]
    two = pref_config(world / "two.json", {"B": 1, "accum_steps": 2, "grad_clip": 0.0})
    fsdp = {"launcher": ("--num_processes", "2", "--mixed_precision", "no")}
    emulated = ("fsdp.yaml", [str(EMULATED), "fsdp"], "--phase", "preference", "--config", str(two))
    r = launch_with(world, *emulated, artifacts="fsdp", **fsdp)
    assert r.returncode == 0 and "computing the reference" not in r.stderr, r.stderr[-3000:]
    a, b = weights(world, "one"), weights(world, "fsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    shutil.copytree(world / "fsdp", world / "cut")
    for d in ("latest", "best", "step_0000006"):
        shutil.rmtree(world / "cut/checkpoints/preference" / d, ignore_errors=True)
    for f in (world / "data/cache/pref").glob("*.ref.safetensors"):
        f.unlink()
    r = launch_with(world, *emulated, artifacts="cut", **fsdp)
    assert r.returncode == 0 and "at step 4" in r.stderr and "computing the reference" in r.stderr, r.stderr[-3000:]
    assert all(torch.equal(x, y) for x, y in zip(weights(world, "cut").values(), weights(world, "fsdp").values()))


def test_an_adapters_live_reference_equals_the_precomputed_one_and_resumes_exactly(world):
    adapter = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
    model = {**TINY_MODEL, "dropout": 0.1}
    base = write_config(world / "base.json", "pretrain", {"total_steps": 1, "warmup_steps": 1}, model_cfg=model)
    assert run_cli("run", "--phase", "pretrain", "--config", str(base), cwd=world).returncode == 0
    runs = {}
    for name, reference in (("live", "live"), ("pre", "precomputed")):
        cfg = pref_config(
            world / f"{name}.json", preference={"loss": "dpo", "reference": reference}, adapter=adapter,
            model_cfg=model, init_from=str(world / "checkpoints/pretrain/latest"),
        )  # fmt: skip
        runs[name] = ("run", "--phase", "preference", "--config", str(cfg))
    # the reference is the base, the adapter off: computed live, or once ahead
    r = run_cli(*runs["live"], cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "live")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "computing the reference" not in r.stderr
    r = run_cli(*runs["pre"], cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "pre")})
    assert r.returncode == 0 and "computing the reference" in r.stderr, r.stderr[-3000:]
    assert losses(world, "pre") == pytest.approx(losses(world, "live"), abs=1e-5)
    assert "val loss 0.6931 (before training)" in r.stderr  # a fresh adapter (B = 0) is its base: ln 2, dropout off
    cut = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    assert run_cli(*runs["live"], cwd=world, env={**cut, "TRAINER_FAULT": "after_meta:2"}).returncode == -9
    assert run_cli(*runs["live"], cwd=world, env=cut).returncode == 0
    a, b = weights(world, "cut"), weights(world, "live")
    assert set(a) == set(b) and all(".lora_" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)


def test_three_phase_pipeline_resumes_in_preference_and_gates_its_best(world):
    short = {"total_steps": 4, "ckpt_every": 2, "eval_every": 2, "warmup_steps": 1}
    write_config(world / "c/pretrain.json", "pretrain", short)
    write_config(world / "c/sft.json", "sft", short, init_from="checkpoints/pretrain/best")
    pref_config(world / "c/pref.json", short, init_from="checkpoints/sft/best")
    (world / "c/pipeline.json").write_text(
        json.dumps(
            {
                "phases": [
                    {"phase": "pretrain", "config_path": "pretrain.json"},
                    {"phase": "sft", "config_path": "sft.json"},
                    {"phase": "preference", "config_path": "pref.json"},
                ]
            }
        )
    )
    args = ("run", "--phase", "pipeline", "--config", "c/pipeline.json")
    ref = run_cli(*args, cwd=world, env={"TRAINER_ARTIFACTS_DIR": str(world / "ref")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "pipeline: preference starts from the sft best" in ref.stderr
    assert "pref/facts acc" in ref.stderr and "answers ended" in ref.stderr and "verdict: " in ref.stderr
    record = json.loads((world / "ref/checkpoints/best.pt.json").read_text())
    assert record["phase"] == "preference" and record["verdict"] in ("pass", "fail")
    # pretrain 2 + SFT 2 checkpoints, then killed after preference's first
    cut = {"TRAINER_ARTIFACTS_DIR": str(world / "cut")}
    assert run_cli(*args, cwd=world, env={**cut, "TRAINER_FAULT": "after_meta:5"}).returncode == -9
    again = run_cli(*args, cwd=world, env=cut)
    assert again.returncode == 0 and "sft already finished; continuing with preference" in again.stderr, again.stderr
    assert all(torch.equal(a, b) for a, b in zip(weights(world, "cut").values(), weights(world, "ref").values()))
    shutil.rmtree(world / "cut")
