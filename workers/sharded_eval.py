"""Checkpoint evaluation of a decoder cut into ``eval.shards`` Ray actors by blocks.

For a model too large for one evaluation task's memory or device. Shard 0
holds the token (and learned position) embedding and the first blocks; the
last shard holds the last blocks, the final norm and the LM head (a tied
model's copy of the token table, as the consolidated checkpoint stores it);
shards between hold blocks only. The layers are the pipeline-parallel ones
(``workers.parallel.pipeline``), which name their tensors as the Decoder's
state dict does.

Each shard reads only its own tensors from the consolidated
``model.safetensors`` through safetensors' lazy ``safe_open`` (a remote file
is fetched to the shard's local disk first), so a shard's memory is about
1/shards of the model's.

Activations pass from shard to shard as Ray object references. Every batch
is submitted at once, so the shards work on different batches at the same
time, like a pipeline, and the last shard returns each batch's loss. The
shards are gang-placed in one placement group (all start or none), which is
removed at the end.
"""
from __future__ import annotations

import math
import os
import tempfile

import ray
import torch
import torch.nn as nn

from specs.errors import UserError

EVAL_GROUP_PREFIX = "sy-eval-shards-"
"""Name prefix of the shards' placement group (removed when the evaluation ends)."""


def block_ranges(n_layers: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, as even as can be: 5 blocks in 2 shards give (0, 3) and (3, 5)."""
    if not 1 <= shards <= n_layers:
        raise UserError(f"eval.shards: {shards} shards for {n_layers} blocks; use 1 to {n_layers}")
    base, extra = divmod(n_layers, shards)
    out, lo = [], 0
    for i in range(shards):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


def shard_layers(cfg, lo: int, hi: int, first: bool, last: bool) -> list[tuple[str, nn.Module]]:
    """(Decoder state-dict prefix, layer) of one shard, in forward order."""
    from workers.parallel.pipeline import BlockPipe, HeadPipe, NormPipe, PositionPipe, TokenEmbedding

    layers: list[tuple[str, nn.Module]] = []
    if first:
        layers += [("", TokenEmbedding(cfg)), ("", PositionPipe(cfg))]
    layers += [(f"blocks.{i}.", BlockPipe(cfg, i)) for i in range(lo, hi)]
    if last:
        layers += [("", NormPipe(cfg)), ("", HeadPipe(cfg))]  # lm_head.weight is in every consolidated file
    return layers


def _local_copy(storage, uri: str, tmp: str) -> str:
    if storage.is_local:
        return storage.local_path(uri)
    path = os.path.join(tmp, "model.safetensors")
    storage.fs.get(uri, path)
    return path


class EvalShard:
    """One shard's layers, loaded with only its own tensors; ``forward`` runs them on a batch."""

    def __init__(self, storage, ckpt_path: str, family: str, model: dict, block_range: tuple[int, int],
                 first: bool, last: bool, threads: int = 1):
        from safetensors import safe_open

        from workers.tasks import config_from_dict

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray set CUDA_VISIBLE_DEVICES
        self.last = last
        self.layers = shard_layers(config_from_dict(family, model), *block_range, first, last)
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"{ckpt_path}/model.safetensors"
            with safe_open(_local_copy(storage, uri, tmp), framework="pt") as f:
                stored = set(f.keys())
                for prefix, layer in self.layers:
                    own = list(layer.state_dict())
                    missing = [prefix + k for k in own if prefix + k not in stored]
                    if missing:
                        raise UserError(f"checkpoint {ckpt_path}: model.safetensors lacks {missing[:3]}")
                    layer.load_state_dict({k: f.get_tensor(prefix + k) for k in own}, strict=True)
                    layer.to(self.device).eval()

    def parameters(self) -> int:
        """Parameters this shard holds."""
        return sum(p.numel() for _, layer in self.layers for p in layer.parameters())

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Ids or hidden states in; hidden states out, or on the last shard (loss sum, samples) of the batch."""
        from workers.parallel.pipeline import lm_loss

        with torch.no_grad():
            x = x.to(self.device, non_blocking=True)
            for _, layer in self.layers:
                x = layer(x)
            if not self.last:
                return x.cpu()
            return float(lm_loss(x, targets.to(self.device))) * len(x), len(x)


def evaluate_sharded(storage, spec, run_dir: str, ckpt_path: str, step: int, batches: int, micro_batch: int,
                     threads: int = 1, gpus: int = 0) -> dict:
    """The held-out loss of one checkpoint, as ``workers.evaluator`` computes it whole, over ``spec.eval.shards``."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from data.sampler import DataPlan
    from data.shards import TokenCache

    family = spec.model.family
    model = storage.read_json(f"{run_dir}/model_config.json")["model"]
    ranges = block_ranges(model["n_layers"], spec.eval.shards)
    bundle = {"CPU": threads, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * len(ranges), strategy="PACK", name=f"{EVAL_GROUP_PREFIX}{os.getpid()}-{step}")
    ray.get(pg.ready())
    shard = ray.remote(EvalShard)
    actors = []
    try:
        for i, block_range in enumerate(ranges):
            actors.append(shard.options(
                num_cpus=threads, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(storage, ckpt_path, family, model, block_range, i == 0, i == len(ranges) - 1, threads))
        info = storage.read_json(f"{run_dir}/data.json")
        cache = TokenCache.load(info["token_cache"], storage)
        plan = DataPlan(cache.tokens, spec.data.seq_len, spec.eval.held_out_tokens, spec.train.seed)
        pending = []
        for i in range(batches):
            batch = plan.held_out_batch(i, micro_batch)
            if batch is None:
                break
            x = torch.as_tensor(batch[0])
            for actor in actors[:-1]:
                x = actor.forward.remote(x)
            pending.append(actors[-1].forward.remote(x, torch.as_tensor(batch[1])))
        sums = ray.get(pending)
        held = ray.get([a.parameters.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)
    count = sum(n for _, n in sums)
    if count == 0:
        raise RuntimeError("eval.held_out_tokens is too small for one held-out sample")
    loss = sum(total for total, _ in sums) / count
    return {"checkpoint": ckpt_path, "step": step, "loss": loss, "perplexity": math.exp(min(loss, 50)),
            "tokens": count * spec.data.seq_len, "extra": {"shards": len(ranges), "shard_parameters": held}}
