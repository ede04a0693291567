"""Sequence classification on a pre-trained trunk: BERT's second step, fine-tuning on labelled text.

``SequenceClassifier`` wraps an ``Encoder`` or a ``Decoder`` in the shape
Hugging Face's ``...ForSequenceClassification`` classes have, so an export
gives equal logits:

* encoders (BERT, RoBERTa, ALBERT): the pooler, tanh(W h_[CLS] + b), then
  dropout and a linear classifier with bias. A trunk pre-trained with an
  NSP/SOP head starts from that head's pooler, as BERT does.
* ELECTRA: the discriminator's hidden states (the generator is left out),
  and ELECTRA's head: dropout, dense, GELU, dropout, a linear classifier
  with bias, on h_[CLS] (HF's ``ElectraClassificationHead``).
* decoders (GPT-2, LLaMA): a linear score without bias on the final hidden
  state of each row's last real token (rows are right-padded; the decoder
  has no attention mask, and causal attention never reads the pads).

The trunk's language-model heads are kept (a checkpoint still holds them)
but frozen: the classification loss never reaches them.

No torch.distributed, Ray or DeepSpeed here: ``workers/`` wraps the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.electra import Electra
from models.encoder import Encoder


class SequenceClassifier(nn.Module):
    """A trunk and a classification head: (B, T) token ids -> (B, n_labels) logits."""

    def __init__(self, trunk: nn.Module, n_labels: int):
        super().__init__()
        self.trunk = trunk
        self.is_electra = isinstance(trunk, Electra)
        self.is_encoder = self.is_electra or isinstance(trunk, Encoder)
        d, std = trunk.cfg.d_model, trunk.cfg.init_std
        self.pooler = nn.Linear(d, d) if self.is_encoder else None
        self.classifier = nn.Linear(d, n_labels, bias=self.is_encoder)
        nn.init.normal_(self.classifier.weight, 0.0, std)
        if self.is_encoder:
            nn.init.zeros_(self.classifier.bias)
            if not self.is_electra and trunk.nsp_head is not None:          # BERT's pre-trained pooler
                self.pooler.load_state_dict(trunk.nsp_head.pooler.state_dict())
            else:
                nn.init.normal_(self.pooler.weight, 0.0, std)
                nn.init.zeros_(self.pooler.bias)
            heads = trunk.pretraining_heads() if self.is_electra else [trunk.mlm_head, trunk.nsp_head]
            for head in heads:
                if head is not None:
                    head.requires_grad_(False)
        elif not trunk.cfg.tie_embeddings:
            trunk.lm_head.requires_grad_(False)               # tied: it is the token embedding, still trained

    @property
    def n_labels(self) -> int:
        return self.classifier.out_features

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, n_labels) and, given labels (B,), the mean cross-entropy.

        input_ids (B, T) right-padded; attention_mask (B, T) with 1 on real
        tokens (None: no padding); token_type_ids (B, T) for encoder pairs.
        """
        if self.is_electra:
            h = self.trunk.hidden(input_ids, token_type_ids, attention_mask)               # (B, T, d)
            p = self.trunk.cfg.dropout if self.training else 0.0
            pooled = F.gelu(self.pooler(F.dropout(h[:, 0], p)))                            # (B, d) from [CLS]
            logits = self.classifier(F.dropout(pooled, p))
        elif self.is_encoder:
            h = self.trunk.hidden(input_ids, token_type_ids, attention_mask)               # (B, T, d)
            pooled = torch.tanh(self.pooler(h[:, 0]))                                      # (B, d) from [CLS]
            logits = self.classifier(F.dropout(pooled, self.trunk.cfg.dropout, self.training))
        else:
            h = self.trunk.hidden(input_ids)                                               # (B, T, d)
            T = input_ids.shape[1]
            last = (attention_mask.sum(1) - 1 if attention_mask is not None
                    else torch.full((len(input_ids),), T - 1, device=input_ids.device))    # (B,)
            logits = self.classifier(h[torch.arange(len(h), device=h.device), last.long()])
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), labels)
