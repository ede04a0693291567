"""GPT-3's ladder of model sizes (Brown et al. 2020, Table 2.1) as decoder presets.

Each row is the paper's: parameter count as printed, n_layers, d_model,
n_heads, d_head, and the batch size (tokens) and learning rate it trained
with, which Switchyard offers as suggested defaults (README "GPT-3 ladder").
The presets use the GPT-2 architecture the paper builds on (learned
positions, LayerNorm, GELU, tied embeddings) at context 2048; use them with
``model.family: gpt2``.

Two rows of the paper do not multiply out, so the presets keep its head size
and say so here:

* gpt3-xl: 24 heads of 128 would be 3072 wide, not d_model 2048; the preset
  has 16 heads of 128.
* gpt3-13b: d_model 5140 is not 40 heads of 128; the preset has 5120.

Counted with ``models.transformer_config.param_counts`` (vocabulary 50257, context
2048, tied output projection: token and position tables, every block and the
final LayerNorm), the presets land within 1% of the printed figures except
medium (+1.7%), xl (+1.2%), 2.7b (-1.8%) and 13b (-1.1%): the paper prints
two significant figures (the 24 x 1024 model is 356M, printed 350M).
"""
from __future__ import annotations

from dataclasses import dataclass

GPT3_VOCAB = 50257
"""GPT-2/GPT-3 BPE vocabulary the paper's counts use."""
GPT3_CONTEXT = 2048
"""The paper's context length n_ctx."""


@dataclass(frozen=True)
class GPT3Row:
    """One row of Table 2.1."""

    params: float
    """Trainable parameters as printed in the paper."""
    n_layers: int
    d_model: int
    n_heads: int
    """Heads in the preset (the paper's, except gpt3-xl: see the module docstring)."""
    d_head: int
    batch_tokens: int
    """Batch size the paper trained with, in tokens (suggested train.micro_batch x grad_accum x workers x seq_len)."""
    lr: float
    """Peak learning rate the paper trained with (suggested train.lr)."""
    paper_d_model: int | None = None
    """The paper's d_model where the preset differs from it."""
    paper_n_heads: int | None = None
    """The paper's n_heads where the preset differs from it."""


GPT3_LADDER: dict[str, GPT3Row] = {
    "gpt3-small": GPT3Row(125e6, 12, 768, 12, 64, 500_000, 6.0e-4),
    "gpt3-medium": GPT3Row(350e6, 24, 1024, 16, 64, 500_000, 3.0e-4),
    "gpt3-large": GPT3Row(760e6, 24, 1536, 16, 96, 500_000, 2.5e-4),
    "gpt3-xl": GPT3Row(1.3e9, 24, 2048, 16, 128, 1_000_000, 2.0e-4, paper_n_heads=24),
    "gpt3-2.7b": GPT3Row(2.7e9, 32, 2560, 32, 80, 1_000_000, 1.6e-4),
    "gpt3-6.7b": GPT3Row(6.7e9, 32, 4096, 32, 128, 2_000_000, 1.2e-4),
    "gpt3-13b": GPT3Row(13.0e9, 40, 5120, 40, 128, 2_000_000, 1.0e-4, paper_d_model=5140),
    "gpt3-175b": GPT3Row(175.0e9, 96, 12288, 96, 128, 3_200_000, 0.6e-4),
}

GPT3_PRESETS: dict[str, dict] = {
    name: dict(d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads, seq_len=GPT3_CONTEXT)
    for name, r in GPT3_LADDER.items()
}
"""Sizes for ``models.transformer_config.PRESETS`` (decoder families)."""
