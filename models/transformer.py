"""Decoder-only transformer language models, single-device PyTorch.

One module covers three styles as config switches:

* GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
* LLaMA: RMSNorm pre-norm, SwiGLU MLP, rotary embeddings, no biases.
* PaLM: LLaMA plus a parallel attention+MLP block and multi-query attention.

Grouped-query attention is ``n_kv_heads`` between 1 (multi-query) and
``n_heads`` (classic multi-head). A Switch MoE layer (``models.moe``) can
replace the MLP in chosen blocks through ``DecoderConfig.moe``.

``DecoderConfig``, the presets and the parameter and FLOP counts are in
``models/transformer_config.py``, which needs no torch; every name of it is
importable from here too.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mlp import MLP
from models.moe import SwitchMLP
from models.transformer_config import (  # noqa: F401  (re-exported: the config and counts live without torch)
    FAMILIES, PRESETS, DecoderConfig, active_params, decoder_config, flops_per_token, param_counts)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations keep their precision.
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd/2). Rotates (first half, second half) pairs, as HF LLaMA does.
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    cos = torch.cat([cos, cos], dim=-1).to(x.dtype)
    sin = torch.cat([sin, sin], dim=-1).to(x.dtype)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        hd, kv = cfg.head_dim, cfg.kv_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: "KVCache | None", layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)   # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        start = cache.length if cache is not None else 0
        if rope is not None:
            cos, sin = rope[0][start:start + T], rope[1][start:start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                                          # (B, KV, S, hd)
        if cfg.kv_heads != cfg.n_heads:
            rep = cfg.n_heads // cfg.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        if S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # Decoding with a cache: query i sits at absolute position S - T + i.
            qpos = torch.arange(S - T, S, device=x.device)[:, None]
            mask = torch.arange(S, device=x.device)[None, :] <= qpos                  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, cfg.d_model)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


def make_mlp(cfg: DecoderConfig, layer: int) -> nn.Module:
    if cfg.moe is not None and cfg.moe.applies_to(layer):
        return SwitchMLP(cfg.d_model, cfg.ff_dim, cfg.mlp, cfg.bias, cfg.moe)
    return MLP(cfg.d_model, cfg.ff_dim, cfg.mlp, cfg.bias, cfg.dropout)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.parallel = cfg.parallel_block
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = None if cfg.parallel_block else make_norm(cfg)
        self.mlp = make_mlp(cfg, layer)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: "KVCache | None" = None) -> torch.Tensor:
        if self.parallel:
            h = self.norm1(x)
            return x + self.attn(h, rope, cache, self.layer) + self.mlp(h)
        x = x + self.attn(self.norm1(x), rope, cache, self.layer)
        return x + self.mlp(self.norm2(x))


class KVCache:
    """Keys and values of every layer for incremental decoding."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.length += n


# ----------------------------------------------------------------------------- model


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def rope(self) -> tuple | None:
        return (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None

    def embed(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        x = self.tok_emb(idx)                                                        # (B, T, d)
        if self.pos_emb is not None:
            pos = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
            x = x + self.pos_emb(pos)
        return F.dropout(x, self.cfg.dropout, self.training)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d); used by the LM head and by scalar heads."""
        if idx.shape[1] + (cache.length if cache else 0) > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds seq_len {self.cfg.seq_len}")
        x = self.embed(idx, cache.length if cache else 0)
        rope = self.rope()
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean loss.

        Targets equal to IGNORE_INDEX do not count. In training mode Switch
        layers add their auxiliary losses to the returned loss.
        """
        logits = self.lm_head(self.hidden(idx, cache))                               # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        # Switch layers' auxiliary losses shape training only; evaluation reports pure cross-entropy.
        return logits, loss + self.aux_loss() if self.training else loss

    def aux_loss(self) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for block in self.blocks:
            aux = getattr(block.mlp, "aux_loss", None)
            if aux is not None:
                total = total + aux
        return total

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)
