"""The classify job kind: fine-tuning an encoder (or a decoder) with a classification head on labelled rows.

BERT's second step, on the one training loop (``workers/train_loop.py``):
``model.init_from`` names the pre-training run (or a Hugging Face folder)
whose trunk is fine-tuned; ``models.classifier.SequenceClassifier`` adds the
head. The rows are a user's ``{text[, text_pair], label}`` files or the
built-in docstring-package task (``data/labelled.py``); each rank reads its
share of every step's rows in the order of ``data.sampler.ItemOrder``, so a
resumed job reads what the uninterrupted one would.

Held-out accuracy and macro-F1 come with the final evaluation and with every
checkpoint's evaluation (``evaluate_classify_checkpoint``, called by
``workers/evaluator.py``), next to the chance level: the accuracy of always
answering the held-out set's most common label.

Inputs: encoders read ``[CLS] text [SEP]`` or ``[CLS] text [SEP] pair [SEP]``
with segment ids; decoders ``text [SEP] pair <eos>`` and are scored at the
final token. Rows are cut to ``data.seq_len`` tokens and right-padded.
"""
from __future__ import annotations

import torch

from data.labelled import LabelledRow, chance_level, classify_rows
from data.masking import join_pair
from data.sampler import ItemOrder
from data.shards import load_cached_tokenizer
from models.classifier import SequenceClassifier
from specs.errors import UserError
from workers.checkpoint import CheckpointInfo, CheckpointState
from workers.kind import RankEnv
from workers.metrics import all_sum
from workers.parallel.engine import build_engine
from workers.tasks import build_model, config_from_dict, is_encoder_config, model_config, model_counts
from workers.weights import init_config, load_init_state


# ----------------------------------------------------------------------------- rows, labels, batches


class RowEncoder:
    """Rows -> right-padded batches for the model kind, tokenized once."""

    def __init__(self, tok, seq_len: int, cfg, labels: tuple[str, ...]):
        self.tok, self.T, self.encoder = tok, seq_len, is_encoder_config(cfg)
        self.segments = self.encoder and cfg.type_vocab_size > 0          # RoBERTa has no segment table
        self.label_id = {name: i for i, name in enumerate(labels)}

    def ids(self, row: LabelledRow) -> tuple[list[int], list[int]]:
        """Token ids and segment ids of one row, at most seq_len long."""
        tok = self.tok
        a = tok.encode(row.text)
        b = tok.encode(row.text_pair) if row.text_pair is not None else None
        if self.encoder:
            if b is None:
                ids = [tok.cls_id] + a[:self.T - 2] + [tok.sep_id]
                return ids, [0] * len(ids)
            return join_pair(a, b, tok.cls_id, tok.sep_id, self.T)
        ids = a if b is None else a + [tok.sep_id] + b
        ids = ids[:self.T - 1] + [tok.eos_id]                    # scored at the final token
        return ids, [0] * len(ids)

    def batch(self, encoded: list[tuple[list[int], list[int]]], rows: list[LabelledRow]) -> dict:
        """input_ids, attention_mask, token_type_ids (encoders) (B, L) and labels (B,)."""
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_id
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])                # (B, L)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded])      # (B, L)
        types = torch.tensor([t + [0] * (width - len(t)) for _, t in encoded]) if self.segments else None
        labels = torch.tensor([self.label_id[r.label] for r in rows])                         # (B,)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- held-out measures


def batches_of(rows: list, size: int, rank: int = 0, world: int = 1) -> list[list]:
    """Rank ``rank``'s batches of ``rows``: every world-th batch of ``size``, the same number on every rank
    (ZeRO-3 gathers the weights in each forward, a collective); a rank short of rows gets empty batches."""
    n = -(-len(rows) // (size * world))                                          # batches per rank
    return [rows[(i * world + rank) * size:(i * world + rank + 1) * size] for i in range(n)]


@torch.no_grad()
def confusion_and_loss(model, enc: RowEncoder, batches: list[list[LabelledRow]], device) -> tuple:
    """(confusion matrix (L, L) gold x predicted, summed cross-entropy, rows) of ``batches`` of rows; an
    empty batch runs one forward for the collective and counts nothing."""
    n = len(enc.label_id)
    confusion = torch.zeros(n, n, dtype=torch.float64)
    total, count = 0.0, 0
    filler = next((b[:1] for b in batches if b), [])
    for chunk in batches:
        rows = chunk or filler
        if not rows:
            continue
        b = enc.batch([enc.ids(r) for r in rows], rows)
        b = {k: (v.to(device) if v is not None else None) for k, v in b.items()}
        logits, loss = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["labels"])
        if not chunk:
            continue
        total += float(loss) * len(chunk)
        count += len(chunk)
        confusion.index_put_((b["labels"].cpu(), logits.argmax(-1).cpu()), torch.ones(len(chunk), dtype=torch.float64),
                             accumulate=True)
    return confusion, total, count


def scores(confusion: torch.Tensor, loss_sum: float, count: int) -> dict:
    """Accuracy, macro-F1 (over labels that occur as gold or as a prediction, as scikit-learn) and loss."""
    tp = confusion.diag()
    gold, predicted = confusion.sum(1), confusion.sum(0)
    seen = (gold + predicted) > 0
    f1 = 2 * tp[seen] / (gold[seen] + predicted[seen])
    return {"accuracy": float(tp.sum() / count), "macro_f1": float(f1.mean()), "loss": loss_sum / count}


