"""Pipeline parallelism: a ``models.transformer.Decoder`` cut into DeepSpeed pipeline stages.

The decoder becomes a flat list of layers, each a ``LayerSpec`` that DeepSpeed
builds only on the stage that owns it::

    0      TokenEmbedding   tok_emb            (B, T) ids  -> (B, T, d)   TiedLayerSpec when embeddings are tied
    1      PositionPipe     pos_emb + dropout  (B, T, d)   -> (B, T, d)   no parameters under RoPE
    2..    BlockPipe        blocks.i           (B, T, d)   -> (B, T, d)   one per block
    -2     NormPipe         norm_f             (B, T, d)   -> (B, T, d)
    -1     HeadPipe         lm_head            (B, T, d)   -> (B, T, V)   or the tied TokenEmbedding as logits

Stages are balanced by the number of blocks (``partition_method="type:BlockPipe"``):
the embedding lands on the first stage, the final norm and LM head on the
last. With tied embeddings the first and last stage each hold a copy of the
token embedding; DeepSpeed keeps them equal by all-reducing their gradients
over the stages that share them (``TiedLayerSpec``).

Every layer names its parameters as the Decoder does (``tok_emb.weight``,
``norm_f.weight``, a block's ``attn.q_proj.weight`` under ``blocks.<i>.``),
so one mapping takes a full Decoder's state dict into the local stage
(``load_decoder_state``: the same seed gives the same initial weights as the
non-pipeline run) and gathers the stages back into a Decoder state dict
(``gather_decoder_state``: the consolidated ``model.safetensors``).

Micro-batches: ``engine.train_batch(it)`` pulls ``train.grad_accum``
``(input_ids, targets)`` pairs from ``it`` on the first and last stage; the
data-parallel rank of a stage is ``engine.grid.get_data_parallel_id()``, not
its global rank (global rank = stage * dp + data-parallel rank).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.transformer import IGNORE_INDEX, Block, DecoderConfig, make_norm, rope_tables

TIE_KEY = "tok_emb"


# ----------------------------------------------------------------------------- layers


class TokenEmbedding(nn.Module):
    """The token table; on the last stage of a tied model it also gives the logits (``as_logits``)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx)                                                     # (B, T, d)


def tied_logits(module: TokenEmbedding, h: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, T, V) through the shared token table."""
    return F.linear(h, module.tok_emb.weight)


class PositionPipe(nn.Module):
    """Learned positions (GPT-2) and the embedding dropout; RoPE models only apply the dropout here."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))          # (B, T, d)
        return F.dropout(x, self.dropout, self.training)


class BlockPipe(Block):
    """A decoder block that carries its own rotary tables (activations are the only thing stages pass)."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__(cfg, layer)
        self.use_rope = cfg.pos == "rope"
        if self.use_rope:
            cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # (B, T, d) -> (B, T, d)
        return super().forward(x, (self.rope_cos, self.rope_sin) if self.use_rope else None)


class NormPipe(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm_f = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class HeadPipe(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)                                                       # (B, T, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Decoder's loss: mean cross-entropy in float32 over targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- the pipeline module


def layer_specs(cfg: DecoderConfig) -> tuple[list, list[str]]:
    """The layer list and, per layer, the prefix of its parameters in a Decoder state dict."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.moe is not None:
        raise ValueError("pipeline parallelism with Switch (MoE) layers is not supported")
    if cfg.tie_embeddings:
        first = TiedLayerSpec(TIE_KEY, TokenEmbedding, cfg, tied_weight_attr="tok_emb.weight")
        last = TiedLayerSpec(TIE_KEY, TokenEmbedding, cfg, forward_fn=tied_logits, tied_weight_attr="tok_emb.weight")
    else:
        first, last = LayerSpec(TokenEmbedding, cfg), LayerSpec(HeadPipe, cfg)
    specs = [first, LayerSpec(PositionPipe, cfg)]
    specs += [LayerSpec(BlockPipe, cfg, i) for i in range(cfg.n_layers)]
    specs += [LayerSpec(NormPipe, cfg), last]
    prefixes = ["", ""] + [f"blocks.{i}." for i in range(cfg.n_layers)] + ["", ""]
    return specs, prefixes


def pipeline_module(cfg: DecoderConfig, stages: int):
    """A ``PipelineModule`` of ``stages`` stages (collective: every rank calls it after init_distributed)."""
    from deepspeed.pipe import PipelineModule

    if stages > cfg.n_layers:
        raise ValueError(f"parallel.pp: {stages} stages for {cfg.n_layers} blocks; use at most one stage per block")
    specs, prefixes = layer_specs(cfg)
    module = PipelineModule(layers=specs, num_stages=stages, loss_fn=lm_loss, partition_method="type:BlockPipe")
    module.decoder_prefixes = prefixes
    return module


def local_layers(module) -> list[tuple[str, nn.Module]]:
    """(Decoder prefix, module) of each layer this stage holds; a tied module appears once."""
    from deepspeed.pipe import TiedLayerSpec

    stage = module.stage_id
    lo, hi = module.parts[stage], module.parts[stage + 1]
    out, seen = [], set()
    for idx in range(lo, hi):
        spec = module._layer_specs[idx]
        layer = module.tied_modules[spec.key] if isinstance(spec, TiedLayerSpec) else module._modules[str(idx)]
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append((module.decoder_prefixes[idx], layer))
    return out


def load_decoder_state(module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full Decoder state dict into this stage's layers (every name the stage holds must be there)."""
    with torch.no_grad():
        for prefix, layer in local_layers(module):
            own = {k: state[prefix + k] for k in layer.state_dict()}
            layer.load_state_dict(own, strict=True)


def stage_state(module) -> dict[str, torch.Tensor]:
    """This stage's parameters under their Decoder names (fp32 copies)."""
    return {prefix + k: v.detach().float().cpu().clone()
            for prefix, layer in local_layers(module) for k, v in layer.state_dict().items()}


def gather_decoder_state(engine) -> dict[str, torch.Tensor] | None:
    """Collective: the whole Decoder state dict on rank 0 (None elsewhere), from data-parallel rank 0 of each stage.

    A tied model's ``lm_head.weight`` is a copy of ``tok_emb.weight``, as in the
    unsplit model's consolidated checkpoint.
    """
    import torch.distributed as dist

    mine = stage_state(engine.module) if engine.grid.get_data_parallel_id() == 0 else {}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    if "lm_head.weight" not in out:              # tied: written twice, as the unsplit model's checkpoint does
        out["lm_head.weight"] = out["tok_emb.weight"].clone()
    return out


def micro_batches(batches):
    """The iterator ``train_batch``/``eval_batch`` read: ``(input_ids, targets)`` per micro-batch."""
    for b in batches:
        yield b["idx"], b["targets"]
