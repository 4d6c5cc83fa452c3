"""A decoder-only transformer, GPT-2's and the Llama family's, and its sampler.

One configurable decoder (as litgpt has) rather than a module per family: GPT-2 is learned positions, LayerNorm
and a GELU MLP with multi-head attention; Llama, Mistral and SmolLM are rotary positions, RMSNorm, a gated SiLU
MLP (SwiGLU) and grouped-query attention; Qwen2 adds biases on q, k and v; Qwen3 a norm on q and k and a head
width of its own. Every option's default is GPT-2's (config.ModelConfig), so older checkpoints keep their keys.

The model returns logits (`decode` is the KV-cached path generation.py uses); the loss belongs to the phase, so
a new phase never touches this file. A phase that passes its targets gets their per-token log-probabilities, or
their summed cross-entropy, computed in chunks of tokens so that a large vocabulary's (B, T, V) fp32 logits never
exist at once. Shapes use the config's letters: (B, T) token ids
in, (B, T, V) logits out, (B, T, C) inside; hd is one head's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer_accel.models.attention import masked_attention
from trainer_accel.models.config import ModelConfig

IGNORE_INDEX = -100  # a target the loss does not count (data/cache.py writes it)
LOGIT_CHUNK_BYTES = 1 << 28  # fp32 logits of one loss chunk: 256 MiB, e.g. 441 tokens at V = 151,936
ACTIVATION = {"gelu": lambda x: F.gelu(x), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=cfg.ln_eps)
    return nn.LayerNorm(width, eps=cfg.ln_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """(hd / 2,) rotary inverse frequencies, with Llama 3's scaling when the config carries it: wavelengths longer
    than the original context are stretched by `factor`, short ones kept, those between blended smoothly."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rotary_tables(cfg: ModelConfig, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions `pos` ((T,) or (B, T)): (..., T, hd), computed in fp32 (a bf16 angle at position
    4,000 is off by whole radians)."""
    angles = pos.float()[..., None] * rope_frequencies(cfg, pos.device)  # (..., T, hd / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions in the half-split layout (feature i pairs with i + hd/2), the layout of Hugging Face's
    Llama weights, so their q and k projections load unpermuted."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.KV, self.hd = cfg.H, cfg.kv_heads, cfg.hd
        self.qkv = nn.Linear(cfg.C, (self.H + 2 * self.KV) * self.hd, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(self.H * self.hd, cfg.C, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, self.hd), make_norm(cfg, self.hd)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv=None,
    ) -> torch.Tensor:
        """`kv`: (k buffer, v buffer, start) of a KV cache (generation.py): this call's keys and values are written
        at start.., and the queries attend over the filled part under `mask` (None: no padding, so a prefill from
        position 0 is plainly causal and a single new token sees every key)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.hd, self.KV * self.hd, self.KV * self.hd], dim=2)
        q, k, v = q.view(B, T, self.H, self.hd), k.view(B, T, self.KV, self.hd), v.view(B, T, self.KV, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        if rope is not None:
            cos, sin = (t if t.dim() == 2 else t[:, None] for t in rope)  # packed rows: one table per row
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv is not None:
            k_buf, v_buf, start = kv
            k_buf[:, :, start : start + T], v_buf[:, :, start : start + T] = k, v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
            if mask is None and start > 0 and T > 1:
                raise ValueError("tokens after the first call of a cache need a mask unless they come one at a time")
            if mask is not None:
                mask = mask[..., : start + T]
            elif T == 1:  # one query that sees every key so far
                gqa = {"enable_gqa": True} if self.KV != self.H else {}
                y = F.scaled_dot_product_attention(q, k, v, **gqa)
                return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, self.H * self.hd)))
        p = self.dropout if self.training else 0.0
        if mask is None:  # the flash / fused causal kernels
            gqa = {"enable_gqa": True} if self.KV != self.H else {}  # each k/v head serves H / KV query heads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, **gqa)
        else:  # packed rows, causal within each example (see packed_layout), or a padded batch being generated
            y = masked_attention(q, k, v, mask, p)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, self.H * self.hd)))


