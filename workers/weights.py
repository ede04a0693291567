"""The one weights resolver: which trained weights a path names, and loading them into a model.

A path is a run directory (its best checkpoint, else its latest complete
one), one checkpoint folder, or (for ``model.init_from``) a Hugging Face
folder. Training (``init_from``), evaluation, export and the InstructGPT
stages all come here. Tensors only: nothing is unpickled.

What the weights are depends on the run: a pretrain, SFT or PPO run holds a
``Decoder`` or an ``Encoder``, an RM run a ``ScalarHeadModel``
(``model_config.json`` says ``"head": "scalar"``). A PPO checkpoint also
holds ``value.safetensors`` (the value model) and, with an EMA,
``ema.safetensors``. Tied output projections are stored once
(``checkpoint.save_safetensors``): ``load_state`` accepts them missing.
"""
from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass

import torch

from data.storage import Storage, storage_for
from models.encoder import EncoderConfig
from models.heads import ScalarHeadModel
from models.transformer import Decoder, DecoderConfig
from specs.errors import UserError
from workers import checkpoint as ckpt_lib
from workers.tasks import config_from_dict, is_encoder_config

FILES = {"model": "model.safetensors", "value": "value.safetensors", "ema": "ema.safetensors"}


@dataclass
class Weights:
    """Trained weights with what is needed to rebuild and describe them."""

    family: str
    config: DecoderConfig | EncoderConfig
    state: dict[str, torch.Tensor]
    """The single-device model's state dict."""
    source: str
    """The checkpoint folder or Hugging Face folder read."""
    tokenizer_dir: str | None
    """Folder with the tokenizer.json the weights were trained with."""
    fresh: tuple[str, ...] = ()
    """Prefixes of the model's parameters the source has no weights for (an imported ELECTRA's generator):
    they keep the built model's initialisation."""


# ----------------------------------------------------------------------------- which checkpoint


def pick_checkpoint(storage: Storage, run_dir: str) -> ckpt_lib.CheckpointInfo:
    """The run's best checkpoint (best_checkpoint.json) if it is complete, else its latest complete one."""
    done = ckpt_lib.list_checkpoints(storage, run_dir)
    best_uri = f"{run_dir}/best_checkpoint.json"
    if storage.exists(best_uri):
        best = posixpath.basename(storage.read_json(best_uri).get("path", "").rstrip("/"))
        for c in done:
            if posixpath.basename(c.path.rstrip("/")) == best:
                return c
    if not done:
        raise ValueError(f"{run_dir}: no complete checkpoint (a manifest.json in checkpoints/step_*/)")
    return done[-1]


def resolve_checkpoint(storage: Storage, path: str) -> tuple[str, ckpt_lib.CheckpointInfo]:
    """(run directory, checkpoint) of a run directory (best, else latest complete checkpoint) or of one
    checkpoint folder; ValueError with a message for people when ``path`` is neither or is incomplete."""
    path = path.rstrip("/")
    if storage.exists(f"{path}/manifest.json"):
        run_dir = posixpath.dirname(posixpath.dirname(path))                        # <run>/checkpoints/step_N
        done = [c for c in ckpt_lib.list_checkpoints(storage, run_dir)
                if posixpath.basename(c.path) == posixpath.basename(path)]
        if not done:
            raise ValueError(f"{path}: the checkpoint is incomplete (its files do not match its manifest)")
        return run_dir, done[0]
    if storage.exists(f"{path}/spec.json"):
        return path, pick_checkpoint(storage, path)
    raise ValueError(f"{path}: not a run directory (spec.json) or a checkpoint folder (manifest.json)")


def checkpoint_of(storage: Storage, path: str) -> tuple[str, str]:
    """(run directory, checkpoint folder) of a run directory or a checkpoint folder; ValueError if neither."""
    run_dir, ckpt = resolve_checkpoint(storage, path)
    return run_dir, ckpt.path


# ----------------------------------------------------------------------------- reading weights


def model_info(storage: Storage, run_dir: str) -> dict:
    uri = f"{run_dir}/model_config.json"
    if not storage.exists(uri):
        raise ValueError(f"{run_dir}: no model_config.json (the run never started training)")
    return storage.read_json(uri)


