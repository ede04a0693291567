"""Job specs: YAML validated into frozen, typed objects at the edge.

A spec is data, never code: it is read as plain YAML (``specs.validate``: no
dates, sets, tags, aliases or duplicate keys), every number must be finite and
fit in 64 bits, and every field is checked here strictly (no strings for
numbers, no booleans for integers), including the combinations DeepSpeed would
refuse deep in a stack trace. Nothing past this module sees a raw dict, except
the ``deepspeed:`` block, which holds only the allow-listed keys of
``workers.parallel.deepspeed_config.DEEPSPEED_ALLOWED`` and is merged over our
defaults.

Errors are raised as ``SpecError`` with one line naming the field. The base
every section shares is in ``specs/base.py``; the sections of the InstructGPT
stages in ``specs/rlhf.py``, of distillation in ``specs/distill.py`` and of the
encoder-decoders' noising in ``specs/seq2seq.py``.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from data.labelled import BUILTIN_PACKAGES
from specs.base import BIG, SEED_MAX, FromList, PathStr, SpecError, _plain_text, _Section
from specs.distill import DistillSpec, distill_combinations
from specs.rlhf import BuiltinTaskSpec, RLHFSpec
from specs.seq2seq import NoisingSpec
from specs.validate import InputError, check_plain, load_plain_yaml, read_plain_yaml, unknown_field
from workers.rlhf.ppo_config import PPOShares

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
DECODER_FAMILIES = ("gpt2", "llama", "palm")
ENCODER_FAMILIES = ("bert", "roberta", "albert", "electra")
SEQ2SEQ_FAMILIES = ("t5", "bart")


class MoESpec(_Section):
    num_experts: int = Field(4, ge=2, le=4096)
    """Experts per Switch layer."""
    every: int = Field(2, ge=1, le=2)
    """1 = every block is a Switch layer, 2 = every other block."""
    capacity_factor_train: float = Field(1.25, gt=0, le=1000)
    """Expert capacity factor while training."""
    capacity_factor_eval: float = Field(2.0, gt=0, le=1000)
    """Expert capacity factor at evaluation."""
    min_capacity: int = Field(4, ge=0, le=1 << 24)
    """Lower bound on expert capacity (tokens)."""
    alpha: float = Field(0.01, ge=0)
    """Load-balancing loss weight."""
    z_loss: float = Field(0.0, ge=0)
    """Router z-loss weight (0 = off)."""
    jitter: float = Field(0.0, ge=0)
    """Multiplicative input jitter on the router input (0 = off)."""
    expert_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the experts."""


class ModelSpec(_Section):
    family: Literal["gpt2", "llama", "palm", "bert", "roberta", "albert", "electra", "t5", "bart"] = "llama"
    """Model family: decoders gpt2/llama/palm, encoders bert/roberta/albert/electra, encoder-decoders t5/bart."""
    preset: str | None = "tiny"
    """Size preset (tiny, mini, small, medium, base, large; decoders also gpt3-small ... gpt3-175b); explicit sizes
    override it."""
    d_model: int | None = Field(None, ge=8, le=1 << 16)
    """Residual width (overrides the preset)."""
    n_layers: int | None = Field(None, ge=1, le=1024)
    """Number of blocks (overrides the preset)."""
    n_heads: int | None = Field(None, ge=1, le=1024)
    """Attention heads (overrides the preset)."""
    n_kv_heads: int | None = Field(None, ge=1, le=1024)
    """Key/value heads: 1 = multi-query, between 1 and n_heads = grouped-query."""
    d_ff: int | None = Field(None, ge=1, le=1 << 20)
    """MLP hidden width (overrides the default for the MLP kind)."""
    parallel_block: bool | None = None
    """PaLM's parallel attention + MLP block (overrides the family default)."""
    tie_embeddings: bool | None = None
    """Tie input and output embeddings (overrides the family default)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability."""
    moe: MoESpec | None = None
    """Switch Transformer layers in place of some MLPs."""
    init_from: PathStr | None = None
    """Start from these weights: a run directory, a checkpoint folder, or a Hugging Face folder."""

    @property
    def is_decoder(self) -> bool:
        return self.family in DECODER_FAMILIES


