"""The model a spec describes, as a config, and its exact sizes: for every family, without torch.

``model_config`` turns a spec's ``model`` section into the family's config
(``DecoderConfig``, ``EncoderConfig``, ``ElectraConfig``, ``T5Config`` or
``BartConfig``: the ``models/*_config.py`` modules), whose constructors check
the model's invariants. None of this imports torch, so ``specs/job.py``
builds the config to validate a spec at submit. ``workers/tasks.py`` builds
the ``nn.Module`` from it; the names here are importable from there too, and
the t5/bart ones from ``workers/seq2seq.py``.

``model_counts`` gives the parameter counts and training FLOPs per token that
``model_config.json`` records, by formula.
"""
from __future__ import annotations

from data.noising import SENTINEL_ROWS, corrupted_lengths, span_counts
from models.bart_config import BartConfig, bart_config
from models.bart_config import param_counts as bart_counts
from models.electra_config import ElectraConfig, electra_config
from models.electra_config import flops_per_token as electra_flops
from models.electra_config import param_counts as electra_counts
from models.encoder_config import EncoderConfig, encoder_config
from models.encoder_config import param_counts as encoder_counts
from models.moe_config import SwitchConfig
from models.t5_config import T5Config, t5_config
from models.t5_config import param_counts as t5_counts
from models.transformer_config import DecoderConfig, decoder_config, flops_per_token, param_counts
from specs.errors import UserError
from specs.seq2seq import NoisingSpec

SEQ2SEQ_CONFIGS = {"t5": T5Config, "bart": BartConfig}


def model_config(spec, vocab_size: int):
    """The spec's model as its family's config: ``DecoderConfig`` (gpt2/llama/palm), ``EncoderConfig``
    (bert/roberta/albert), ``ElectraConfig``, ``T5Config`` or ``BartConfig``; UserError if it cannot be built."""
    m = spec.model
    moe = None if m.moe is None else SwitchConfig(**m.moe.model_dump())
    try:
        if m.family in SEQ2SEQ_CONFIGS:
            return seq2seq_config(spec, vocab_size)
        if m.family == "electra":
            return electra_config(m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len, d_model=m.d_model,
                                  n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff, dropout=m.dropout, moe=moe)
        if not m.is_decoder:
            return encoder_config(m.family, m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len,
                                  d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff,
                                  dropout=m.dropout, moe=moe)
        return decoder_config(
            m.family, m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len, d_model=m.d_model,
            n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_ff=m.d_ff,
            parallel_block=m.parallel_block, tie_embeddings=m.tie_embeddings, dropout=m.dropout, moe=moe)
    except ValueError as err:
        raise UserError(f"model: {err}") from None


def seq2seq_config(spec, vocab_size: int):
    """The spec's t5 or bart model; ``vocab_size`` is the tokenizer's padded vocab (T5 adds its sentinel rows)."""
    m = spec.model
    if m.moe is not None or m.n_kv_heads is not None or m.parallel_block is not None:
        raise ValueError(f"{m.family} has no Switch layers, n_kv_heads or parallel_block; leave them out")
    sizes = dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff, dropout=m.dropout)
    if m.family == "t5":
        noising = spec.data.noising or NoisingSpec()
        _, spans = span_counts(spec.data.seq_len, noising.noise_density, noising.mean_span_length)
        if spans + 1 > SENTINEL_ROWS:
            raise ValueError(f"t5 has {SENTINEL_ROWS - 1} sentinels for noise spans, and data.seq_len "
                             f"{spec.data.seq_len} makes {spans}; use a shorter data.seq_len or a longer "
                             "data.noising.mean_span_length")
        return t5_config(m.preset, vocab_size=vocab_size + SENTINEL_ROWS, tie_embeddings=m.tie_embeddings, **sizes)
    if m.tie_embeddings is False:
        raise ValueError("bart always ties its output head to the shared embedding; leave tie_embeddings out")
    return bart_config(m.preset, vocab_size=vocab_size, seq_len=spec.data.seq_len, **sizes)


def is_seq2seq_config(cfg) -> bool:
    return isinstance(cfg, (T5Config, BartConfig))


def is_encoder_config(cfg) -> bool:
    return not isinstance(cfg, DecoderConfig)


def model_kind(cfg) -> str:
    """What model_config.json calls the model: decoder, encoder or encoder-decoder."""
    return "encoder-decoder" if is_seq2seq_config(cfg) else "encoder" if is_encoder_config(cfg) else "decoder"


def config_from_dict(family: str, d: dict):
    """Inverse of ``cfg.to_dict()`` for the family's kind (model_config.json)."""
    from specs.job import DECODER_FAMILIES

    if family in DECODER_FAMILIES:
        return DecoderConfig.from_dict(d)
    if family in SEQ2SEQ_CONFIGS:
        return SEQ2SEQ_CONFIGS[family].from_dict(d)
    if family == "electra":
        return ElectraConfig.from_dict(d)
    return EncoderConfig.from_dict(d)


# ----------------------------------------------------------------------------- counting


def model_counts(cfg, seq_len: int, noising=None) -> dict:
    """Exact parameter counts and training FLOPs per token at ``seq_len`` (attention included), either kind."""
    if not is_encoder_config(cfg):
        return {**param_counts(cfg), "flops_per_token": flops_per_token(cfg, seq_len)["with_attention"]}
    if is_seq2seq_config(cfg):
        return seq2seq_counts(cfg, seq_len, noising)
    if isinstance(cfg, ElectraConfig):
        return {**electra_counts(cfg), "flops_per_token": electra_flops(cfg, seq_len)}
    counts = encoder_counts(cfg)
    # Compute per token: a shared (ALBERT) block counts once per application, a Switch layer one expert.
    d, ff = cfg.d_model, cfg.d_ff
    dense_block = 4 * (d * d + d) + (d * ff + ff + ff * d + d) + 4 * d
    active = counts["total"] + (cfg.n_layers - cfg.n_blocks) * dense_block
    if cfg.moe is not None:
        n_moe = sum(1 for layer in range(cfg.n_blocks) if cfg.moe.applies_to(layer))
        active -= n_moe * (cfg.moe.num_experts - 1) * (d * ff + ff + ff * d + d)
    flops = 6.0 * active + 12.0 * cfg.n_layers * d * seq_len
    return {**counts, "flops_per_token": flops}


def seq2seq_counts(cfg, seq_len: int, noising: NoisingSpec | None) -> dict:
    """Parameter counts and training FLOPs per window token: 6 x (weights a token meets) per encoder and
    decoder token, plus attention's 12 x layers x d x (keys attended), scaled by each stack's length."""
    noising = noising or NoisingSpec()
    if isinstance(cfg, T5Config):
        counts, inner = t5_counts(cfg), cfg.n_heads * cfg.head_dim
        enc_len, dec_len = corrupted_lengths(seq_len, noising.noise_density, noising.mean_span_length)
        ff = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
    else:
        counts, inner = bart_counts(cfg), cfg.d_model
        enc_len, dec_len = seq_len, seq_len
        ff = 2 * cfg.d_model * cfg.d_ff
    d, L = cfg.d_model, cfg.n_layers
    enc = L * (4 * d * inner + ff)
    dec = L * (8 * d * inner + ff) + cfg.vocab_size * d
    attn = 12 * L * inner * (enc_len * enc_len + dec_len * dec_len / 2 + dec_len * enc_len)
    flops = (6 * (enc * enc_len + dec * dec_len) + attn) / seq_len
    return {**counts, "flops_per_token": float(flops)}
