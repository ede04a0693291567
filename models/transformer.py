"""Decoder-only transformer language models, single-device PyTorch.

One module covers three styles as config switches:

* GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
* LLaMA: RMSNorm pre-norm, SwiGLU MLP, rotary embeddings, no biases.
* PaLM: LLaMA plus a parallel attention+MLP block and multi-query attention.

Grouped-query attention is ``n_kv_heads`` between 1 (multi-query) and
``n_heads`` (classic multi-head). A Switch MoE layer (``models.moe``) can
replace the MLP in chosen blocks through ``DecoderConfig.moe``.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.gpt3 import GPT3_PRESETS
from models.mlp import MLP
from models.moe import SwitchConfig, SwitchMLP

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 320
    """Rows of the token embedding (the tokenizer's vocab, padded)."""
    seq_len: int = 128
    """Longest sequence the model sees; sizes the learned position table."""
    d_model: int = 96
    """Residual stream width."""
    n_layers: int = 3
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads: None = n_heads (MHA), 1 = multi-query, else grouped-query."""
    d_ff: int | None = None
    """MLP hidden width; None = 4*d_model (GELU) or 8/3*d_model rounded to 32 (SwiGLU)."""
    norm: str = "rmsnorm"
    """'layernorm' (GPT-2) or 'rmsnorm' (LLaMA/PaLM)."""
    mlp: str = "swiglu"
    """'gelu' (GPT-2) or 'swiglu' (LLaMA/PaLM)."""
    pos: str = "rope"
    """'learned' absolute positions (GPT-2) or 'rope' rotary embeddings."""
    parallel_block: bool = False
    """PaLM's x + attn(norm(x)) + mlp(norm(x)) instead of two sequential sublayers."""
    bias: bool = False
    """Biases in linear layers and norms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    dropout: float = 0.0
    """Dropout on attention output, MLP output and embeddings."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-5
    """Epsilon inside LayerNorm/RMSNorm."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual projections get std/sqrt(2*n_layers)."""
    moe: Any = None
    """A ``models.moe.SwitchConfig`` to use Switch layers in place of some MLPs, or None."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"pos must be 'learned' or 'rope', got {self.pos!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.moe is not None:
            out["moe"] = dataclasses.asdict(self.moe)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        d = dict(d)
        if d.get("moe") is not None and isinstance(d["moe"], dict):
            d["moe"] = SwitchConfig(**d["moe"])
        return cls(**d)


# Style switches per family; sizes come from PRESETS.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", parallel_block=False, bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", parallel_block=False, bias=False, tie_embeddings=False),
    "palm": dict(norm="rmsnorm", mlp="swiglu", pos="rope", parallel_block=True, bias=False, tie_embeddings=True,
                 n_kv_heads=1),
}

PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=96, n_layers=3, n_heads=4, seq_len=128),       # ~0.3M params, for tests
    "mini": dict(d_model=128, n_layers=4, n_heads=4, seq_len=128),      # ~0.8M
    "small": dict(d_model=256, n_layers=4, n_heads=8, seq_len=256),     # ~3M
    "medium": dict(d_model=512, n_layers=8, n_heads=8, seq_len=512),    # ~25M
    "base": dict(d_model=768, n_layers=12, n_heads=12, seq_len=1024),   # GPT-2 small sized
    "large": dict(d_model=1024, n_layers=24, n_heads=16, seq_len=1024),  # GPT-2 medium sized
    **GPT3_PRESETS,                                                      # gpt3-small ... gpt3-175b (models/gpt3.py)
}


def decoder_config(family: str, preset: str | None = None, **overrides: Any) -> DecoderConfig:
    """Family style + preset sizes + explicit overrides (None values are ignored)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown decoder family {family!r}; choose one of {sorted(FAMILIES)}")
    fields: dict[str, Any] = dict(FAMILIES[family])
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset[:40]!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return DecoderConfig(**fields)


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


# ----------------------------------------------------------------------------- counting


def param_counts(cfg: DecoderConfig) -> dict[str, int]:
    """Exact parameter counts, by formula (tests check them against the module).

    ``non_embedding`` leaves out the token embedding, the learned position table
    and an untied output projection: the vocabulary-sized matrices (Kaplan et al.).
    """
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    b = 1 if cfg.bias else 0
    norm = d * (1 + b)
    attn = d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.n_heads * hd * d
    attn += b * (cfg.n_heads * hd + 2 * cfg.kv_heads * hd + d)
    n_mats = 3 if cfg.mlp == "swiglu" else 2
    dense_mlp = n_mats * d * cfg.ff_dim + b * ((n_mats - 1) * cfg.ff_dim + d)
    blocks = 0
    for layer in range(L):
        mlp = dense_mlp
        if cfg.moe is not None and cfg.moe.applies_to(layer):
            mlp = cfg.moe.num_experts * dense_mlp + d * cfg.moe.num_experts  # experts + router
        blocks += attn + mlp + norm * (1 if cfg.parallel_block else 2)
    non_embedding = blocks + norm
    embedding = cfg.vocab_size * d + (cfg.seq_len * d if cfg.pos == "learned" else 0)
    if not cfg.tie_embeddings:
        embedding += cfg.vocab_size * d
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def active_params(cfg: DecoderConfig) -> int:
    """Parameters a token passes through (one expert per Switch layer): the N of 6N for MoE."""
    if cfg.moe is None:
        return param_counts(cfg)["total"]
    dense = dataclasses.replace(cfg, moe=None)
    n_moe = sum(1 for layer in range(cfg.n_layers) if cfg.moe.applies_to(layer))
    return param_counts(dense)["total"] + n_moe * cfg.d_model * cfg.moe.num_experts


def flops_per_token(cfg: DecoderConfig, seq_len: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (forward + backward).

    ``6N`` is Chinchilla's C = 6ND with N all (active) parameters.
    ``with_attention`` adds the attention score/value matmuls as in PaLM's MFU
    formula: 6N + 12 * n_layers * n_heads * head_dim * seq_len.
    """
    T = cfg.seq_len if seq_len is None else seq_len
    n = active_params(cfg)
    six_n = 6.0 * n
    attn = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    return {"6N": six_n, "with_attention": six_n + attn}