class MLP(nn.Module):
    """plain: down(act(up x)). gated: `up` holds the gate's rows, then the up rows (one matmul for both), and the
    block computes down(act(gate x) * up x): SwiGLU with activation silu."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "gated"
        self.up = nn.Linear(cfg.C, cfg.d_ff * (2 if self.gated else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.C, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = ACTIVATION[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.drop(self.down(self.act(gate) * up))
        return self.drop(self.down(self.act(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.C)
        self.attn = SelfAttention(cfg)
        self.ln2 = make_norm(cfg, cfg.C)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv=None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask, rope, kv)
        return x + self.mlp(self.ln2(x))


def packed_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) example ids of packed rows -> positions that start at 0 with each example, and the (B, 1, T, T)
    attention mask that lets a token see only the tokens before it in its own example (block-diagonal causal).

    SDPA with this boolean mask on every device: on an H200 it measured faster end to end than FlexAttention, whose
    kernel is quicker (0.74 vs 0.92 ms at GPT-2 small's shape) but whose block mask must be built for every batch
    (docs/devices.md)."""
    T = segments.shape[1]
    ar = torch.arange(T, device=segments.device)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    pos = ar - torch.cummax(torch.where(first, ar, 0), dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return pos, ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy of (N, C) hidden states through the (V, C) head against (N,) targets, `chunk` tokens at a
    time: summed ("sum"), or per token ("none": (N,), 0 where a target is IGNORE_INDEX). Each chunk's logits are
    recomputed in the backward pass instead of kept, so at most one chunk's fp32 logits exist (the price: the
    head's forward matmul twice). One chunk when N fits: today's exact path."""
    if h.shape[0] <= chunk:
        return _chunk_loss(h, weight, targets, reduction)
    parts = [
        checkpoint(_chunk_loss, h[i : i + chunk], weight, targets[i : i + chunk], reduction, use_reentrant=False)
        for i in range(0, h.shape[0], chunk)
    ]
    if reduction == "none":
        return torch.cat(parts)
    total = h.new_zeros((), dtype=torch.float32)
    for part in parts:
        total = total + part
    return total


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.V, cfg.C)
        if cfg.position == "learned":  # rotary positions have no weights: their tables are computed per batch
            self.pos_emb = nn.Embedding(cfg.T, cfg.C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.L))
        self.ln_f = make_norm(cfg, cfg.C)
        self.lm_head = nn.Linear(cfg.C, cfg.V, bias=False)
        self.loss_chunk = max(1, LOGIT_CHUNK_BYTES // (4 * cfg.V))  # tokens per chunk of the loss
        self.checkpoint_every = 0  # activation checkpointing: every k-th block recomputed in backward (0: none)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.L))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        idx: torch.Tensor,
        segments: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "sum",
    ) -> torch.Tensor:
        """(B, T, V) logits; with `targets` (B, T) the summed cross-entropy of the targets that are not
        IGNORE_INDEX, in fp32 (chunked_cross_entropy), or with reduction "none" each target's (B, T) log-probability
        (0 where not counted): the phase reduces them. `segments` (B, T): packed rows' example ids; each example
        then sees only itself, from position 0."""
        B, T = idx.shape
        if T > self.cfg.T:
            raise ValueError(f"sequence of {T} tokens is longer than the model context T={self.cfg.T}")
        pos, mask = (torch.arange(T, device=idx.device), None) if segments is None else packed_layout(segments)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.cfg.position == "learned":
            x, rope = x + self.pos_emb(pos), None
        else:
            rope = rotary_tables(self.cfg, pos)
        x = self.drop(x)
        k = self.checkpoint_every if self.training and torch.is_grad_enabled() else 0
        for i, block in enumerate(self.blocks):
            if k and i % k == 0:  # keeps only the block's input; its RNG state too, so dropout draws the same masks
                x = checkpoint(block, x, mask, rope, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, mask, rope)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        if reduction == "none":
            nll = chunked_cross_entropy(
                x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.loss_chunk, "none"
            )
            return -nll.view(B, T)
        return chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.loss_chunk)

    def decode(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """(B, t) new tokens at positions `pos` (B, t), their keys and values written into `cache` (a
        generation.KVCache) at cache.length, each query seeing the keys `mask` (B, 1, t, cache size) allows:
        (B, t, V) logits. The generation path: prefill a prompt once, then one token per step."""
        x = self.tok_emb(idx)
        if self.cfg.position == "learned":
            x, rope = x + self.pos_emb(pos), None
        else:
            rope = rotary_tables(self.cfg, pos)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, (cache.k[i], cache.v[i], cache.length))
        return self.lm_head(self.ln_f(x))
