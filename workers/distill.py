"""The distill job kind: a smaller student learns from a frozen teacher with DistilBERT's triple loss.

Sanh et al. 2019 (DistilBERT)::

    loss = alpha_kd  * T**2 * KL(softmax(z_t / T) || softmax(z_s / T))    # soft targets, every position
         + alpha_lm  * the student's own loss                              # MLM (+ NSP for BERT) or next-token LM
         + alpha_cos * mean(1 - cos(h_s, h_t))                             # last hidden states

The student is the spec's model, trained on the pretrain task of its family
(``workers/tasks.py``: the same batches, masks and data position as a
pretrain job). The teacher (``distill.teacher``: a run directory, a
checkpoint folder or a Hugging Face folder, resolved by ``workers/weights.py``
as ``model.init_from`` is) must be of the same family and tokenizer; it runs
on every rank as a frozen DeepSpeed inference engine (ZeRO-3 shards it when
the student trains with ZeRO-3) and is never saved: a checkpoint holds the
student only, so a distill run directory is what ``switchyard export``,
evaluation and ``model.init_from`` read like any pretrain run.

The cosine term compares hidden states of equal width: DistilBERT keeps the
teacher's width and halves its depth. A student of another width is refused
unless ``alpha_cos: 0`` (a learned projection would be a trained part that
the exported student does not hold). Hidden states are read with a forward
hook on the module that produces the last ones (the final norm of a decoder,
the last block of an encoder), so both models run through their engines.

Where every shape but the depth matches, the student starts from every other
layer of the teacher (layer i from teacher layer i x L_t // L_s: 0, 2, 4, ...
when the teacher is twice as deep) and all of its embeddings and heads.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from specs.errors import UserError
from workers.checkpoint import CheckpointInfo
from workers.kind import RankEnv
from workers.metrics import step_means
from workers.parallel.engine import frozen_engine
from workers.pretrain import Pretrain
from workers.tasks import _to_device, build_model, is_encoder_config, model_config
from workers.weights import Weights, _same_vocab, load_state, source_weights, storage_for

log = logging.getLogger(__name__)

POSITION_TABLES = ("pos_emb.weight", "embeddings.position.weight")
"""Learned position tables: a student with a shorter one takes the teacher's first rows."""

# ----------------------------------------------------------------------------- the losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T**2 x KL(teacher_T || student_T), averaged over positions; logits (..., V) of the same V."""
    V = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature ** 2


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(h_s, h_t)) over positions; hidden states (..., d) of the same d (CosineEmbeddingLoss, y=1)."""
    d = student_hidden.shape[-1]
    cos = F.cosine_similarity(student_hidden.float().reshape(-1, d), teacher_hidden.float().reshape(-1, d), dim=-1)
    return (1.0 - cos).mean()


# ----------------------------------------------------------------------------- the student's start


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer of each student layer, evenly spaced from 0: every other one when the teacher is twice as deep."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def _shape_fields(cfg) -> dict:
    """Everything of a config that fixes weight shapes, depth, dropout and sequence length left out."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("n_layers", "dropout", "seq_len")}


def student_state(student_cfg, teacher_cfg, teacher_state: dict[str, torch.Tensor]) -> tuple[dict, list[int]] | None:
    """The student's starting weights from the teacher's layers, and which layers; None when shapes differ.

    Blocks are mapped by ``layer_map`` over distinct blocks (an ALBERT's one
    shared block maps to itself); every other tensor (embeddings, final norm,
    heads) is the teacher's; a learned position table keeps its first rows.
    """
    if type(student_cfg) is not type(teacher_cfg) or _shape_fields(student_cfg) != _shape_fields(teacher_cfg):
        return None
    if getattr(student_cfg, "pos", "learned") == "learned" and student_cfg.seq_len > teacher_cfg.seq_len:
        return None
    n_teacher, n_student = getattr(teacher_cfg, "n_blocks", teacher_cfg.n_layers), \
        getattr(student_cfg, "n_blocks", student_cfg.n_layers)
    if n_student > n_teacher:
        return None
    layers = layer_map(n_teacher, n_student)
    out = {}
    for key, value in teacher_state.items():
        if not key.startswith("blocks."):
            out[key] = value[:student_cfg.seq_len] if key in POSITION_TABLES else value
            continue
        j, rest = key.split(".", 2)[1:]
        for i, src in enumerate(layers):
            if src == int(j):
                out[f"blocks.{i}.{rest}"] = value
    return out, layers


# ----------------------------------------------------------------------------- the teacher


