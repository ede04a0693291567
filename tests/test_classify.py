"""Classification fine-tuning (kind: classify): labelled files, the built-in task, the HF round trip, and a
2-rank job that learns, evaluates its checkpoints and resumes exactly."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data.labelled import BUILTIN_PACKAGES, builtin_task, chance_level, classify_rows, held_out, read_labelled
from data.tokenizer import byte_tokenizer
from models.classifier import SequenceClassifier
from models.electra import Electra, electra_config
from models.encoder import Encoder, encoder_config
from models.transformer import Decoder, decoder_config
from specs.errors import UsageError
from workers.classify import RowEncoder, batches_of, scores

TOK = byte_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_label_files_are_checked_row_by_row(tmp_path):
    good = _write(tmp_path / "ok.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "text_pair": "c", "label": 3}])
    rows = read_labelled(good)
    assert [(r.text, r.text_pair, r.label) for r in rows] == [("a", None, "x"), ("b", "c", "3")]
    cases = {
        "no_label.jsonl": ([{"text": "a"}], r"row 1: field 'label': missing"),
        "no_text.jsonl": ([{"label": "x"}], r"row 1: field 'text': missing"),
        "empty_text.jsonl": ([{"text": " ", "label": "x"}], r"row 1: field 'text': empty"),
        "float_label.jsonl": ([{"text": "a", "label": 1.5}], r"field 'label': expected a string or an integer"),
        "unknown.jsonl": ([{"text": "a", "label": "x"}, {"text": "b", "label": "z"}],
                          r"row 2: field 'label': 'z' is not one of classify.labels \['x', 'y'\]"),
        "empty.jsonl": ([], r"no rows"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            read_labelled(_write(tmp_path / name, content), labels=("x", "y"))


def test_bad_label_files_stop_run_and_submit_in_one_line(tmp_path, capsys):
    """Through the CLI: exit code 2, one line naming the file, row and field, nothing written, no Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_bad_input import Sandbox, refused

    box = Sandbox(tmp_path)
    pq.write_table(pa.table({"text": ["a", "b"], "lable": ["x", "y"]}), str(tmp_path / "rows.parquet"))
    spec = tmp_path / "classify.yaml"
    spec.write_text(f"kind: classify\nmodel: {{family: bert}}\nclassify: {{train_file: {tmp_path / 'rows.parquet'}}}\n")
    for command in ("run", "submit"):
        line = refused(box, capsys, [command, str(spec)], "rows.parquet: row 1: field 'label': missing")
        assert "{text, label}" in line


def test_classify_spec_errors_are_one_line(tmp_path):
    from tests.conftest import tiny_spec

    train = _write(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)])
    held = _write(tmp_path / "held.jsonl", [{"text": "h", "label": "c"}])
    spec = tiny_spec(kind="classify", **{"model.family": "bert", "classify.train_file": train,
                                         "classify.heldout_file": held})
    with pytest.raises(UsageError, match=r"held.jsonl: labels \['c'\] never occur in the training rows"):
        classify_rows(spec.classify)
    with pytest.raises(UsageError, match="classify.heldout_file: give classify.train_file too"):
        tiny_spec(kind="classify", **{"classify.heldout_file": held})
    with pytest.raises(UsageError, match="eval.few_shot: few-shot evaluation scores decoders"):
        tiny_spec(kind="classify", **{"model.family": "bert", "eval.few_shot": {"k": [0, 1]}})


def test_builtin_task_is_deterministic_disjoint_and_near_balanced():
    train, held = builtin_task(BUILTIN_PACKAGES[:4], per_label=60, heldout_percent=10)
    again = builtin_task(BUILTIN_PACKAGES[:4], per_label=60, heldout_percent=10)
    assert (train, held) == again
    assert not {r.text for r in train} & {r.text for r in held}
    assert all(held_out(r.text, 10) for r in held) and not any(held_out(r.text, 10) for r in train)
    assert {r.label for r in train} == set(BUILTIN_PACKAGES[:4])
    assert len(train) + len(held) == 4 * 60
    assert chance_level(train + held) == pytest.approx(0.25)


def test_scores_are_accuracy_and_macro_f1():
    # gold x predicted: class 0: 3 right, 1 called 1; class 1: 2 right; class 2 never occurs nor is predicted.
    confusion = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s = scores(confusion, loss_sum=6.0, count=6)
    f1_0, f1_1 = 2 * 3 / (4 + 3), 2 * 2 / (2 + 3)
    assert s == pytest.approx({"accuracy": 5 / 6, "macro_f1": (f1_0 + f1_1) / 2, "loss": 1.0})


