"""`generate --bench`: tokens/s with the KV cache and without it (the whole prefix again for every token, as
generation worked before the cache), at several prompt lengths up to prompt + answer = T, greedy, on the machine
at hand; and, for a Hugging Face directory, transformers' own `generate` with its cache on the same prompts.
Each way produces the same tokens (checked), so the figures compare like with like; ratios are taken in one run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trainer_accel.inference.load import LoadedModel
from trainer_accel.models.generation import generate_ids


@torch.no_grad()
def uncached(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.lm_head.weight.device)
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def _timed(fn, repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(lm: LoadedModel, hf_dir: Path | None) -> list[dict]:
    T = lm.model.cfg.T
    theirs = None
    if hf_dir is not None:
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    for plen, new in ((16, 64), (T // 4, T // 4), (T // 2, T // 2)):
        if plen + new > T:
            continue
        prompt = [int(x) for x in torch.randint(0, 256, (plen,), generator=torch.Generator().manual_seed(plen))]
        t_cached, a = _timed(lambda: generate_ids(lm.model, [prompt], new)[0])
        t_plain, b = _timed(lambda: uncached(lm.model, prompt, new))
        row = {
            "prompt": plen,
            "new": new,
            "cached_tok_s": new / t_cached,
            "uncached_tok_s": new / t_plain,
            "speedup": t_plain / t_cached,
            "same_tokens": a == b,
        }
        if theirs is not None:
            ids = torch.tensor([prompt])
            t_hf, c = _timed(
                lambda: theirs.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )[0, plen:].tolist()
            )
            row.update(transformers_tok_s=new / t_hf, ours_vs_transformers=t_cached / t_hf, same_as_transformers=a == c)
        rows.append(row)
    return rows


def print_table(rows: list[dict], out) -> None:
    hf = "transformers_tok_s" in rows[0] if rows else False
    head = f"{'prompt':>6} {'new':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}"
    out.write(head + (f" {'transformers tok/s':>19} {'time vs transformers':>21}" if hf else "") + "\n")
    for r in rows:
        line = (
            f"{r['prompt']:>6} {r['new']:>5} {r['cached_tok_s']:>13,.0f} {r['uncached_tok_s']:>15,.0f} "
            f"{r['speedup']:>7.2f}x"
        )
        if hf:
            line += f" {r['transformers_tok_s']:>19,.0f} {r['ours_vs_transformers']:>20.2f}x"
        out.write(
            line + ("" if r["same_tokens"] and r.get("same_as_transformers", True) else "  (tokens differ!)") + "\n"
        )
