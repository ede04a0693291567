"""BERT-family bidirectional encoders with masked-LM and next-sentence heads, single-device PyTorch.

One module covers three families as config switches:

* BERT (Devlin et al. 2018): learned positions, two segment types, post-LN
  blocks with GELU MLPs and biases, MLM head tied to the word embeddings, and
  a next-sentence-prediction (NSP) head on [CLS].
* RoBERTa (Liu et al. 2019): BERT without segment embeddings and without
  NSP; its dynamic masking is a data-side switch (``data/masking.py``).
* ALBERT (Lan et al. 2019): a factorized embedding (vocab -> E -> d_model with
  E < d_model), one set of block weights shared by all layers, and the
  [CLS] head trained on sentence order (SOP) rather than NSP; same head shape.

A Switch MoE layer (``models.moe``) can replace the MLP in chosen blocks
through ``EncoderConfig.moe``; its auxiliary losses join the returned loss.

``EncoderConfig``, the presets and ``param_counts`` are in
``models/encoder_config.py``, which needs no torch; every name of it is
importable from here too.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder_config import (  # noqa: F401  (re-exported: the config and counts live without torch)
    ALBERT_EMBEDDING_DIM, FAMILIES, PRESETS, EncoderConfig, encoder_config, param_counts)
from models.moe import SwitchMLP

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- blocks


class Embeddings(nn.Module):
    """word + position (+ segment) embeddings, LayerNorm, dropout; projected E -> d_model if factorized."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        E = cfg.emb_dim
        self.word = nn.Embedding(cfg.vocab_size, E)
        self.position = nn.Embedding(cfg.seq_len, E)
        self.token_type = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(E, eps=cfg.norm_eps)
        self.project = nn.Linear(E, cfg.d_model) if E != cfg.d_model else None
        self.dropout = cfg.dropout

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position(torch.arange(T, device=input_ids.device))   # (B, T, E)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        elif token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("token_type_ids given but the config has type_vocab_size=0 (RoBERTa style)")
        x = F.dropout(self.norm(x), self.dropout, self.training)
        return self.project(x) if self.project is not None else x                         # (B, T, d)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)                             # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, H, hd).transpose(1, 2)                             # (B, H, T, hd)
        v = self.v_proj(x).view(B, T, H, hd).transpose(1, 2)                             # (B, H, T, hd)
        # key_mask: (B, 1, 1, T) True where the key is a real token; padding is never attended to.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           dropout_p=self.cfg.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))                          # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))                                              # exact (erf) GELU, as BERT


def make_mlp(cfg: EncoderConfig, layer: int) -> nn.Module:
    if cfg.moe is not None and cfg.moe.applies_to(layer):
        # Experts are GELU MLPs with biases; SwitchMLP's use the tanh GELU approximation.
        return SwitchMLP(cfg.d_model, cfg.d_ff, "gelu", True, cfg.moe)
    return MLP(cfg)


class Block(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + mlp(x)), as in the original Transformer and BERT."""

    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = make_mlp(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + F.dropout(self.attn(x, key_mask), self.dropout, self.training))
        # Tokens a Switch layer drops get mlp(x) = 0: LN(x + 0) keeps them on the residual path.
        return self.norm2(x + F.dropout(self.mlp(x), self.dropout, self.training))


class MLMHead(nn.Module):
    """dense d_model -> E, GELU, LayerNorm, then logits through the word embedding (tied) plus a bias."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.emb_dim)
        self.norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))                                              # (B, T, E)
        return F.linear(h, word_weight, self.bias)                                        # (B, T, V); weight (V, E)


class NSPHead(nn.Module):
    """BERT's pooler (dense + tanh on [CLS]) and a 2-way classifier: 0 = B follows A, 1 = B is random."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(h[:, 0]))                                         # (B, d) from [CLS]
        return self.classifier(pooled)                                                    # (B, 2)


# ----------------------------------------------------------------------------- model


def init_bert_style(root: nn.Module, std: float) -> None:
    """BERT's init, shared by BERT, ELECTRA and BART: N(0, std) for matrices and embeddings, zero biases,
    unit LayerNorm gains."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_blocks)])
        self.mlm_head = MLMHead(cfg)                 # tied: reads embeddings.word.weight, owns only its bias
        self.nsp_head = NSPHead(cfg) if cfg.nsp else None
        self._aux_losses: list[torch.Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init: N(0, init_std) for matrices and embeddings, zero biases, unit LayerNorm gains."""
        init_bert_style(self, self.cfg.init_std)
        nn.init.zeros_(self.mlm_head.bias)

    def block_for(self, layer: int) -> Block:
        return self.blocks[0 if self.cfg.share_layers else layer]

    def hidden(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, d). attention_mask (B, T): 1 = token, 0 = padding."""
        if input_ids.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds seq_len {self.cfg.seq_len}")
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]                           # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)                                    # (B, T, d)
        self._aux_losses = []
        for layer in range(self.cfg.n_layers):
            block = self.block_for(layer)
            x = block(x, key_mask)
            aux = getattr(block.mlp, "aux_loss", None)
            if aux is not None:                      # collected per use: a shared block runs n_layers times
                self._aux_losses.append(aux)
        return x

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MLM logits (B, T, V) and, given labels, the loss.

        loss = MLM cross-entropy over positions whose mlm_labels (B, T) are not
        IGNORE_INDEX, + NSP cross-entropy when nsp_labels (B,) are given, +
        the Switch layers' auxiliary losses. For the NSP logits themselves use
        ``nsp_logits(hidden(...))``.
        """
        h = self.hidden(input_ids, token_type_ids, attention_mask)                       # (B, T, d)
        logits = self.mlm_logits(h)                                                       # (B, T, V)
        if mlm_labels is None and nsp_labels is None:
            return logits, None
        loss = self.aux_loss()
        if mlm_labels is not None:
            loss = loss + F.cross_entropy(logits.float().view(-1, logits.shape[-1]), mlm_labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
        if nsp_labels is not None:
            loss = loss + F.cross_entropy(self.nsp_logits(h).float(), nsp_labels)
        return logits, loss

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) hidden states -> (B, T, V) masked-LM logits."""
        return self.mlm_head(h, self.embeddings.word.weight)

    def nsp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d) hidden states -> (B, 2) NSP/SOP logits from [CLS]."""
        if self.nsp_head is None:
            raise ValueError("this encoder has no NSP head (config nsp=False, e.g. RoBERTa)")
        return self.nsp_head(h)

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the Switch layers' aux losses from the last forward, one term per layer applied."""
        return sum(self._aux_losses, 0.0)
