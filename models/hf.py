"""Hugging Face interchange: our models' weights to and from transformers' checkpoint layout.

Plain tensors and dicts, single-device; transformers itself is not needed
(config.json is written as the dict its config classes read). Which class
loads an exported folder:

| family  | transformers class                      | what the mapping does                                   |
|---------|-----------------------------------------|---------------------------------------------------------|
| llama   | LlamaForCausalLM                        | names only: RoPE rotates halves and GQA groups heads as HF does |
| gpt2    | GPT2LMHeadModel                         | Conv1D stores (in, out): every matrix transposed; q, k, v fused into c_attn |
| bert    | BertForPreTraining (or BertForMaskedLM) | names; the MLM decoder is the word table (tied)         |
| roberta | BertForMaskedLM                         | no segment table: one all-zero row (type_vocab_size=1). Not RobertaForMaskedLM: it offsets positions by padding_idx + 1 |
| albert  | AlbertForPreTraining (or AlbertForMaskedLM) | factorized embedding, shared layer = one layer group |
| electra | ElectraForPreTraining                   | the discriminator: shared embeddings, its blocks, RTD head; imported, the generator starts fresh (``models/hf_electra.py``) |
| palm    | refused                                 | the parallel attention + MLP block has no HF class      |

Switch (MoE) layers are refused both ways: no HF class routes top-1 with a
capacity and scales by the router probability (Mixtral renormalises its top-k).

Import reads ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)
only: no pickle, no code from the folder. config.json values HF left out
because they equal the class defaults are filled from ``HF_DEFAULTS``.
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import torch

from models.encoder import EncoderConfig
from models.transformer import DecoderConfig

HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
              "roberta": "BertForMaskedLM", "albert": "AlbertForMaskedLM", "electra": "ElectraForPreTraining"}

# transformers writes config.json as a diff against these class defaults (transformers 4.x and 5.x).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
                  mlp_bias=False, initializer_range=0.02),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                 initializer_range=0.02, scale_attn_by_inverse_layer_idx=False),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, initializer_range=0.02, hidden_dropout_prob=0.1),
    "albert": dict(vocab_size=30000, embedding_size=128, hidden_size=4096, num_hidden_layers=12,
                   num_hidden_groups=1, num_attention_heads=64, intermediate_size=16384, inner_group_num=1,
                   hidden_act="gelu_new", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                   initializer_range=0.02, hidden_dropout_prob=0.0),
}


class HFError(ValueError):
    """A model with no Hugging Face counterpart, or a folder this module cannot read: one line for people."""


# ----------------------------------------------------------------------------- which family


def structural_family(cfg) -> str:
    """The family a config's structure matches: llama | gpt2 | palm | bert | roberta | albert | electra."""
    from models.electra import ElectraConfig
    from models.hf_seq2seq import family_of

    if family_of(cfg) is not None:
        return family_of(cfg)
    if isinstance(cfg, ElectraConfig):
        return "electra"
    if isinstance(cfg, EncoderConfig):
        if cfg.share_layers or cfg.emb_dim != cfg.d_model:
            return "albert"
        return "roberta" if cfg.type_vocab_size == 0 else "bert"
    if cfg.parallel_block:
        return "palm"
    if (cfg.norm, cfg.mlp, cfg.pos, cfg.bias) == ("layernorm", "gelu", "learned", True):
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.pos, cfg.bias) == ("rmsnorm", "swiglu", "rope", False):
        return "llama"
    raise HFError(f"a decoder with norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}, bias={cfg.bias} matches "
                  "neither LLaMA (rmsnorm, swiglu, rope, no bias) nor GPT-2 (layernorm, gelu, learned, bias)")


def hf_class(cfg) -> str:
    """The transformers class for the language-model head of ``cfg`` (config.json names the
    *ForPreTraining class when there is an NSP/SOP head too), or HFError saying why there is none."""
    family = structural_family(cfg)
    if family in ("t5", "bart"):
        from models.hf_seq2seq import hf_class as seq2seq_class

        return seq2seq_class(cfg)
    if cfg.moe is not None:
        raise HFError("Switch (MoE) layers have no Hugging Face class (top-1 routing with capacity and "
                      "probability scaling); export a dense model")
    if family == "palm":
        raise HFError("palm's parallel attention + MLP block has no Hugging Face class; "
                      "export llama or gpt2 models")
    if family == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise HFError(f"GPT2LMHeadModel has no grouped-query attention (n_kv_heads={cfg.kv_heads}, "
                      f"n_heads={cfg.n_heads})")
    return HF_CLASSES[family]


