"""Masked-LM masking and sentence-pair construction for BERT-family encoders.

Masking (Devlin et al. 2018): of the tokens that are not special ([CLS],
[SEP], padding, ...), 15% are chosen for prediction (rounded per sequence, at
least one); of those, 80% become [MASK], 10% a random ordinary token and 10%
stay as they are. Labels hold the original id at chosen positions and -100
everywhere else.

Static vs dynamic masking is a question of the seed. Every sample is masked
with its own generator, seeded from ``(seed, epoch, sample index)``:

* BERT (static): the epoch is left out, so a sample gets the same mask every
  time it is seen (the original preprocessing masked once, offline).
* RoBERTa (dynamic): the epoch is in, so each pass over the data draws a new
  mask.

Because the mask depends only on the sample's index, never on batch
composition, worker count or position in an epoch, a job resumed from a
checkpoint sees exactly the masks an uninterrupted one would have.

Sentence pairs: ``[CLS] A [SEP] B [SEP]`` with segment ids 0 for
``[CLS] A [SEP]`` and 1 for ``B [SEP]``. For NSP, B is the segment that
follows A in its document half of the time (label 0) and a segment from
another document otherwise (label 1). ALBERT's sentence-order prediction (SOP)
uses two consecutive segments, swapped half of the time (label 1 = swapped).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100

# Which families re-mask every epoch.
DYNAMIC_MASKING: dict[str, bool] = {"bert": False, "roberta": True, "albert": False}


@dataclass(frozen=True)
class MaskingConfig:
    mask_prob: float = 0.15
    """Fraction of non-special tokens chosen for prediction."""
    replace_mask: float = 0.8
    """Of the chosen tokens, the fraction replaced by [MASK]."""
    replace_random: float = 0.1
    """Of the chosen tokens, the fraction replaced by a random ordinary token (the rest stay)."""
    dynamic: bool = False
    """New mask every epoch (RoBERTa) instead of one fixed mask per sample (BERT)."""
    seed: int = 0
    """Base seed; a sample's mask is a function of (seed, [epoch,] sample index) only."""

    def __post_init__(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.replace_mask < 0 or self.replace_random < 0 or self.replace_mask + self.replace_random > 1:
            raise ValueError(f"replace_mask ({self.replace_mask}) and replace_random ({self.replace_random}) "
                             f"must be >= 0 and sum to at most 1")


def masking_config(family: str, seed: int = 0) -> MaskingConfig:
    """The family's masking: static for BERT and ALBERT, dynamic for RoBERTa."""
    if family not in DYNAMIC_MASKING:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {sorted(DYNAMIC_MASKING)}")
    return MaskingConfig(dynamic=DYNAMIC_MASKING[family], seed=seed)


def sample_seed(seed: int, epoch: int | None, index: int) -> int:
    """A stable 63-bit seed from (seed, epoch, index); epoch None = the same in every epoch."""
    key = f"{seed}:{'static' if epoch is None else epoch}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class Masker:
    """MLM masking for one tokenizer: knows the special ids and the ids a random replacement may use."""

    def __init__(self, cfg: MaskingConfig, mask_id: int, special_ids: Sequence[int], vocab_size: int):
        """``vocab_size``: ids in use (not the padded embedding size); specials are never chosen or drawn."""
        self.cfg = cfg
        self.mask_id = mask_id
        self.special_ids = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=torch.long)
        ordinary = torch.ones(vocab_size, dtype=torch.bool)
        ordinary[self.special_ids[self.special_ids < vocab_size]] = False
        self.ordinary_ids = ordinary.nonzero().squeeze(1)                               # (V_ordinary,)

    @classmethod
    def for_tokenizer(cls, cfg: MaskingConfig, tokenizer) -> "Masker":
        """From a ``data.tokenizer.TextTokenizer``: all its added (special) tokens are special."""
        specials = list(tokenizer.tok.get_added_tokens_decoder())                       # ids
        return cls(cfg, tokenizer.mask_id, specials, tokenizer.vocab_size)

    def generator(self, index: int, epoch: int) -> torch.Generator:
        """The sample's own generator: epoch counts only under dynamic masking."""
        seed = sample_seed(self.cfg.seed, epoch if self.cfg.dynamic else None, index)
        return torch.Generator().manual_seed(seed)

    def mask(self, ids: torch.Tensor, index: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample (T,) -> (input_ids (T,), labels (T,)), deterministic in (seed, [epoch,] index)."""
        g = self.generator(index, epoch)
        eligible = ~torch.isin(ids, self.special_ids)                                   # (T,)
        n_eligible = int(eligible.sum())
        input_ids, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
        if n_eligible == 0:
            return input_ids, labels
        n_chosen = max(1, round(self.cfg.mask_prob * n_eligible))
        # Random scores, specials pushed last; the n_chosen lowest are chosen.
        scores = torch.rand(ids.shape, generator=g).masked_fill(~eligible, 2.0)        # (T,)
        chosen = torch.zeros_like(eligible)
        chosen[scores.argsort()[:n_chosen]] = True
        labels[chosen] = ids[chosen]
        # One uniform draw per chosen token decides: [MASK] / random token / unchanged.
        u = torch.rand(ids.shape, generator=g)                                           # (T,)
        to_mask = chosen & (u < self.cfg.replace_mask)
        to_random = chosen & (u >= self.cfg.replace_mask) & (u < self.cfg.replace_mask + self.cfg.replace_random)
        input_ids[to_mask] = self.mask_id
        picks = torch.randint(len(self.ordinary_ids), ids.shape, generator=g)           # (T,)
        input_ids[to_random] = self.ordinary_ids[picks[to_random]]
        return input_ids, labels

    def mask_batch(self, ids: torch.Tensor, indices: Sequence[int], epoch: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids of samples ``indices`` -> (input_ids, labels), each (B, T); row b masked as sample indices[b]."""
        pairs = [self.mask(row, int(i), epoch) for row, i in zip(ids, indices)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------- sentence pairs


@dataclass(frozen=True)
class PairExample:
    input_ids: list[int]
    """[CLS] A [SEP] B [SEP]."""
    token_type_ids: list[int]
    """0 over [CLS] A [SEP], 1 over B [SEP]."""
    label: int
    """NSP: 0 = B follows A, 1 = B is random. SOP: 0 = in order, 1 = swapped."""


def join_pair(a: Sequence[int], b: Sequence[int], cls_id: int, sep_id: int, max_len: int) -> tuple[list, list]:
    """[CLS] A [SEP] B [SEP] and its segment ids, trimming the longer of A and B from the end to fit max_len."""
    a, b = list(a), list(b)
    while len(a) + len(b) + 3 > max_len:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    ids = [cls_id] + a + [sep_id] + b + [sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return ids, types


class SentencePairs:
    """NSP and SOP examples from documents split into segments (lists of token ids).

    Example ``i`` takes segment ``i`` of the flattened (document, segment)
    list as A. Its random choices come from a generator seeded by
    (seed, epoch, i): pass the same epoch for fixed pairs, a new one to redraw.
    """

    def __init__(self, documents: Sequence[Sequence[Sequence[int]]], cls_id: int, sep_id: int,
                 max_len: int, seed: int = 0):
        self.nonempty = [d for d, doc in enumerate(documents) if len(doc) > 0]
        self.nonempty_rank = {d: r for r, d in enumerate(self.nonempty)}
        if len(self.nonempty) < 2:
            raise ValueError("sentence pairs need at least two non-empty documents (random B comes from another)")
        self.documents = documents
        self.cls_id, self.sep_id, self.max_len, self.seed = cls_id, sep_id, max_len, seed
        self.positions = [(d, s) for d, doc in enumerate(documents) for s in range(len(doc))]   # A candidates

    def __len__(self) -> int:
        return len(self.positions)

    def _rng(self, index: int, epoch: int) -> random.Random:
        return random.Random(sample_seed(self.seed, epoch, index))

    def nsp(self, index: int, epoch: int = 0) -> PairExample:
        """A = segment ``index``; B = its successor (label 0) or, half the time or at a document's end, random (1)."""
        rng = self._rng(index, epoch)
        d, s = self.positions[index]
        doc = self.documents[d]
        has_next = s + 1 < len(doc)
        if has_next and rng.random() < 0.5:
            b, label = doc[s + 1], 0
        else:
            k = rng.randrange(len(self.nonempty) - 1)
            other = self.nonempty[k + (k >= self.nonempty_rank[d])]                     # any document but d
            b, label = rng.choice(list(self.documents[other])), 1
        ids, types = join_pair(doc[s], b, self.cls_id, self.sep_id, self.max_len)
        return PairExample(ids, types, label)

    def sop(self, index: int, epoch: int = 0) -> PairExample:
        """ALBERT's sentence order: segments s and s+1 of one document, swapped half the time (label 1)."""
        rng = self._rng(index, epoch)
        d, s = self.positions[index]
        doc = self.documents[d]
        if len(doc) < 2:
            raise ValueError(f"sentence order needs documents of 2+ segments; document {d} has {len(doc)}")
        s = min(s, len(doc) - 2)
        a, b = doc[s], doc[s + 1]
        label = int(rng.random() < 0.5)
        if label:
            a, b = b, a
        ids, types = join_pair(a, b, self.cls_id, self.sep_id, self.max_len)
        return PairExample(ids, types, label)


def pad_pairs(examples: Sequence[PairExample], pad_id: int, length: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Stack examples into (B, T) ``input_ids``, ``token_type_ids``, ``attention_mask`` and (B,) ``labels``."""
    T = length or max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        if n > T:
            raise ValueError(f"example {b} has {n} tokens, more than the padded length {T}")
        input_ids[b, :n] = torch.tensor(e.input_ids)
        token_type_ids[b, :n] = torch.tensor(e.token_type_ids)
        attention_mask[b, :n] = 1
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels}
