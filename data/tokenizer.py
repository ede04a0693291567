"""Tokenizers: byte-level (default) and BPE trained locally, both HF ``tokenizers``.

Both kinds are a ``tokenizers.Tokenizer`` underneath and are saved as one
``tokenizer.json``, so a run directory's tokenizer loads in
``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer`` unchanged.

The byte tokenizer is a byte-level BPE with no merges: 256 byte symbols plus
the special tokens, so token ids never depend on the corpus.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "[MASK]", "[CLS]", "[SEP]"]
VOCAB_MULTIPLE = 64  # model vocab rows are padded to this multiple


@dataclass
class TextTokenizer:
    """A thin wrapper with the ids our models need."""

    tok: Tokenizer
    kind: str

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id("<|endoftext|>")

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id("<|pad|>")

    @property
    def mask_id(self) -> int:
        return self.tok.token_to_id("[MASK]")

    @property
    def cls_id(self) -> int:
        return self.tok.token_to_id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self.tok.token_to_id("[SEP]")

    @property
    def vocab_size(self) -> int:
        """Ids in use (tokens + specials)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of 64."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        """Stable identity for cache keys: the serialized tokenizer itself."""
        import hashlib

        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str, fs=None) -> None:
        """Write tokenizer.json (and a tokenizer_config.json for transformers) into folder ``path``."""
        import fsspec

        fs = fs or fsspec.core.url_to_fs(path)[0]
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path}/tokenizer.json", "w") as f:
            f.write(self.to_json())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
            "mask_token": "[MASK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "model_max_length": 1_000_000,
            "switchyard_kind": self.kind,
        }
        with fs.open(f"{path}/tokenizer_config.json", "w") as f:
            json.dump(config, f, indent=2)


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> TextTokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return TextTokenizer(tok, "byte")


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained on ``texts`` (deterministic for the same input)."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, "bpe")


def load_tokenizer(path: str) -> TextTokenizer:
    """Load from a folder holding tokenizer.json (any fsspec URI)."""
    import fsspec

    with fsspec.open(f"{path}/tokenizer.json", "r") as f:
        tok = Tokenizer.from_str(f.read())
    kind = "byte" if tok.get_vocab_size() <= 256 + len(SPECIAL_TOKENS) else "bpe"
    return TextTokenizer(tok, kind)