class DataSpec(_Section):
    corpus: PathStr = "builtin:stdlib"
    """Text source: 'builtin:stdlib' or an fsspec URI/glob of .txt, .jsonl (a 'text' field) or .parquet files."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """Input format; 'auto' decides by file extension."""
    text_field: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_plain_text)] = "text"
    """Field/column holding the text in JSONL and Parquet inputs."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """'byte' (256 byte symbols + specials) or 'bpe' trained locally on the corpus."""
    vocab_size: int = Field(2048, ge=300, le=200_000)
    """Vocabulary size when training a BPE tokenizer."""
    seq_len: int = Field(128, ge=8, le=1 << 20)
    """Tokens per training sample."""
    max_docs: int | None = Field(None, ge=1)
    """Use at most this many documents of the corpus (handy for quick tests)."""
    trace: bool = False
    """Record the global sample positions each rank reads, per step, in data_trace/ (for auditing resumes)."""
    noising: NoisingSpec | None = None
    """t5 span corruption and bart denoising settings (specs/seq2seq.py); null = the papers' defaults."""


Beta = Annotated[float, Field(ge=0, lt=1)]
"""One of Adam's betas."""


class TrainSpec(_Section):
    steps: int | None = Field(None, ge=1, le=BIG)
    """Optimizer steps; give either steps or tokens."""
    tokens: int | None = Field(None, ge=1, le=10**18)
    """Token budget; steps = ceil(tokens / tokens per step)."""
    micro_batch: int = Field(8, ge=1, le=1 << 16)
    """Samples per rank per forward/backward."""
    grad_accum: int = Field(1, ge=1, le=1 << 16)
    """Micro-batches accumulated per optimizer step."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = Field(3e-3, gt=0, le=10)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = Field(10, ge=0, le=BIG)
    """Linear warm-up steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, to min_lr_ratio * lr at the last step."""
    weight_decay: float = Field(0.1, ge=0, le=10)
    """Decoupled weight decay (AdamW)."""
    betas: Annotated[tuple[Beta, Beta], FromList] = (0.9, 0.95)
    """Adam betas, each in [0, 1)."""
    grad_clip: float = Field(1.0, ge=0, le=1e6)
    """Global gradient-norm clip (0 = off)."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed for initialisation and data order (0 to 2**31 - 1)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (fp16 is not offered: it does not run on CPU)."""
    log_every: int = Field(1, ge=1, le=BIG)
    """Write a metrics row every this many steps."""

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> "TrainSpec":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("train: give exactly one of train.steps or train.tokens")
        return self


class ResourcesSpec(_Section):
    workers: int = Field(2, ge=1, le=4096)
    """Ranks (Ray actors), all started together in one placement group."""
    cpus_per_worker: float | None = Field(None, gt=0, le=1024)
    """CPUs reserved per rank (default from cluster.yaml)."""
    gpus_per_worker: float | None = Field(None, ge=0, le=64)
    """GPUs per rank (default from cluster.yaml); > 0 uses NCCL and the GPU."""
    torch_threads: int | None = Field(None, ge=1, le=1024)
    """torch intra-op threads per rank (default: the rank's CPUs, at least 1)."""
    elastic: bool = False
    """After losing workers, resume on fewer (down to min_workers) when they do not come back within
    elastic_wait_s; train.grad_accum rises to keep the global batch, so the per-step losses carry on."""
    min_workers: int | None = Field(None, ge=1, le=4096)
    """The fewest workers an elastic job resumes on (default 1)."""
    elastic_wait_s: float = Field(60.0, ge=0, le=86400)
    """How long an elastic job that lost workers waits for capacity before resuming on fewer, seconds."""
    time_limit_s: float | None = Field(None, gt=0, le=366 * 86400)
    """The most a submitted job may spend running, seconds, over all its attempts; then its ranks save a
    checkpoint and it FAILS, and ``switchyard requeue JOB --set resources.time_limit_s=...`` continues it.
    None: cluster.yaml's workers.max_time_limit_s, if any."""