# ----------------------------------------------------------------------------- the kind


class Classify:
    """One rank's classifier, engine and row order for a classify job."""

    reshards = False
    """ZeRO state is not converted for another number of workers: the job resumes on the workers it had."""

    def __init__(self, env: RankEnv, latest: CheckpointInfo | None, universal: bool):
        spec, storage = env.spec, env.storage
        self.env, self.spec = env, spec
        tok = load_cached_tokenizer(env.ctx.token_cache, storage)
        self.train_rows, self.held, self.labels = classify_rows(spec.classify)
        cfg, init = model_config(spec, tok.padded_vocab_size), None
        if spec.model.init_from:
            cfg, init = init_config(spec, storage, cfg, tok, env.ctx.token_cache)
        torch.manual_seed(spec.train.seed)
        trunk = build_model(cfg)
        if init is not None:
            load_init_state(trunk, init)
        model = SequenceClassifier(trunk, len(self.labels))
        self.enc = RowEncoder(tok, min(spec.data.seq_len, cfg.seq_len), cfg, self.labels)
        self.encoded = [self.enc.ids(r) for r in self.train_rows]
        if env.rank == 0:
            storage.write_json(f"{env.run_dir}/model_config.json",
                               {"model": cfg.to_dict(), "family": spec.model.family, "head": "classify",
                                "kind": "encoder" if is_encoder_config(cfg) else "decoder",
                                "labels": list(self.labels), **model_counts(cfg, spec.data.seq_len)})
        self.engine = build_engine(model, spec)
        self.others: dict = {}
        self.order = ItemOrder(len(self.train_rows), spec.train.seed)
        self.per_step = spec.samples_per_step
        self.tokens_per_step: int | None = None
        self.n_params = sum(p.numel() for p in model.parameters())

    def step(self, step: int, position: int) -> dict:
        env, engine = self.env, self.engine
        idx = self.order.rank_indices(position, self.per_step, env.rank, env.world)
        losses, right = [], 0
        for s in self.spec.micro_slices:
            b = self.enc.batch([self.encoded[i] for i in idx[s]], [self.train_rows[i] for i in idx[s]])
            b = {k: (v.to(env.device) if v is not None else None) for k, v in b.items()}
            logits, loss = engine(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["labels"])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            right += int((logits.argmax(-1) == b["labels"]).sum())
        return {"loss": sum(losses) / len(losses), "accuracy": right / len(idx)}

    def log_fields(self, position: int, seconds: float) -> dict:
        return {"records": position, "epoch": position / len(self.train_rows), "step_seconds": seconds}

    def evaluate(self) -> dict:
        """Collective: held-out loss, accuracy and macro-F1 (ranks split the rows), and the chance level."""
        env = self.env
        self.engine.eval()
        batches = batches_of(self.held, self.spec.train.micro_batch, env.rank, env.world)
        confusion, loss, count = confusion_and_loss(self.engine, self.enc, batches, env.device)
        self.engine.train()
        summed = all_sum([*confusion.flatten().tolist(), loss, count])
        n = len(self.labels)
        s = scores(torch.tensor(summed[:n * n], dtype=torch.float64).view(n, n), summed[-2], int(summed[-1]))
        return {"held_out_loss": s["loss"], "held_out_accuracy": s["accuracy"], "held_out_macro_f1": s["macro_f1"],
                "chance": chance_level(self.held), "n_labels": n}

    def checkpoint_state(self, step: int) -> CheckpointState:
        return CheckpointState(manifest={"labels": list(self.labels)})

    def restore(self, latest: CheckpointInfo) -> None:
        """The label set must be the one the checkpoint was trained with (class ids index the head)."""
        if latest.manifest.get("labels") != list(self.labels):
            raise UserError(f"classify.labels: the checkpoint was trained with labels {latest.manifest.get('labels')}, "
                            f"this spec gives {list(self.labels)}")


def load_classifier(storage, run_dir: str, ckpt_path: str) -> tuple[SequenceClassifier, dict]:
    """A classify run's checkpoint as a ``SequenceClassifier`` in eval mode, with its model_config.json."""
    from workers.checkpoint import load_consolidated
    from workers.weights import load_state

    info = storage.read_json(f"{run_dir}/model_config.json")
    model = SequenceClassifier(build_model(config_from_dict(info["family"], info["model"])), len(info["labels"]))
    load_state(model, load_consolidated(storage, ckpt_path), f"checkpoint {ckpt_path}")
    return model.eval(), info


def evaluate_classify_checkpoint(storage, spec, run_dir: str, ckpt_path: str, step: int) -> dict:
    """One checkpoint of a classify run on its held-out rows: loss, with accuracy, macro-F1 and chance as extras."""
    from workers.weights import run_tokenizer

    model, info = load_classifier(storage, run_dir, ckpt_path)
    _, held, _ = classify_rows(spec.classify)
    enc = RowEncoder(run_tokenizer(storage, run_dir), min(spec.data.seq_len, model.trunk.cfg.seq_len),
                     model.trunk.cfg, tuple(info["labels"]))
    s = scores(*confusion_and_loss(model, enc, batches_of(held, spec.train.micro_batch), torch.device("cpu")))
    return {"checkpoint": ckpt_path, "step": step, "loss": s["loss"], "perplexity": None, "tokens": 0,
            "extra": {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "chance": chance_level(held)}}
