"""Loading the trained models of the InstructGPT stages, for the next stage, evaluation and the report.

A stage's run directory looks like a pretrain run's: ``model_config.json``
and ``checkpoints/step_N/`` with consolidated ``model.safetensors``. What the
weights are depends on the stage: an SFT or PPO run holds a ``Decoder`` (the
policy), an RM run a ``ScalarHeadModel`` (``model_config.json`` says
``"head": "scalar"``). A PPO checkpoint also holds ``value.safetensors`` (the
value model) and, with an EMA, ``ema.safetensors``.

``path`` is a run directory (its best checkpoint, else its latest complete
one) or one checkpoint folder. Tensors only: nothing is unpickled.
"""
from __future__ import annotations

import torch

from data.storage import Storage
from models.heads import ScalarHeadModel
from models.transformer import Decoder, DecoderConfig

FILES = {"model": "model.safetensors", "value": "value.safetensors", "ema": "ema.safetensors"}


def checkpoint_of(storage: Storage, path: str) -> tuple[str, str]:
    """(run directory, checkpoint folder) of a run directory or a checkpoint folder; ValueError if neither."""
    from workers.train_loop import resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(storage, path)
    return run_dir, ckpt.path


def model_info(storage: Storage, run_dir: str) -> dict:
    uri = f"{run_dir}/model_config.json"
    if not storage.exists(uri):
        raise ValueError(f"{run_dir}: no model_config.json (the run never started training)")
    return storage.read_json(uri)


def _tensors(storage: Storage, ckpt: str, which: str) -> dict[str, torch.Tensor]:
    from workers.checkpoint import load_consolidated

    if not storage.exists(f"{ckpt}/{FILES[which]}"):
        raise ValueError(f"{ckpt}: no {FILES[which]} (" + ("the run had checkpoint.consolidated: false" if
                         which == "model" else f"not a PPO checkpoint with a {which} model") + ")")
    return load_consolidated(storage, ckpt, FILES[which])


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]              # tied: stored once
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def decoder_config_of(storage: Storage, run_dir: str) -> DecoderConfig:
    info = model_info(storage, run_dir)
    if info.get("kind", "decoder") != "decoder":
        raise ValueError(f"{run_dir} holds an {info.get('kind')} model, not a decoder")
    return DecoderConfig.from_dict(info["model"])


def load_policy(storage: Storage, path: str, which: str = "model") -> Decoder:
    """A decoder policy (SFT run, PPO run, pretrain run) in eval mode; ``which="ema"``: a PPO run's EMA policy."""
    run_dir, ckpt = checkpoint_of(storage, path)
    info = model_info(storage, run_dir)
    if info.get("head") == "scalar":
        raise ValueError(f"{path} holds a reward model, not a policy")
    model = Decoder(decoder_config_of(storage, run_dir))
    _load(model, _tensors(storage, ckpt, which), f"{ckpt}/{FILES[which]}")
    return model.eval()


def load_reward_model(storage: Storage, path: str, which: str = "model") -> ScalarHeadModel:
    """The reward model of an RM run (``which="model"``) or the value model of a PPO run (``which="value"``)."""
    run_dir, ckpt = checkpoint_of(storage, path)
    info = model_info(storage, run_dir)
    if which == "model" and info.get("head") != "scalar":
        raise ValueError(f"{path} holds a policy, not a reward model (give an RM stage's run directory)")
    model = ScalarHeadModel(Decoder(decoder_config_of(storage, run_dir)))
    _load(model, _tensors(storage, ckpt, which), f"{ckpt}/{FILES[which]}")
    return model.eval()


def run_tokenizer(storage: Storage, run_dir: str):
    """The tokenizer a run trained with (its token cache's tokenizer.json)."""
    from data.shards import load_cached_tokenizer

    uri = f"{run_dir.rstrip('/')}/data.json"
    if not storage.exists(uri):
        raise ValueError(f"{run_dir}: no data.json (the run never prepared its data)")
    return load_cached_tokenizer(storage.read_json(uri)["token_cache"], storage)