class ParallelSpec(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload); needs ZeRO >= 1."""
    pp: int = Field(1, ge=1, le=4096)
    """Pipeline stages (decoders only)."""
    ep: int = Field(1, ge=1, le=4096)
    """Expert-parallel degree for Switch layers (divides the data-parallel size)."""

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage_not_bool(cls, v):
        if isinstance(v, bool):  # True == 1 would pass the Literal
            raise ValueError(f"must be 0, 1, 2 or 3, not {v!r}")
        return v


class CheckpointSpec(_Section):
    every: int = Field(50, ge=1, le=BIG)
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep: int = Field(3, ge=1, le=1_000_000)
    """Keep the K newest complete checkpoints (the best by eval loss is always kept)."""
    consolidated: bool = True
    """Also write consolidated fp32 weights (model.safetensors) with each checkpoint."""


class FewShotSpec(_Section):
    """Zero-, one- and few-shot accuracy of a decoder checkpoint on the built-in instruction task (workers/few_shot.py)."""

    k: Annotated[tuple[Annotated[int, Field(ge=0, le=64)], ...], FromList] = (0, 1, 4)
    """Solved examples put in the prompt before each question, one accuracy per k."""
    prompts: int = Field(40, ge=1, le=100_000)
    """Held-out questions scored per k (the same questions for every k)."""
    families: Annotated[tuple[str, ...] | None, FromList] = None
    """Instruction families (data.instruct.FAMILIES) to ask; null = all of them."""
    max_new_tokens: int = Field(16, ge=1, le=4096)
    """Most answer tokens generated (greedy); the answer ends at the first newline."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the questions and of the examples drawn for them."""

    @field_validator("k")
    @classmethod
    def _k(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("give one or more distinct numbers of examples")
        return v

    @field_validator("families")
    @classmethod
    def _families(cls, v):
        return BuiltinTaskSpec._families(v)


class EvalSpec(_Section):
    held_out_tokens: int = Field(16384, ge=0, le=BIG)
    """Tokens at the end of the corpus that training never sees."""
    batches: int = Field(8, ge=1, le=1_000_000)
    """Batches of held-out samples per evaluation."""
    few_shot: FewShotSpec | None = None
    """Also score each decoder checkpoint zero/one/few-shot on the built-in instruction task (null = off)."""
    shards: int = Field(1, ge=1, le=64)
    """Evaluation actors a decoder is cut into by blocks, each reading only its own tensors: for a model too
    large for one task's memory or device (workers/sharded_eval.py). Pretrain decoders without Switch layers."""


class ClassifySpec(_Section):
    """Classification fine-tuning (kind: classify): labelled rows (data/labelled.py) and the label set."""

    train_file: PathStr | None = None
    """{text, label} or {text, text_pair, label} rows, JSONL or Parquet at any fsspec URI; null = the built-in task."""
    heldout_file: PathStr | None = None
    """Held-out rows for accuracy and macro-F1; null = the rows whose text hashes into heldout_percent."""
    labels: Annotated[tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] | None, FromList] = None
    """The label set in class-id order; null = the sorted labels of the training rows."""
    heldout_percent: int = Field(10, ge=1, le=50)
    """Share (in %) of rows held out when no heldout_file is given, chosen by a hash of the text."""
    builtin_packages: Annotated[tuple[str, ...], FromList] = BUILTIN_PACKAGES
    """Built-in task: the standard-library packages whose docstrings are the classes."""
    per_label: int = Field(120, ge=1, le=1_000_000)
    """Built-in task: at most this many docstrings per package (keeps the classes near balanced)."""

    @field_validator("labels", "builtin_packages")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("give at least two distinct names")
        return v


