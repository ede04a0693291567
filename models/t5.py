"""A T5-style encoder-decoder (Raffel et al. 2020), single-device PyTorch.

* Relative position buckets: each attention head adds a learned scalar per
  bucket of (key position - query position) to its logits; half the buckets
  are exact offsets, the rest grow logarithmically up to ``max_distance``.
  The encoder's buckets are bidirectional, the decoder's causal; the first
  block of each stack owns the table and every block reuses it. There are no
  absolute positions, so no position table bounds the sequence length.
* RMSNorm pre-norm (T5's "LayerNorm" scales, never shifts), no biases
  anywhere, and no 1/sqrt(head_dim) in attention (T5 folds it into the init).
* Two conventions of the output head, chosen by ``tie_embeddings``:
  T5 v1.0 ties the head to the shared embedding, scales the decoder output
  by d_model**-0.5 first and uses a ReLU MLP; T5 v1.1 has its own unscaled
  ``lm_head`` and a gated-GELU MLP.

``T5Config``, the presets and ``param_counts`` are in ``models/t5_config.py``,
which needs no torch; every name of it is importable from here too.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.t5_config import (  # noqa: F401  (re-exported: the config and counts live without torch)
    PRESETS, T5Config, param_counts, t5_config)

IGNORE_INDEX = -100


def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """(key - query) offsets -> bucket ids in [0, num_buckets), as Mesh TensorFlow's T5 computes them."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets                  # keys after the query: upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)                              # the future is masked anyway
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the variance in float32 (T5LayerNorm)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    """Multi-head attention without biases or logit scaling; the position bias comes in with the mask."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, d) attends to kv (B, Tk, d); bias (B or 1, H, Tq, Tk) holds positions and -inf masks."""
        B, Tq, _ = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        q = self.q(x).view(B, Tq, H, hd).transpose(1, 2)                                  # (B, H, Tq, hd)
        k = self.k(kv).view(B, -1, H, hd).transpose(1, 2)                                 # (B, H, Tk, hd)
        v = self.v(kv).view(B, -1, H, hd).transpose(1, 2)                                 # (B, H, Tk, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.cfg.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, Tq, H * hd))                           # (B, Tq, d)


class FeedForward(nn.Module):
    """v1.0: wo(relu(wi x)); v1.1: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x) if self.gated else F.relu(self.wi(x))
        return self.wo(F.dropout(h, self.dropout, self.training))


class Block(nn.Module):
    """Pre-norm sublayers: self-attention, cross-attention (decoder only), MLP; each x + drop(f(norm(x)))."""

    def __init__(self, cfg: T5Config, cross: bool):
        super().__init__()
        self.self_norm, self.self_attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cross else None
        self.cross_attn = Attention(cfg) if cross else None
        self.ff_norm, self.ff = RMSNorm(cfg.d_model, cfg.norm_eps), FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + F.dropout(self.self_attn(h, h, bias), self.dropout, self.training)
        if self.cross_attn is not None:
            x = x + F.dropout(self.cross_attn(self.cross_norm(x), memory, memory_bias), self.dropout, self.training)
        return x + F.dropout(self.ff(self.ff_norm(x)), self.dropout, self.training)


class Stack(nn.Module):
    """The encoder (bidirectional buckets) or the decoder (causal buckets + cross-attention)."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.relative_bias = nn.Embedding(cfg.num_buckets, cfg.n_heads)                  # shared by all blocks
        self.blocks = nn.ModuleList([Block(cfg, cross=decoder) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def position_bias(self, Tq: int, Tk: int, device) -> torch.Tensor:
        relative = torch.arange(Tk, device=device)[None, :] - torch.arange(Tq, device=device)[:, None]   # (Tq, Tk)
        buckets = relative_bucket(relative, not self.decoder, self.cfg.num_buckets, self.cfg.max_distance)
        bias = self.relative_bias(buckets).permute(2, 0, 1)[None]                        # (1, H, Tq, Tk)
        if self.decoder:
            bias = bias.masked_fill(relative[None, None] > 0, float("-inf"))             # no peeking ahead
        return bias

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) embedded tokens; masks (B, T) 1 = token, 0 = padding (None: no padding)."""
        T = x.shape[1]
        bias = self.position_bias(T, T, x.device) + key_bias(key_mask, T, x.device)        # (B or 1, H, T, T)
        memory_bias = key_bias(memory_mask, memory.shape[1], x.device) if memory is not None else None
        x = F.dropout(x, self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x, bias, memory, memory_bias)
        return F.dropout(self.final_norm(x), self.cfg.dropout, self.training)


def key_bias(mask: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """(B, T) 1/0 key mask -> (B, 1, 1, T) additive 0 / -inf; None -> (1, 1, 1, T) zeros."""
    if mask is None:
        return torch.zeros(1, 1, 1, T, device=device)
    return torch.zeros(mask.shape, device=device).masked_fill(~mask.bool(), float("-inf"))[:, None, None, :]


# ----------------------------------------------------------------------------- model


class Seq2SeqLM(nn.Module):
    """What T5 and BART share: ``forward`` from their ``encode`` and ``logits``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, decoder_input_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, V) logits and, given labels (B, T; IGNORE_INDEX where no target), the mean cross-entropy."""
        logits = self.logits(self.encode(input_ids, attention_mask), decoder_input_ids, attention_mask)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX)


class T5(Seq2SeqLM):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's init (initializer_factor 1): embeddings N(0, 1), each matrix N(0, fan_in**-0.5); q also
        takes head_dim**-0.5, the scaling attention leaves out."""
        cfg, d, hd = self.cfg, self.cfg.d_model, self.cfg.head_dim
        nn.init.normal_(self.shared.weight, 0.0, 1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, 1.0)
        for name, p in self.named_parameters():
            if name.endswith("relative_bias.weight"):
                nn.init.normal_(p, 0.0, d ** -0.5)
            elif name.endswith(".q.weight"):
                nn.init.normal_(p, 0.0, (d * hd) ** -0.5)
            elif name.endswith((".k.weight", ".v.weight", ".wi.weight", ".wi_0.weight", ".wi_1.weight")):
                nn.init.normal_(p, 0.0, d ** -0.5)
            elif name.endswith(".o.weight"):
                nn.init.normal_(p, 0.0, (cfg.n_heads * hd) ** -0.5)
            elif name.endswith(".wo.weight"):
                nn.init.normal_(p, 0.0, cfg.d_ff ** -0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids -> (B, S, d) encoder states."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def logits(self, memory: torch.Tensor, decoder_input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, d) and decoder inputs (B, T) -> (B, T, V) logits."""
        h = self.decoder(self.shared(decoder_input_ids), None, memory, attention_mask)      # (B, T, d)
        if self.lm_head is None:
            return F.linear(h * self.cfg.d_model ** -0.5, self.shared.weight)               # v1.0: tied, rescaled
        return self.lm_head(h)