def tensors(storage: Storage, ckpt: str, which: str = "model") -> dict[str, torch.Tensor]:
    """One of a checkpoint's consolidated files (``FILES``); ValueError with a message when it is absent."""
    if not storage.exists(f"{ckpt}/{FILES[which]}"):
        raise ValueError(f"{ckpt}: no {FILES[which]} (" + ("the run had checkpoint.consolidated: false" if
                         which == "model" else f"not a PPO checkpoint with a {which} model") + ")")
    return ckpt_lib.load_consolidated(storage, ckpt, FILES[which])


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
               fresh: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; a key may be missing only where it is tied to one that is present,
    or where it starts with one of the ``fresh`` prefixes (it keeps the module's initialisation).

    Raises ValueError naming ``where`` and the first mismatched keys.
    """
    own = module.state_dict()
    present = {own[k].data_ptr() for k in state if k in own}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if own[k].data_ptr() not in present              # tied: stored once
               and not k.startswith(fresh)]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def run_weights(storage: Storage, path: str) -> Weights:
    """Consolidated weights of a run directory (best, else latest checkpoint) or of one checkpoint folder.

    Raises ValueError with a message for people when ``path`` is neither or lacks what is needed.
    """
    run_dir, ckpt = resolve_checkpoint(storage, path)
    if not storage.exists(f"{ckpt.path}/model.safetensors"):
        raise ValueError(f"{ckpt.path}: no consolidated model.safetensors (the run had checkpoint.consolidated: false)")
    if not storage.exists(f"{run_dir}/model_config.json"):
        raise ValueError(f"{run_dir}: no model_config.json next to the checkpoints")
    info = storage.read_json(f"{run_dir}/model_config.json")
    family = info.get("family") or storage.read_json(f"{run_dir}/spec.json")["model"]["family"]
    cfg = config_from_dict(family, info["model"])
    tok_dir = None
    if storage.exists(f"{run_dir}/data.json"):
        tok_dir = storage.read_json(f"{run_dir}/data.json").get("token_cache")
    return Weights(family, cfg, ckpt_lib.load_consolidated(storage, ckpt.path), ckpt.path, tok_dir)


def source_weights(storage: Storage, path: str) -> Weights:
    """``model.init_from``: a Hugging Face folder (config.json), a run directory or a checkpoint folder."""
    path = path.rstrip("/")
    if storage.exists(f"{path}/config.json"):
        from models.hf import fresh_on_import, import_hf_family

        family, cfg, state = import_hf_family(path, fs=storage.fs)
        return Weights(family, cfg, state, path, path, fresh_on_import(family))
    if not storage.exists(f"{path}/spec.json") and not storage.exists(f"{path}/manifest.json"):
        raise ValueError(f"{path}: not a Hugging Face folder (config.json), a run directory (spec.json) "
                         "or a checkpoint folder (manifest.json)")
    return run_weights(storage, path)


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
    load_state(model, tensors(storage, ckpt, which), f"{ckpt}/{FILES[which]}")
    return model.eval()


def load_reward_model(storage: Storage, path: str, which: str = "model") -> ScalarHeadModel:
    """The reward model of an RM run (``which="model"``) or the value model of a PPO run (``which="value"``)."""
    run_dir, ckpt = checkpoint_of(storage, path)
    info = model_info(storage, run_dir)
    if which == "model" and info.get("head") != "scalar":
        raise ValueError(f"{path} holds a policy, not a reward model (give an RM stage's run directory)")
    model = ScalarHeadModel(Decoder(decoder_config_of(storage, run_dir)))
    load_state(model, tensors(storage, ckpt, which), f"{ckpt}/{FILES[which]}")
    return model.eval()


def run_tokenizer(storage: Storage, run_dir: str):
    """The tokenizer a run trained with (its token cache's tokenizer.json)."""
    from data.shards import load_cached_tokenizer

    uri = f"{run_dir.rstrip('/')}/data.json"
    if not storage.exists(uri):
        raise ValueError(f"{run_dir}: no data.json (the run never prepared its data)")
    return load_cached_tokenizer(storage.read_json(uri)["token_cache"], storage)


# ----------------------------------------------------------------------------- model.init_from


def _same_vocab(a: tuple[Storage, str], b: tuple[Storage, str]) -> bool:
    """Whether two tokenizer folders map the same strings to the same ids."""
    from tokenizers import Tokenizer

    vocab = [Tokenizer.from_str(st.read_text(f"{folder}/tokenizer.json")).get_vocab(with_added_tokens=True)
             for st, folder in (a, b)]
    return vocab[0] == vocab[1]


def _check_sizes(spec, cfg, src) -> None:
    """A size the spec sets explicitly must match the weights; so must the Switch layers."""
    m = spec.model
    explicit = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                "n_kv_heads": m.n_kv_heads, "parallel_block": m.parallel_block, "tie_embeddings": m.tie_embeddings}
    for name, value in explicit.items():
        theirs = {"n_kv_heads": getattr(src, "kv_heads", None), "d_ff": getattr(src, "ff_dim", src.d_ff)}.get(
            name, getattr(src, name, None))
        if value is not None and value != theirs:
            raise UserError(f"model.{name}: {value}, but {m.init_from} has {theirs}; leave it out or match it")
    moes = [getattr(c, "moe", None) for c in (cfg, src)]                         # encoder-decoders have none
    experts = [(moe.num_experts, moe.every) if moe is not None else None for moe in moes]
    if experts[0] != experts[1]:
        raise UserError("model.moe: the weights have " + ("no Switch layers" if experts[1] is None else
                        f"num_experts={experts[1][0]}, every={experts[1][1]}") + "; set model.moe to match")


def init_config(spec, storage: Storage, cfg, tokenizer, token_cache: str) -> tuple[object, Weights]:
    """The model config when starting from ``model.init_from``: the weights' architecture.

    ``cfg`` is the spec's own config. The preset is ignored; a size the spec
    sets explicitly (d_model, n_layers, ...) must match the weights. Taken
    from the spec: dropout, the Switch routing settings (capacity factors,
    loss weights; the experts must match), and for RoPE decoders the sequence
    length (rotary tables have no weights). Refused with a message: another
    family, a tokenizer other than the one the weights were trained with,
    more token ids than embedding rows, a longer data.seq_len than a learned
    position table holds.
    """
    m = spec.model
    where = f"model.init_from: {m.init_from}"
    src_storage = storage_for(m.init_from, storage)
    try:
        w = source_weights(src_storage, m.init_from)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"model.init_from: {err}") from None
    src = w.config
    if w.family != m.family:
        raise UserError(f"model.family: {m.init_from} holds a {w.family} model; set model.family={w.family}")
    _check_sizes(spec, cfg, src)
    if tokenizer.vocab_size > src.vocab_size:
        raise UserError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                        f"{src.vocab_size} embedding rows")
    if w.tokenizer_dir and src_storage.exists(f"{w.tokenizer_dir}/tokenizer.json") \
            and not _same_vocab((src_storage, w.tokenizer_dir), (storage, token_cache)):
        raise UserError(f"{where}: the weights were trained with another tokenizer than data.tokenizer gives "
                        "here; use the same data.tokenizer (and corpus, for bpe)")
    changes: dict = {"dropout": m.dropout, **({"moe": cfg.moe} if hasattr(src, "moe") else {})}
    if not is_encoder_config(src) and src.pos == "rope":
        changes["seq_len"] = spec.data.seq_len
    elif spec.data.seq_len > getattr(src, "seq_len", spec.data.seq_len):        # t5: no position table
        raise UserError(f"data.seq_len: {spec.data.seq_len} is longer than the position table of "
                        f"{m.init_from} ({src.seq_len})")
    return dataclasses.replace(src, **changes), w


def load_init_state(model: torch.nn.Module, w: Weights) -> None:
    """Load ``model.init_from`` weights into the freshly built model."""
    try:
        load_state(model, w.state, f"model.init_from: {w.source}", w.fresh)
    except ValueError as err:
        raise UserError(str(err)) from None