class JobSpec(_Section):
    name: str = "job"
    """Job name (lower-case letters, digits, '.', '_' and '-')."""
    kind: Literal["pretrain", "sft", "rm", "ppo", "classify", "distill"] = "pretrain"
    """What the job trains: pretrain (language modelling), or an InstructGPT stage sft / rm / ppo."""
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec(steps=200)
    resources: ResourcesSpec = ResourcesSpec()
    parallel: ParallelSpec = ParallelSpec()
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """DeepSpeed settings merged over Switchyard's defaults: only the keys of DEEPSPEED_ALLOWED (README)."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    eval: EvalSpec = EvalSpec()
    max_restarts: int = Field(3, ge=0, le=1000)
    """Restarts after infrastructure faults before the job is FAILED (0 to 1000)."""
    rlhf: RLHFSpec = RLHFSpec()
    """InstructGPT stage settings (kinds sft, rm, ppo)."""
    classify: ClassifySpec = ClassifySpec()
    """Classification fine-tuning settings (kind classify)."""
    distill: DistillSpec = DistillSpec()
    """Distillation settings (kind distill): the teacher and the weights of the triple loss."""

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, v: dict) -> dict:
        from workers.parallel.deepspeed_config import check_deepspeed_block

        return check_deepspeed_block(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.lower()
        if not NAME_RE.match(v):
            raise ValueError("must be 1-64 of a-z 0-9 . _ - and start with a letter or digit")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "JobSpec":
        p, r, m = self.parallel, self.resources, self.model
        if r.workers % p.pp:
            raise ValueError(f"parallel.pp: {p.pp} stages must divide resources.workers ({r.workers})")
        dp = r.workers // p.pp
        if p.pp > 1 and p.zero_stage > 1:
            raise ValueError(f"parallel.zero_stage: pipeline parallelism (pp={p.pp}) works with ZeRO 0 or 1 only, "
                             f"got {p.zero_stage}")
        if p.pp > 1 and not m.is_decoder:
            raise ValueError(f"parallel.pp: pipeline parallelism is for decoder families, not {m.family}")
        if p.pp > 1 and m.moe is not None:
            raise ValueError("parallel.pp: pipeline parallelism with Switch (MoE) layers is not supported")
        if m.moe is not None and p.zero_stage == 3:
            raise ValueError("parallel.zero_stage: Switch (MoE) layers do not work with ZeRO-3; use 0, 1 or 2")
        if p.ep > 1 and m.moe is None:
            raise ValueError("parallel.ep: expert parallelism needs model.moe")
        if m.moe is not None and dp % p.ep:
            raise ValueError(f"parallel.ep: {p.ep} must divide the data-parallel size ({dp})")
        if m.moe is not None and m.moe.num_experts % p.ep:
            raise ValueError(f"parallel.ep: {p.ep} must divide model.moe.num_experts ({m.moe.num_experts})")
        if r.min_workers is not None and not r.elastic:
            raise ValueError("resources.min_workers: only elastic jobs resume on fewer workers; set resources.elastic")
        if r.elastic and (self.kind != "pretrain" or p.pp > 1):
            raise ValueError("resources.elastic: only pretraining jobs without pipeline stages resume elastically")
        if r.elastic and (r.min_workers or 1) > r.workers:
            raise ValueError(f"resources.min_workers: must be at most resources.workers ({r.workers})")
        if p.offload_optimizer and p.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer: needs parallel.zero_stage >= 1")
        if p.pp > 1 and self.train.grad_accum < p.pp:
            raise ValueError(f"train.grad_accum: a {p.pp}-stage pipeline needs at least {p.pp} micro-batches "
                             f"per step, got {self.train.grad_accum}")
        if m.preset is None and (m.d_model is None or m.n_layers is None or m.n_heads is None):
            raise ValueError("model.preset: with no preset, give model.d_model, model.n_layers and model.n_heads")
        if m.family in SEQ2SEQ_FAMILIES and self.kind != "pretrain":
            raise ValueError(f"model.family: {m.family} trains with kind: pretrain only, not {self.kind}")
        if self.data.noising is not None and m.family not in SEQ2SEQ_FAMILIES:
            raise ValueError(f"model.family: {m.family} does not use data.noising (the encoder-decoders t5 and bart "
                             "do); leave it out")
        if self.kind in ("sft", "rm", "ppo"):
            self._rlhf_combinations()
        if self.kind == "classify":
            self._classify_combinations()
        if self.kind == "distill":
            distill_combinations(self)
        if self.eval.shards > 1 and not (m.is_decoder and m.moe is None and self.kind == "pretrain"):
            raise ValueError("eval.shards: sharded evaluation cuts pretrain decoders (gpt2, llama, palm) without "
                             "Switch layers; set eval.shards: 1")
        if self.eval.shards > 1 and self.eval.few_shot is not None:
            raise ValueError("eval.few_shot: few-shot scoring needs the whole model in one task; set eval.shards: 1")
        if self.eval.few_shot is not None and not (m.is_decoder and self.kind in ("pretrain", "sft")):
            raise ValueError("eval.few_shot: few-shot evaluation scores decoders (gpt2, llama, palm) of pretrain "
                             "and sft jobs")
        if "train_batch_size" in self.deepspeed or "train_micro_batch_size_per_gpu" in self.deepspeed:
            raise ValueError("deepspeed: set batch sizes with train.micro_batch and train.grad_accum, "
                             "not in the deepspeed block")
        return self

    def check_model_shape(self) -> None:
        """The model's own invariants (heads divide d_model, ...), checked by building its config (no torch)."""
        from workers.model_config import model_config

        try:
            cfg = model_config(self, vocab_size=512)
        except Exception as err:  # the builder raises its own error type; any refusal is the spec's fault
            raise SpecError(f"model: {str(err).removeprefix('model: ')}") from None
        if self.eval.shards > cfg.n_layers:
            raise SpecError(f"eval.shards: {self.eval.shards} shards for {cfg.n_layers} blocks; use at most one "
                            "shard per block")

    def _rlhf_combinations(self) -> None:
        p, m, d, ppo = self.parallel, self.model, self.rlhf.data, self.rlhf.ppo
        if not m.is_decoder:
            raise ValueError(f"model.family: the {self.kind} stage trains a decoder (gpt2, llama, palm), not {m.family}")
        if p.pp > 1 or m.moe is not None:
            raise ValueError(f"parallel.pp: the {self.kind} stage runs data-parallel dense decoders "
                             "(no pipeline stages, no Switch layers)")
        if self.train.tokens is not None:
            raise ValueError(f"train.tokens: give train.steps for the {self.kind} stage")
        if self.kind in ("rm", "ppo") and not m.init_from:
            raise ValueError(f"model.init_from: the {self.kind} stage starts from the SFT model; give its run "
                             "directory or checkpoint folder")
        if self.kind == "ppo" and not ppo.reward_model:
            raise ValueError("rlhf.ppo.reward_model: give the reward model's run directory or checkpoint folder")
        need = {"sft": ["demonstrations"], "rm": ["comparisons"], "ppo": ["prompts"]}[self.kind]
        if d.builtin is None and any(getattr(d, f) is None for f in need):
            raise ValueError(f"rlhf.data.{need[0]}: the {self.kind} stage needs this file (or rlhf.data.builtin)")
        if self.kind == "ppo":
            why = ppo.share_error(self.resources.workers)
            if why:
                raise ValueError(why)
            if self.train.steps <= ppo.value_warmup:
                raise ValueError(f"train.steps: {self.train.steps} rollouts must exceed rlhf.ppo.value_warmup "
                                 f"({ppo.value_warmup})")

    def _classify_combinations(self) -> None:
        p, m, c = self.parallel, self.model, self.classify
        if p.pp > 1 or m.moe is not None:
            raise ValueError("parallel.pp: classify fine-tunes data-parallel dense models (no pipeline stages, "
                             "no Switch layers)")
        if self.train.tokens is not None:
            raise ValueError("train.tokens: give train.steps for a classify job")
        if c.heldout_file and not c.train_file:
            raise ValueError("classify.heldout_file: give classify.train_file too (the built-in task has its own "
                             "held-out rows)")

    # ------------------------------------------------------------------ derived values, computed here only

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.resources.workers // self.parallel.pp

    @property
    def samples_per_step(self) -> int:
        """Global batch in samples: micro_batch x grad_accum x dp."""
        return self.samples_per_rank * self.dp

    @property
    def samples_per_rank(self) -> int:
        """Samples (or records) each data-parallel rank reads per step: micro_batch x grad_accum."""
        return self.train.micro_batch * self.train.grad_accum

    @property
    def micro_slices(self) -> list[slice]:
        """Where each micro-batch sits in a rank's share of a step (grad_accum slices of micro_batch)."""
        m = self.train.micro_batch
        return [slice(i * m, (i + 1) * m) for i in range(self.train.grad_accum)]

    @property
    def ppo_shares(self) -> PPOShares:
        """Each rank's part of a PPO rollout: sequences, minibatch, prompts per rollout, updates per rollout."""
        return self.rlhf.ppo.shares(self.resources.workers)

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return max(1, math.ceil(self.train.tokens / self.tokens_per_step))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- loading


