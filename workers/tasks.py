"""What a model kind trains on: building the model from its config, and the task that turns
global sample positions into a batch and a loss.

The config a spec describes (``model_config``) and its counts (``model_counts``)
are in ``workers/model_config.py``, which needs no torch, and importable from here.

``CausalLM`` (decoders: next-token prediction) and ``MaskedLM`` (encoders:
masked LM, plus NSP for BERT or sentence order for ALBERT) are two plain
classes with the same three methods; the training loop does not know which one
it runs. ELECTRA's ``ReplacedTokenDetection`` (``workers/electra.py``) is a third.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from data.sampler import DataPlan
from models.electra import Electra, ElectraConfig
from models.transformer import Decoder
from specs.errors import UserError
from workers.model_config import (  # noqa: F401  (re-exported: the spec's model config, built without torch)
    config_from_dict, is_encoder_config, is_seq2seq_config, model_config, model_counts, model_kind)
from workers.seq2seq import Seq2SeqLM, build_seq2seq


# ----------------------------------------------------------------------------- model


def build_model(cfg) -> torch.nn.Module:
    if is_seq2seq_config(cfg):
        return build_seq2seq(cfg)
    if isinstance(cfg, ElectraConfig):
        return Electra(cfg)
    if is_encoder_config(cfg):
        from models.encoder import Encoder

        return Encoder(cfg)
    return Decoder(cfg)


# ----------------------------------------------------------------------------- tasks


def _to_device(batch: dict, device) -> dict:
    """A batch's arrays as tensors on ``device``; to a GPU through pinned memory without blocking the host."""
    cuda = torch.device(device).type == "cuda"
    out = {}
    for k, v in batch.items():
        t = None if v is None else torch.as_tensor(v)
        out[k] = t if t is None else t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
    return out


class CausalLM:
    """Decoders: predict each next token of a window of the token stream."""

    def __init__(self, plan: DataPlan):
        self.plan = plan

    def batch(self, positions) -> dict:
        x, y = self.plan.batch(positions)                                              # (B, T) each
        return {"idx": x, "targets": y}

    def held_out(self, index: int, size: int) -> dict | None:
        b = self.plan.held_out_batch(index, size)
        return None if b is None else {"idx": b[0], "targets": b[1]}

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        _, loss = engine(batch["idx"], batch["targets"])
        return loss, {}


class MaskedLM:
    """Encoders: masked-LM on windows of the token stream, framed as the family expects.

    * RoBERTa: ``[CLS] window [SEP]``, dynamic masking (a new mask every epoch), no NSP.
    * BERT: ``[CLS] A [SEP] B [SEP]`` with segment ids; A is the first part of
      the window and B, half of the time, the part that follows it in the
      stream (NSP label 0), else the same span of another random window (1).
      Static masking: a sample keeps its mask (and its pair) in every epoch.
    * ALBERT: the same pair framing for sentence order: A and B swapped half of the time (label 1).

    Masks and pairs are functions of (seed, [epoch,] window index) only
    (``data/masking.py``), so a resumed job sees exactly the same inputs.
    """

    def __init__(self, plan: DataPlan, tokenizer, family: str, seq_len: int, seed: int, sentence_head: bool):
        from data.masking import Masker, masking_config

        self.plan, self.family, self.T, self.seed = plan, family, seq_len, seed
        self.cfg = masking_config(family, seed)
        self.masker = Masker.for_tokenizer(self.cfg, tokenizer)
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        # Pairs with segment ids: BERT (NSP) and ALBERT (SOP), when the model has the [CLS] head.
        self.pairs = family in ("bert", "albert") and sentence_head
        self.len_a = (seq_len - 3) // 2                                                 # A, then B of the rest
        self.len_b = seq_len - 3 - self.len_a

    def _window(self, window: int) -> np.ndarray:
        start = window * self.plan.seq_len
        return self.plan.tokens[start:start + self.plan.seq_len]

    def _frame(self, tokens: np.ndarray, key: int, epoch: int, train: bool) -> tuple[list, list, int]:
        """One sample's ids, segment ids and sentence label (-1 when there is no pair task)."""
        from data.masking import join_pair, sample_seed

        if not self.pairs:
            return [self.cls_id] + tokens[:self.T - 2].tolist() + [self.sep_id], [0] * self.T, -1
        a = tokens[:self.len_a].tolist()
        b = tokens[self.len_a:self.len_a + self.len_b].tolist()
        label = 0
        if train:
            rng = random.Random(sample_seed(self.seed + 7919, epoch if self.cfg.dynamic else None, key))
            if self.family == "albert":
                if rng.random() < 0.5:
                    a, b, label = b, a, 1
            elif self.plan.n_windows > 1 and rng.random() >= 0.5:
                other = rng.randrange(self.plan.n_windows - 1)
                other += other >= key                                                    # any window but this one
                b, label = self._window(other)[self.len_a:self.len_a + self.len_b].tolist(), 1
        ids, types = join_pair(a, b, self.cls_id, self.sep_id, self.T)
        return ids, types, label

    def _batch(self, rows: list[tuple[np.ndarray, int, int]], train: bool) -> dict:
        types, labels, masked, mlm_labels = [], [], [], []
        for tokens, key, epoch in rows:
            ids, t, label = self._frame(tokens, key, epoch, train)
            x, y = self.masker.mask(torch.tensor(ids), key, epoch)                      # (T,) each
            types.append(t), labels.append(label), masked.append(x), mlm_labels.append(y)
        out = {"input_ids": torch.stack(masked), "mlm_labels": torch.stack(mlm_labels)}     # (B, T) each
        if self.pairs:
            out["token_type_ids"] = torch.tensor(types)                                  # (B, T)
            if train:
                out["nsp_labels"] = torch.tensor(labels)                                 # (B,)
        return out

    def batch(self, positions) -> dict:
        n = self.plan.n_windows
        rows = [(self._window(self.plan.window_of(p)), self.plan.window_of(p), p // n) for p in positions]
        return self._batch(rows, train=True)

    def held_out(self, index: int, size: int) -> dict | None:
        """Held-out windows, masked with a fixed seed; MLM loss only (B follows A for pair models)."""
        rows = self.plan.held_out_keyed(index, size)
        return None if rows is None else self._batch(rows, train=False)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        from data.masking import IGNORE_INDEX

        logits, loss = engine(batch["input_ids"], batch.get("token_type_ids"), None, batch["mlm_labels"],
                              batch.get("nsp_labels"))
        with torch.no_grad():
            mlm = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), batch["mlm_labels"].reshape(-1),
                                  ignore_index=IGNORE_INDEX)
        return loss, {"mlm_loss": float(mlm)}


def make_task(spec, cfg, plan: DataPlan, tokenizer):
    if not is_encoder_config(cfg):
        return CausalLM(plan)
    if is_seq2seq_config(cfg):
        return Seq2SeqLM(plan, tokenizer, cfg, spec.data.seq_len, spec.train.seed, spec.data.noising)
    if cfg.seq_len < spec.data.seq_len:
        raise UserError(f"data.seq_len: {spec.data.seq_len} is longer than the model's position table ({cfg.seq_len})")
    if isinstance(cfg, ElectraConfig):
        from workers.electra import ReplacedTokenDetection

        return ReplacedTokenDetection(plan, tokenizer, spec.data.seq_len, spec.train.seed)
    return MaskedLM(plan, tokenizer, spec.model.family, spec.data.seq_len, spec.train.seed, cfg.nsp)