def teacher_weights(spec, storage, tokenizer, token_cache: str) -> Weights:
    """``distill.teacher``'s weights, checked against the student's family, tokenizer and sequence length."""
    path = spec.distill.teacher
    src_storage = storage_for(path, storage)
    try:
        w = source_weights(src_storage, path)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"distill.teacher: {err}") from None
    if w.family != spec.model.family:
        raise UserError(f"model.family: the teacher {path} is a {w.family} model; distill a {w.family} student "
                        f"(model.family: {w.family})")
    cfg = w.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"distill.teacher: the tokenizer has {tokenizer.vocab_size} ids but the teacher only "
                        f"{cfg.vocab_size} embedding rows")
    if w.tokenizer_dir and src_storage.exists(f"{w.tokenizer_dir}/tokenizer.json") \
            and not _same_vocab((src_storage, w.tokenizer_dir), (storage, token_cache)):
        raise UserError("distill.teacher: the teacher was trained with another tokenizer than data.tokenizer gives "
                        "here; use the same data.tokenizer (and corpus, for bpe)")
    if not is_encoder_config(cfg) and cfg.pos == "rope":
        cfg = dataclasses.replace(cfg, seq_len=spec.data.seq_len)                 # rotary tables have no weights
    elif spec.data.seq_len > cfg.seq_len:
        raise UserError(f"data.seq_len: {spec.data.seq_len} is longer than the teacher's position table "
                        f"({cfg.seq_len})")
    return dataclasses.replace(w, config=dataclasses.replace(cfg, dropout=0.0))


class LastHidden:
    """A forward hook keeping the last hidden states a model computed (the final norm of a decoder, the
    last block of an encoder; a shared ALBERT block keeps its last application)."""

    def __init__(self, model: torch.nn.Module):
        self.value: torch.Tensor | None = None
        module = model.blocks[-1] if is_encoder_config(model.cfg) else model.norm_f
        module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output


def forward(engine, batch: dict, labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the model's own loss when ``labels``) for a CausalLM or MaskedLM batch."""
    if "idx" in batch:
        return engine(batch["idx"], batch["targets"] if labels else None)
    if not labels:
        return engine(batch["input_ids"], batch.get("token_type_ids"))
    return engine(batch["input_ids"], batch.get("token_type_ids"), None, batch["mlm_labels"], batch.get("nsp_labels"))


# ----------------------------------------------------------------------------- the kind


class Distill(Pretrain):
    """A pretrain job whose step also runs the frozen teacher and adds its two terms to the loss."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        self.teacher_w: Weights | None = None
        super().__init__(env, latest, universal)                    # the student; _config reads the teacher
        spec, w = self.spec, self.teacher_w
        teacher = build_model(w.config)
        load_state(teacher, w.state, f"distill.teacher: {w.source}")
        self.teacher = frozen_engine(teacher, spec, zero3=spec.parallel.zero_stage == 3)
        self.teacher_hidden, self.student_hidden = LastHidden(teacher), LastHidden(self.engine.module)
        self.vocab = self.tokenizer.vocab_size                      # padding rows are never targets
        self.cosine = spec.distill.alpha_cos > 0
        self.teacher_w = None                                       # its tensors live in the engine now

    def _config(self, tokenizer, latest: CheckpointInfo | None):
        """(the student's config from the spec, its start from the teacher's layers or None)."""
        spec, env = self.spec, self.env
        self.tokenizer = tokenizer
        cfg = model_config(spec, tokenizer.padded_vocab_size)
        w = self.teacher_w = teacher_weights(spec, env.storage, tokenizer, env.ctx.token_cache)
        if spec.distill.alpha_cos > 0 and cfg.d_model != w.config.d_model:
            raise UserError(f"distill.alpha_cos: the student's d_model ({cfg.d_model}) is not the teacher's "
                            f"({w.config.d_model}); match model.d_model or set distill.alpha_cos: 0")
        if latest is not None or not spec.distill.init_from_teacher:
            return cfg, None                                        # resuming: the checkpoint has the weights
        start = student_state(cfg, w.config, w.state)
        if start is None:
            log.info("distill: the student's shapes differ from the teacher's beyond depth; random init")
            return cfg, None
        state, layers = start
        log.info("distill: student layers start from teacher layers %s", layers)
        return cfg, Weights(w.family, cfg, state, f"{w.source} (layers {layers})", w.tokenizer_dir)

    def step(self, step: int, position: int) -> dict:
        spec, engine, d = self.spec, self.engine, self.spec.distill
        positions = self.order.rank_positions(position, spec.samples_per_step, self.dp_rank, spec.dp)
        rows = []
        for s in spec.micro_slices:
            batch = _to_device(self.task.batch(positions[s]), self.env.device)
            with torch.no_grad():
                teacher_logits, _ = forward(self.teacher, batch, labels=False)
            logits, own = forward(engine, batch, labels=True)
            kd = kd_loss(logits[..., :self.vocab], teacher_logits[..., :self.vocab], d.temperature)
            loss = d.alpha_kd * kd + d.alpha_lm * own
            row = {"kd_loss": kd.item(), "lm_loss": own.item()}
            if self.cosine:
                cos = cosine_loss(self.student_hidden.value, self.teacher_hidden.value)
                loss = loss + d.alpha_cos * cos
                row["cos_loss"] = cos.item()
            engine.backward(loss)
            engine.step()
            rows.append({"loss": loss.item(), **row})
        return step_means(rows)