def _format_error(err: ValidationError, root: type | None = None, see: str = "Job specs") -> str:
    """The first error as one line naming the field; ``root`` (JobSpec by default) names an unknown field's
    neighbours."""
    e = err.errors()[0]
    parts = tuple(x for x in e["loc"] if not str(x).startswith("function-after"))
    loc = ".".join(str(x) for x in parts)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{loc}: {unknown_field(root or JobSpec, parts, see)}"
    if e["type"] == "literal_error":
        return f"{loc}: {msg} (got {e.get('input')!r})"
    if msg.startswith(("train:", "parallel.", "model.", "deepspeed:", "deepspeed.", "train.", "rlhf.", "classify.",
                       "eval.", "distill.")):
        return msg
    got = e.get("input")
    if e["type"] in ("int_type", "float_type", "bool_type", "string_type", "tuple_type", "dict_type",
                     "model_type", "int_from_float"):
        msg = f"{msg}, not {type(got).__name__}"
    suffix = f" (got {got!r})" if got is not None and not isinstance(got, dict) and len(repr(got)) < 60 else ""
    return f"{loc or 'spec'}: {msg}{suffix}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML so numbers and booleans keep their type)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise SpecError(f"--set {item!r}: empty key segment")
    try:
        value = load_plain_yaml(raw, source=f"--set {key.strip()}") if raw.strip() else ""
    except InputError as err:
        if "is not valid YAML" not in str(err):
            raise SpecError(str(err)) from None
        value = raw  # not YAML at all: take it as a string
    return path, value