def test_held_out_batches_are_as_many_on_every_rank():
    rows = list(range(17))                                        # 17 rows, batches of 4, 3 ranks
    shares = [batches_of(rows, 4, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]                  # ZeRO-3: as many forwards on every rank
    assert sorted(r for s in shares for b in s for r in b) == rows
    assert shares[2][1] == [] and shares[1][1] == [16]
    assert batches_of(rows, 4) == [rows[i:i + 4] for i in range(0, 17, 4)]


def _classifier(family: str) -> SequenceClassifier:
    torch.manual_seed(0)
    if family == "electra":
        trunk = Electra(electra_config("tiny", vocab_size=TOK.padded_vocab_size, seq_len=32, dropout=0.0))
    elif family in ("bert", "roberta", "albert"):
        trunk = Encoder(encoder_config(family, "tiny", vocab_size=TOK.padded_vocab_size, seq_len=32, dropout=0.0))
    else:
        trunk = Decoder(decoder_config(family, "tiny", vocab_size=TOK.padded_vocab_size, seq_len=32))
    model = SequenceClassifier(trunk, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():                            # every weight perturbed: a swapped tensor shows
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "albert", "electra", "gpt2", "llama"])
def test_hf_round_trip_gives_equal_logits(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from models.hf import save_hf

    model = _classifier(family)
    TOK.save(str(tmp_path / "tok"))
    files = {n: (tmp_path / "tok" / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    labels = ("neg", "neu", "pos")
    cls = save_hf(str(tmp_path / "hf"), model.trunk.cfg, model.state_dict(), files, labels=labels)
    assert cls == {"bert": "BertForSequenceClassification", "roberta": "BertForSequenceClassification",
                   "albert": "AlbertForSequenceClassification", "electra": "ElectraForSequenceClassification",
                   "gpt2": "GPT2ForSequenceClassification",
                   "llama": "LlamaForSequenceClassification"}[family]
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert theirs.config.id2label == dict(enumerate(labels))
    enc = RowEncoder(TOK, 32, model.trunk.cfg, labels)
    from data.labelled import LabelledRow

    rows = [LabelledRow("a short one", None, "neg"), LabelledRow("a longer text than the first", "pair", "pos")]
    b = enc.batch([enc.ids(r) for r in rows], rows)
    assert b["attention_mask"][0].sum() < b["attention_mask"][1].sum()          # right padding in row 0
    ours, _ = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    kwargs = {"token_type_ids": b["token_type_ids"]} if enc.segments else {}
    with torch.no_grad():
        got = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kwargs).logits
    torch.testing.assert_close(got, ours.detach(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- a real job on 2 ranks

PACKAGES = list(BUILTIN_PACKAGES[:4])
BPE = {"data.tokenizer": "bpe", "data.vocab_size": 1024, "model.family": "bert"}


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.ray
def test_classify_job_learns_evaluates_exports_and_resumes(ray_cluster, tmp_path):
    """One BERT pretrain run, then classify from it on the built-in task: the loss falls, held-out accuracy is
    well above chance, the checkpoint evaluation agrees with the job's own, the export gives equal logits in
    transformers, and a resume from the step-50 checkpoint repeats the per-step losses."""
    import shutil

    from data.labelled import LabelledRow
    from data.storage import Storage
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.export import export_hf
    from orchestrator.runner import resume_spec, run_job
    from tests.conftest import tiny_spec
    from workers.classify import load_classifier
    from workers.evaluator import evaluate_checkpoint
    from workers.weights import run_tokenizer

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    quiet = {"log": lambda *a, **k: None}
    pre = run_job(tiny_spec(**BPE, **{"train.steps": 4, "name": "bert-pre"}), cfg, **quiet)
    assert pre["state"] == "SUCCEEDED", pre
    spec = tiny_spec(kind="classify", name="cls", **BPE, **{
        "model.init_from": pre["run_dir"], "classify.builtin_packages": PACKAGES, "classify.per_label": 120,
        "train.steps": 60, "train.micro_batch": 8, "train.lr": 2e-3, "train.warmup_steps": 2, "train.decay": "constant",
        "checkpoint.every": 50})
    whole = run_job(spec, cfg, **quiet)
    assert whole["state"] == "SUCCEEDED", whole
    rows = _rows(whole["run_dir"])
    losses = [r["loss"] for r in rows]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    final = whole["final_eval"]
    print("classify held-out", final)
    assert 0.25 <= final["chance"] < 0.45 and final["n_labels"] == 4          # 4 near-balanced classes
    assert final["held_out_accuracy"] > final["chance"] + 0.2 and final["held_out_macro_f1"] > 0.45

    storage = Storage(cfg.storage)
    last = os.path.join(whole["run_dir"], "checkpoints", "step_00000060")
    ev = evaluate_checkpoint(storage, whole["run_dir"], last, 60, 2, 8)
    assert ev["extra"]["accuracy"] == pytest.approx(final["held_out_accuracy"], abs=1e-9)
    assert ev["loss"] == pytest.approx(final["held_out_loss"], rel=1e-4)

    transformers = pytest.importorskip("transformers")
    out = export_hf(storage, whole["run_dir"], str(tmp_path / "hf"))
    assert out["class"] == "BertForSequenceClassification"
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out["out"]).eval()
    model, info = load_classifier(storage, whole["run_dir"], last)
    assert list(theirs.config.id2label.values()) == info["labels"] == sorted(PACKAGES)
    enc = RowEncoder(run_tokenizer(storage, whole["run_dir"]), 64, model.trunk.cfg, tuple(info["labels"]))
    sample = [LabelledRow("Return the event loop.", None, PACKAGES[0]), LabelledRow("A message header.", None,
                                                                                   PACKAGES[1])]
    b = enc.batch([enc.ids(r) for r in sample], sample)
    with torch.no_grad():
        got = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     token_type_ids=b["token_type_ids"]).logits
    torch.testing.assert_close(got, model(b["input_ids"], b["token_type_ids"], b["attention_mask"])[0])

    # Resume a copy of the run from its step-50 checkpoint: steps 51-60 repeat the uninterrupted losses.
    copy = str(tmp_path / "runs" / "cls-resumed")
    shutil.copytree(whole["run_dir"], copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "step_00000060"))
    resumed = run_job(resume_spec(storage, copy, []), cfg, resume_dir=copy, **quiet)
    assert resumed["state"] == "SUCCEEDED" and resumed["steps"] == 60
    again = _rows(copy)
    assert [r["step"] for r in again] == list(range(1, 61))
    assert [r["loss"] for r in again[50:]] == pytest.approx(losses[50:], rel=1e-5, abs=1e-6)
    assert resumed["final_eval"]["held_out_accuracy"] == pytest.approx(final["held_out_accuracy"])


@pytest.mark.ray
def test_electra_discriminator_fine_tunes_from_its_pretraining_run(ray_cluster, tmp_path):
    """ELECTRA's second step: classify from an ELECTRA pretraining run trains the discriminator's features with
    ELECTRA's head (the generator and RTD head stay as pre-trained), learns, and exports as
    ElectraForSequenceClassification."""
    from data.storage import Storage
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.export import export_hf
    from orchestrator.runner import run_job
    from tests.conftest import tiny_spec
    from workers.classify import load_classifier
    from workers.weights import run_weights

    cfg = ClusterConfig.model_validate({"storage": str(tmp_path / "runs"), "job_store": str(tmp_path / "jobs.db")})
    quiet = {"log": lambda *a, **k: None}
    electra = {**BPE, "model.family": "electra"}
    pre = run_job(tiny_spec(**electra, **{"train.steps": 4, "name": "electra-pre", "resources.workers": 1}), cfg,
                  **quiet)
    assert pre["state"] == "SUCCEEDED", pre
    spec = tiny_spec(kind="classify", name="electra-cls", **electra, **{
        "model.init_from": pre["run_dir"], "classify.builtin_packages": PACKAGES, "classify.per_label": 120,
        "train.steps": 60, "train.micro_batch": 8, "train.lr": 2e-3, "train.warmup_steps": 2,
        "train.decay": "constant", "checkpoint.every": 60})
    job = run_job(spec, cfg, **quiet)
    assert job["state"] == "SUCCEEDED", job
    losses = [r["loss"] for r in _rows(job["run_dir"])]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    final = job["final_eval"]
    print("electra classify held-out", final)
    assert final["held_out_accuracy"] > final["chance"] + 0.1

    storage = Storage(cfg.storage)
    last = os.path.join(job["run_dir"], "checkpoints", "step_00000060")
    model, _ = load_classifier(storage, job["run_dir"], last)
    pretrained = run_weights(storage, pre["run_dir"]).state
    tuned = model.trunk.state_dict()
    for name in ("gen_head.dense.weight", "disc_head.prediction.weight"):          # frozen: as pre-trained
        assert torch.equal(tuned[name], pretrained[name])
    assert not torch.equal(tuned["disc_blocks.0.attn.q_proj.weight"], pretrained["disc_blocks.0.attn.q_proj.weight"])
    pytest.importorskip("transformers")
    assert export_hf(storage, job["run_dir"], str(tmp_path / "hf"))["class"] == "ElectraForSequenceClassification"