# ----------------------------------------------------------------------------- ours -> HF


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def _llama_to_hf(cfg: DecoderConfig, sd: dict) -> tuple[dict, dict]:
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.o_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = sd[f"blocks.{i}.{ours}.weight"]
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
                  hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                  hidden_act="silu", max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
                  attention_dropout=0.0, initializer_range=cfg.init_std,
                  rope_theta=cfg.rope_theta,                                   # transformers 4.x
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})   # 5.x
    return config, out


def _gpt2_to_hf(cfg: DecoderConfig, sd: dict) -> tuple[dict, dict]:
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        # Conv1D computes x @ W + b with W (in, out): our Linear weights (out, in), transposed; q, k, v side by side.
        out[h + "attn.c_attn.weight"] = _t(torch.cat([sd[p + f"attn.{n}_proj.weight"] for n in "qkv"]))  # (d, 3d)
        out[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{n}_proj.bias"] for n in "qkv"])          # (3d,)
        out[h + "attn.c_proj.weight"] = _t(sd[p + "attn.o_proj.weight"])
        out[h + "attn.c_proj.bias"] = sd[p + "attn.o_proj.bias"]
        out[h + "mlp.c_fc.weight"] = _t(sd[p + "mlp.up.weight"])                                          # (d, ff)
        out[h + "mlp.c_fc.bias"] = sd[p + "mlp.up.bias"]
        out[h + "mlp.c_proj.weight"] = _t(sd[p + "mlp.down.weight"])                                      # (ff, d)
        out[h + "mlp.c_proj.bias"] = sd[p + "mlp.down.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + f"{theirs}.weight"] = sd[p + f"{ours}.weight"]
            out[h + f"{theirs}.bias"] = sd[p + f"{ours}.bias"]
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                  n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                  n_inner=cfg.ff_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                  resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    return config, out


def _linear(out: dict, sd: dict, theirs: str, ours: str) -> None:
    out[f"{theirs}.weight"] = sd[f"{ours}.weight"]
    out[f"{theirs}.bias"] = sd[f"{ours}.bias"]


def _embeddings_to_hf(cfg: EncoderConfig, sd: dict, root: str) -> dict:
    out = {f"{root}.embeddings.word_embeddings.weight": sd["embeddings.word.weight"],
           f"{root}.embeddings.position_embeddings.weight": sd["embeddings.position.weight"]}
    if cfg.type_vocab_size:
        out[f"{root}.embeddings.token_type_embeddings.weight"] = sd["embeddings.token_type.weight"]
    else:  # RoBERTa style: HF always adds a segment embedding; one zero row adds nothing
        out[f"{root}.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.emb_dim)
    _linear(out, sd, f"{root}.embeddings.LayerNorm", "embeddings.norm")
    return out


def _encoder_config(cfg: EncoderConfig, model_type: str, arch: str) -> dict:
    return dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                hidden_act="gelu", max_position_embeddings=cfg.seq_len, type_vocab_size=max(1, cfg.type_vocab_size),
                layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout, initializer_range=cfg.init_std, tie_word_embeddings=True)


def _bert_to_hf(cfg: EncoderConfig, sd: dict) -> tuple[dict, dict]:
    out = _embeddings_to_hf(cfg, sd, "bert")
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for ours, theirs in (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                             ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                             ("norm1", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
                             ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm")):
            _linear(out, sd, h + theirs, p + ours)
    _linear(out, sd, "cls.predictions.transform.dense", "mlm_head.dense")
    _linear(out, sd, "cls.predictions.transform.LayerNorm", "mlm_head.norm")
    out["cls.predictions.bias"] = sd["mlm_head.bias"]                  # the decoder's weight is the word table
    arch = "BertForMaskedLM"
    if cfg.nsp:
        _linear(out, sd, "bert.pooler.dense", "nsp_head.pooler")
        _linear(out, sd, "cls.seq_relationship", "nsp_head.classifier")
        arch = "BertForPreTraining"
    return _encoder_config(cfg, "bert", arch), out


def _albert_to_hf(cfg: EncoderConfig, sd: dict) -> tuple[dict, dict]:
    out = _embeddings_to_hf(cfg, sd, "albert")
    if cfg.emb_dim != cfg.d_model:
        _linear(out, sd, "albert.encoder.embedding_hidden_mapping_in", "embeddings.project")
    else:  # ALBERT always projects E -> d: an identity keeps a non-factorized model's function
        out["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(cfg.d_model)
        out["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(cfg.d_model)
    for g in range(cfg.n_blocks):                                      # one layer group per distinct block
        p, h = f"blocks.{g}.", f"albert.encoder.albert_layer_groups.{g}.albert_layers.0."
        for ours, theirs in (("attn.q_proj", "attention.query"), ("attn.k_proj", "attention.key"),
                             ("attn.v_proj", "attention.value"), ("attn.o_proj", "attention.dense"),
                             ("norm1", "attention.LayerNorm"), ("mlp.up", "ffn"), ("mlp.down", "ffn_output"),
                             ("norm2", "full_layer_layer_norm")):
            _linear(out, sd, h + theirs, p + ours)
    _linear(out, sd, "predictions.dense", "mlm_head.dense")
    _linear(out, sd, "predictions.LayerNorm", "mlm_head.norm")
    out["predictions.bias"] = sd["mlm_head.bias"]
    arch = "AlbertForMaskedLM"
    if cfg.nsp:
        _linear(out, sd, "albert.pooler", "nsp_head.pooler")
        _linear(out, sd, "sop_classifier.classifier", "nsp_head.classifier")
        arch = "AlbertForPreTraining"
    config = _encoder_config(cfg, "albert", arch)
    config.update(embedding_size=cfg.emb_dim, num_hidden_groups=cfg.n_blocks, inner_group_num=1,
                  classifier_dropout_prob=cfg.dropout)
    return config, out


def to_hf(cfg, state: dict[str, torch.Tensor], labels=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our config and state dict -> (config.json dict, HF state dict), or HFError.

    A ``SequenceClassifier``'s state (``labels``: its class names) maps to ``...ForSequenceClassification``."""
    hf_class(cfg)                                                      # refuses what has no HF class
    from models.hf_classify import classifier_to_hf, is_classifier_state

    if is_classifier_state(state):
        return classifier_to_hf(cfg, state, labels, to_hf)
    sd = {k: v.detach().float().cpu() for k, v in state.items()}
    from models.hf_electra import electra_to_hf
    from models.hf_seq2seq import to_hf as seq2seq_to_hf

    convert = {"llama": _llama_to_hf, "gpt2": _gpt2_to_hf, "bert": _bert_to_hf, "roberta": _bert_to_hf,
               "albert": _albert_to_hf, "electra": electra_to_hf, "t5": seq2seq_to_hf,
               "bart": seq2seq_to_hf}[structural_family(cfg)]
    config, out = convert(cfg, sd)
    config["dtype"] = config["torch_dtype"] = "float32"
    config["switchyard_family"] = structural_family(cfg)
    return config, {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- HF -> ours


def _strip(sd: dict, prefix: str) -> dict:
    """Accept checkpoints saved from the base model (no ``prefix.``) as well as from the head model."""
    if any(k.startswith(prefix + ".") for k in sd):
        return sd
    return {(k if k.startswith(("lm_head.", "cls.", "predictions.", "sop_classifier.")) else f"{prefix}.{k}"): v
            for k, v in sd.items()}


def _need(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise HFError(f"{what}: the weights have no {key}")
    return sd[key]


def _llama_from_hf(c: dict, sd: dict) -> tuple[DecoderConfig, dict]:
    if c["hidden_act"] != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
        raise HFError("llama: only silu MLPs without attention or MLP biases map onto our LLaMA")
    rope = c.get("rope_parameters") or {}
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise HFError(f"llama: rope scaling ({rope.get('rope_type') or c.get('rope_scaling')}) is not supported")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise HFError(f"llama: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
    sd = _strip(sd, "model")
    tie = bool(c["tie_word_embeddings"])
    if not tie and "lm_head.weight" not in sd:
        raise HFError("llama: no lm_head.weight and tie_word_embeddings is false (a base LlamaModel?); "
                      "save the LlamaForCausalLM")
    cfg = DecoderConfig(vocab_size=c["vocab_size"], seq_len=c["max_position_embeddings"], d_model=c["hidden_size"],
                        n_layers=c["num_hidden_layers"], n_heads=heads,
                        n_kv_heads=c.get("num_key_value_heads") or heads, d_ff=c["intermediate_size"],
                        norm="rmsnorm", mlp="swiglu", pos="rope", parallel_block=False, bias=False,
                        tie_embeddings=tie, dropout=0.0, rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
                        norm_eps=c["rms_norm_eps"], init_std=c["initializer_range"])
    out = {"tok_emb.weight": _need(sd, "model.embed_tokens.weight", "llama"),
           "norm_f.weight": _need(sd, "model.norm.weight", "llama")}
    out["lm_head.weight"] = out["tok_emb.weight"] if tie else sd["lm_head.weight"]
    names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
             "attn.o_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            out[f"blocks.{i}.{ours}.weight"] = _need(sd, f"model.layers.{i}.{theirs}.weight", "llama")
    return cfg, out


def _gpt2_from_hf(c: dict, sd: dict) -> tuple[DecoderConfig, dict]:
    if c["activation_function"] not in ("gelu_new", "gelu_pytorch_tanh") or c["scale_attn_by_inverse_layer_idx"]:
        raise HFError(f"gpt2: activation {c['activation_function']} or per-layer attention scaling is not supported")
    sd = _strip(sd, "transformer")
    d = c["n_embd"]
    tie = bool(c["tie_word_embeddings"])
    if not tie and "lm_head.weight" not in sd:
        raise HFError("gpt2: no lm_head.weight and tie_word_embeddings is false; save the GPT2LMHeadModel")
    cfg = DecoderConfig(vocab_size=c["vocab_size"], seq_len=c["n_positions"], d_model=d, n_layers=c["n_layer"],
                        n_heads=c["n_head"], d_ff=c["n_inner"] or 4 * d, norm="layernorm", mlp="gelu",
                        pos="learned", parallel_block=False, bias=True, tie_embeddings=tie, dropout=0.0,
                        norm_eps=c["layer_norm_epsilon"], init_std=c["initializer_range"])
    out = {"tok_emb.weight": _need(sd, "transformer.wte.weight", "gpt2"),
           "pos_emb.weight": _need(sd, "transformer.wpe.weight", "gpt2"),
           "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    out["lm_head.weight"] = out["tok_emb.weight"] if tie else sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        w = _t(_need(sd, h + "attn.c_attn.weight", "gpt2"))                                            # (3d, d)
        b = sd[h + "attn.c_attn.bias"]
        for j, n in enumerate("qkv"):
            out[p + f"attn.{n}_proj.weight"] = w[j * d:(j + 1) * d].contiguous()
            out[p + f"attn.{n}_proj.bias"] = b[j * d:(j + 1) * d].contiguous()
        out[p + "attn.o_proj.weight"] = _t(sd[h + "attn.c_proj.weight"])
        out[p + "attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
        out[p + "mlp.up.weight"] = _t(sd[h + "mlp.c_fc.weight"])
        out[p + "mlp.up.bias"] = sd[h + "mlp.c_fc.bias"]
        out[p + "mlp.down.weight"] = _t(sd[h + "mlp.c_proj.weight"])
        out[p + "mlp.down.bias"] = sd[h + "mlp.c_proj.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[p + f"{ours}.weight"] = sd[h + f"{theirs}.weight"]
            out[p + f"{ours}.bias"] = sd[h + f"{theirs}.bias"]
    return cfg, out


def _unlinear(out: dict, sd: dict, ours: str, theirs: str, what: str) -> None:
    out[f"{ours}.weight"] = _need(sd, f"{theirs}.weight", what)
    out[f"{ours}.bias"] = _need(sd, f"{theirs}.bias", what)


def _encoder_from_hf(c: dict, sd: dict, model_type: str) -> tuple[str, EncoderConfig, dict]:
    if c["hidden_act"] not in ("gelu", "gelu_python"):
        raise HFError(f"{model_type}: hidden_act {c['hidden_act']} is not supported (our encoders use exact gelu)")
    root = model_type
    sd = _strip(sd, root)
    if model_type == "albert":
        if c["inner_group_num"] != 1 or c["num_hidden_groups"] not in (1, c["num_hidden_layers"]):
            raise HFError("albert: only one layer per group and 1 or num_hidden_layers groups are supported")
        head, mlm, pool, cls = "predictions", "predictions", f"{root}.pooler", "sop_classifier.classifier"
    else:
        head, mlm, pool, cls = "cls.predictions", "cls.predictions.transform", f"{root}.pooler.dense", \
            "cls.seq_relationship"
    if f"{mlm}.dense.weight" not in sd:
        raise HFError(f"{model_type}: the folder has no masked-LM head ({mlm}); save it from a *ForMaskedLM or "
                      "*ForPreTraining model")
    types = c["type_vocab_size"]
    type_table = _need(sd, f"{root}.embeddings.token_type_embeddings.weight", model_type)
    if c.get("switchyard_family") == "roberta" and types == 1 and not type_table.any():
        types = 0                                                      # our RoBERTa export's zero row
    nsp = f"{cls}.weight" in sd
    shared = model_type == "albert" and c["num_hidden_groups"] == 1
    E = c.get("embedding_size", c["hidden_size"]) if model_type == "albert" else c["hidden_size"]
    cfg = EncoderConfig(vocab_size=c["vocab_size"], seq_len=c["max_position_embeddings"], d_model=c["hidden_size"],
                        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                        d_ff=c["intermediate_size"], type_vocab_size=types, nsp=nsp,
                        embedding_dim=E if E != c["hidden_size"] else None, share_layers=shared,
                        dropout=0.0, norm_eps=c["layer_norm_eps"], init_std=c["initializer_range"])
    out = {"embeddings.word.weight": _need(sd, f"{root}.embeddings.word_embeddings.weight", model_type),
           "embeddings.position.weight": _need(sd, f"{root}.embeddings.position_embeddings.weight", model_type)}
    if types:
        out["embeddings.token_type.weight"] = type_table
    _unlinear(out, sd, "embeddings.norm", f"{root}.embeddings.LayerNorm", model_type)
    if model_type == "albert":
        mapping = f"{root}.encoder.embedding_hidden_mapping_in"
        if cfg.emb_dim != cfg.d_model:
            _unlinear(out, sd, "embeddings.project", mapping, model_type)
        elif not (torch.equal(sd[f"{mapping}.weight"], torch.eye(cfg.d_model)) and not sd[f"{mapping}.bias"].any()):
            raise HFError("albert: embedding_size == hidden_size with a non-identity projection is not supported")
        layers = ((f"blocks.{g}.", f"{root}.encoder.albert_layer_groups.{g}.albert_layers.0.")
                  for g in range(cfg.n_blocks))
        names = (("attn.q_proj", "attention.query"), ("attn.k_proj", "attention.key"),
                 ("attn.v_proj", "attention.value"), ("attn.o_proj", "attention.dense"),
                 ("norm1", "attention.LayerNorm"), ("mlp.up", "ffn"), ("mlp.down", "ffn_output"),
                 ("norm2", "full_layer_layer_norm"))
    else:
        layers = ((f"blocks.{i}.", f"{root}.encoder.layer.{i}.") for i in range(cfg.n_blocks))
        names = (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                 ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                 ("norm1", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
                 ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm"))
    for p, h in layers:
        for ours, theirs in names:
            _unlinear(out, sd, p + ours, h + theirs, model_type)
    _unlinear(out, sd, "mlm_head.dense", f"{mlm}.dense", model_type)
    _unlinear(out, sd, "mlm_head.norm", f"{mlm}.LayerNorm", model_type)
    bias = sd.get(f"{head}.bias", sd.get(f"{head}.decoder.bias"))
    out["mlm_head.bias"] = bias if bias is not None else torch.zeros(cfg.vocab_size)
    if nsp:
        _unlinear(out, sd, "nsp_head.pooler", pool, model_type)
        _unlinear(out, sd, "nsp_head.classifier", cls, model_type)
    family = "albert" if model_type == "albert" else ("roberta" if types == 0 else "bert")
    return family, cfg, out


def from_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[str, Any, dict[str, torch.Tensor]]:
    """(config.json dict, HF state dict) -> (family, our config, our state dict), or HFError."""
    model_type = config.get("model_type")
    if model_type in ("t5", "bart"):
        from models.hf_seq2seq import from_hf as seq2seq_from_hf

        return seq2seq_from_hf(model_type, config, {k: v.float() for k, v in state.items()})
    if model_type == "electra":
        from models.hf_electra import electra_from_hf

        return ("electra", *electra_from_hf(config, {k: v.float() for k, v in state.items()}))
    if model_type not in HF_DEFAULTS:
        raise HFError(f"model_type {model_type!r} has no Switchyard model; llama, gpt2, bert, albert, electra, "
                      "t5 and bart do")
    c = {**HF_DEFAULTS[model_type], **config}
    sd = {k: v.float() for k, v in state.items()}
    if model_type == "llama":
        return ("llama", *_llama_from_hf(c, sd))
    if model_type == "gpt2":
        return ("gpt2", *_gpt2_from_hf(c, sd))
    return _encoder_from_hf(c, sd, model_type)


# ----------------------------------------------------------------------------- folders


def special_token_ids(tokenizer_json: str) -> dict[str, int]:
    """HF config ids for our special tokens, from a tokenizer.json's text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    ids = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|endoftext|>", "pad_token_id": "<|pad|>"}
    return {k: tok.token_to_id(v) for k, v in ids.items() if tok.token_to_id(v) is not None}


def save_hf(folder: str, cfg, state: dict[str, torch.Tensor], files: dict[str, str] | None = None,
            labels=None) -> str:
    """Write a transformers folder (local path): config.json, model.safetensors and ``files`` (name -> text,
    e.g. tokenizer.json); ``labels``: a classifier's class names. Returns the architecture config.json names."""
    import os

    from safetensors.torch import save_file

    config, tensors = to_hf(cfg, state, labels)
    cls = config["architectures"][0]
    files = dict(files or {})
    if "tokenizer.json" in files:
        config.update(special_token_ids(files["tokenizer.json"]))
        from models.hf_seq2seq import decoder_start

        config.update(decoder_start(config))
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return cls


SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.safetensors$")
"""A shard a model.safetensors.index.json may name: one plain file name in the index's own folder."""


def _index_shards(index: str, fs) -> list[str]:
    """The shard file names of a sharded checkpoint's index; HFError unless each stays inside its folder."""
    try:
        with fs.open(index, "r") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise HFError(f"{index}: not a safetensors index (a JSON object with a weight_map): {err}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFError(f"{index}: weight_map must be a non-empty mapping of tensor names to shard files")
    shards = set()
    for tensor, name in weight_map.items():
        # No separators, no '..', no absolute paths, no URIs: a shard is a file next to the index.
        if not isinstance(name, str) or not SHARD_NAME_RE.match(name) or ".." in name:
            raise HFError(f"{index}: weight_map[{str(tensor)[:80]!r}] names {str(name)[:80]!r}; a shard must be a "
                          "plain *.safetensors file name in the index's own folder")
        shards.add(name)
    return sorted(shards)


def _read_weights(folder: str, fs) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_bytes

    def read(name: str) -> dict[str, torch.Tensor]:
        with fs.open(posixpath.join(folder, name), "rb") as f:
            return load_bytes(f.read())

    if fs.exists(posixpath.join(folder, "model.safetensors")):
        return read("model.safetensors")
    index = posixpath.join(folder, "model.safetensors.index.json")
    if fs.exists(index):
        shards = _index_shards(index, fs)
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read(shard))
        return out
    raise HFError(f"{folder}: no model.safetensors (only safetensors weights are read; "
                  "re-save with save_pretrained(..., safe_serialization=True))")


def import_hf_family(folder: str, fs=None) -> tuple[str, Any, dict[str, torch.Tensor]]:
    """A transformers folder (any fsspec filesystem ``fs``; default local) -> (family, config, state dict)."""
    if fs is None:
        import fsspec

        fs = fsspec.filesystem("file")
    cfg_path = posixpath.join(folder, "config.json")
    if not fs.exists(cfg_path):
        raise HFError(f"{folder}: no config.json (not a Hugging Face model folder)")
    with fs.open(cfg_path, "r") as f:
        config = json.load(f)
    return from_hf(config, _read_weights(folder, fs))


def fresh_on_import(family: str) -> tuple[str, ...]:
    """Prefixes of our parameters a Hugging Face folder of ``family`` has no weights for (ELECTRA's generator):
    loading leaves them as the built model initialised them."""
    if family == "electra":
        from models.hf_electra import FRESH_ON_IMPORT

        return FRESH_ON_IMPORT
    return ()


def import_hf(folder: str, fs=None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A transformers folder -> (DecoderConfig | EncoderConfig, state dict that loads into Decoder | Encoder)."""
    _, cfg, state = import_hf_family(folder, fs)
    return cfg, state