def apply_overrides(raw: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Set dotted keys in a copy of the raw spec dict."""
    out = json.loads(json.dumps(raw))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else key
        node = out
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise SpecError(f"--set {'.'.join(path)}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    return out


def validate_spec(raw: Any, source: str = "spec", check_model: bool = True) -> JobSpec:
    """Raw data -> JobSpec, or SpecError naming the field. Strict: no strings for numbers, no bools for ints.

    ``check_model`` also builds the model config (heads divide d_model, ...), which needs no torch.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of sections (model, data, train, ...), got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw, strict=True)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_error(err)}") from None
    try:  # what the field types let through: non-finite numbers, integers past 64 bits (in every section)
        check_plain(raw, source)
    except InputError as err:
        raise SpecError(str(err)) from None
    if check_model:
        try:
            spec.check_model_shape()
        except SpecError as err:
            raise SpecError(f"{source}: {err}") from None
    return spec


def read_yaml(path: str) -> Any:
    """A spec, pipeline or sweep file as plain data (specs.validate), or SpecError in one line."""
    try:
        return read_plain_yaml(path, what="spec file")
    except InputError as err:
        raise SpecError(str(err)) from None


def load_spec(path: str, overrides: list[str] | None = None) -> JobSpec:
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections (model, data, train, ...)")
    return validate_spec(apply_overrides(raw, overrides or []), source=path)
