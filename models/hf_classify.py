"""Hugging Face interchange for ``models.classifier.SequenceClassifier``: the ``...ForSequenceClassification`` classes.

The trunk goes through the family's own mapping (``models.hf.to_hf``); then
the language-model heads are dropped and the classification head is added
under the names transformers uses:

| family         | transformers class                 | head                                              |
|----------------|------------------------------------|---------------------------------------------------|
| bert, roberta  | BertForSequenceClassification      | ``bert.pooler.dense`` (our pooler), ``classifier`` |
| albert         | AlbertForSequenceClassification    | ``albert.pooler`` (our pooler), ``classifier``     |
| electra        | ElectraForSequenceClassification   | ``classifier.dense`` (our pooler, GELU), ``classifier.out_proj`` |
| gpt2           | GPT2ForSequenceClassification      | ``score`` (no bias), read at the last non-pad token |
| llama          | LlamaForSequenceClassification     | ``score`` (no bias), read at the last non-pad token |

RoBERTa exports as BERT for the same reason its language model does
(``models/hf.py``). The decoders' classes find each row's last real token
through ``pad_token_id``, which ``save_hf`` writes from the tokenizer; rows
must be right-padded with that id, as Switchyard pads them.
"""
from __future__ import annotations

import torch

CLASSES = {"bert": "BertForSequenceClassification", "roberta": "BertForSequenceClassification",
           "albert": "AlbertForSequenceClassification", "electra": "ElectraForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
           "llama": "LlamaForSequenceClassification"}
_LM_HEADS = ("cls.", "predictions.", "sop_classifier.", "lm_head.", "bert.pooler.", "albert.pooler.",
             "discriminator_predictions.")
"""Keys of the language-model export that a classification folder leaves out (the pooler is replaced)."""


def is_classifier_state(state: dict) -> bool:
    """Whether a state dict is a ``SequenceClassifier``'s (a trunk plus a classification head)."""
    return "classifier.weight" in state and any(k.startswith("trunk.") for k in state)


def classifier_to_hf(cfg, state: dict[str, torch.Tensor], labels, trunk_to_hf) -> tuple[dict, dict]:
    """(config.json dict, HF state dict) of a ``SequenceClassifier``; ``trunk_to_hf`` is ``models.hf.to_hf``."""
    from models.hf import structural_family

    state = {k: v.detach().float().cpu() for k, v in state.items()}
    trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
    config, tensors = trunk_to_hf(cfg, trunk)
    family = structural_family(cfg)
    out = {k: v for k, v in tensors.items() if not k.startswith(_LM_HEADS)}
    if family in ("bert", "roberta"):
        out["bert.pooler.dense.weight"], out["bert.pooler.dense.bias"] = state["pooler.weight"], state["pooler.bias"]
    elif family == "albert":
        out["albert.pooler.weight"], out["albert.pooler.bias"] = state["pooler.weight"], state["pooler.bias"]
    if family == "electra":
        for ours, theirs in (("pooler", "dense"), ("classifier", "out_proj")):
            out[f"classifier.{theirs}.weight"], out[f"classifier.{theirs}.bias"] = (state[f"{ours}.weight"],
                                                                                  state[f"{ours}.bias"])
    elif family in ("gpt2", "llama"):
        out["score.weight"] = state["classifier.weight"]
    else:
        out["classifier.weight"], out["classifier.bias"] = state["classifier.weight"], state["classifier.bias"]
    n = state["classifier.weight"].shape[0]
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} label names for a head of {n} classes")
    config.update(architectures=[CLASSES[family]], id2label={str(i): name for i, name in enumerate(names)},
                  label2id={name: i for i, name in enumerate(names)}, problem_type="single_label_classification",
                  classifier_dropout=None)
    return config, {k: v.contiguous() for k, v in out.items()}
