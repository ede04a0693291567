"""A BART-style encoder-decoder (Lewis et al. 2019), single-device PyTorch.

* Learned absolute positions, one table per stack, read with BART's offset
  of 2 (position p is row p + 2: fairseq kept two rows for padding), so a
  table holds ``seq_len + 2`` rows.
* Post-norm blocks as in the original Transformer, with a LayerNorm on the
  embeddings (``norm_embedding``), exact GELU MLPs and biases everywhere.
* The output head is the shared embedding (tied) plus ``final_logits_bias``,
  a (V,) buffer that is not trained (zero unless imported).

``BartConfig``, the presets and ``param_counts`` are in ``models/bart_config.py``,
which needs no torch; every name of it is importable from here too.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bart_config import (  # noqa: F401  (re-exported: the config and counts live without torch)
    POSITION_OFFSET, PRESETS, BartConfig, bart_config, param_counts)
from models.encoder import init_bert_style
from models.t5 import Seq2SeqLM, key_bias


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, Tq, d) attends to kv (B, Tk, d); bias (B or 1, 1, Tq or 1, Tk) additive 0 / -inf."""
        B, Tq, _ = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        q = self.q(x).view(B, Tq, H, hd).transpose(1, 2)                                  # (B, H, Tq, hd)
        k = self.k(kv).view(B, -1, H, hd).transpose(1, 2)                                 # (B, H, Tk, hd)
        v = self.v(kv).view(B, -1, H, hd).transpose(1, 2)                                 # (B, H, Tk, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.cfg.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, Tq, -1))                               # (B, Tq, d)


class Block(nn.Module):
    """Post-norm: x = LN(x + attn(x)) [; x = LN(x + cross(x, memory))]; x = LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, cfg: BartConfig, cross: bool):
        super().__init__()
        self.self_attn, self.self_norm = Attention(cfg), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross_attn = Attention(cfg) if cross else None
        self.cross_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cross else None
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor | None = None,
                memory_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.self_norm(x + self._drop(self.self_attn(x, x, bias)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self._drop(self.cross_attn(x, memory, memory_bias)))
        return self.ff_norm(x + self._drop(self.fc2(self._drop(F.gelu(self.fc1(x))))))

    def _drop(self, t: torch.Tensor) -> torch.Tensor:
        return F.dropout(t, self.dropout, self.training)


class Stack(nn.Module):
    """The encoder or (causal, with cross-attention) the decoder, over the shared token embedding."""

    def __init__(self, cfg: BartConfig, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.positions = nn.Embedding(cfg.seq_len + POSITION_OFFSET, cfg.d_model)
        self.norm_embedding = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layers = nn.ModuleList([Block(cfg, cross=decoder) for _ in range(cfg.n_layers)])

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T, d) embedded ids; masks (B, T) 1 = token, 0 = padding (None: no padding)."""
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len {self.cfg.seq_len}")
        pos = self.positions(torch.arange(T, device=tokens.device) + POSITION_OFFSET)     # (T, d)
        x = F.dropout(self.norm_embedding(tokens + pos), self.cfg.dropout, self.training)
        bias = key_bias(key_mask, T, x.device)                                            # (B or 1, 1, 1, T)
        if self.decoder:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            bias = bias.masked_fill(causal, float("-inf"))                                # (., 1, T, T)
        memory_bias = key_bias(memory_mask, memory.shape[1], x.device) if memory is not None else None
        for layer in self.layers:
            x = layer(x, bias, memory, memory_bias)
        return x


# ----------------------------------------------------------------------------- model


class Bart(Seq2SeqLM):
    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BART's init: N(0, init_std) for matrices and embeddings, zero biases, unit LayerNorm gains."""
        init_bert_style(self, self.cfg.init_std)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids -> (B, S, d) encoder states."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def logits(self, memory: torch.Tensor, decoder_input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states (B, S, d) and decoder inputs (B, T) -> (B, T, V) logits."""
        h = self.decoder(self.shared(decoder_input_ids), None, memory, attention_mask)      # (B, T, d)
        return F.linear(h, self.shared.weight) + self.final_logits_bias
