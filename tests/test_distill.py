"""Distillation (kind: distill): the triple loss on hand-made tensors, the student's start from every other
teacher layer, the spec's refusals, and one two-rank run from a trained teacher that lowers the loss and
resumes exactly (workers/distill.py)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from models.encoder import Encoder, encoder_config
from models.transformer import Decoder, decoder_config
from specs.job import SpecError
from tests.conftest import tiny_spec
from workers.distill import LastHidden, cosine_loss, forward, kd_loss, layer_map, student_state
from workers.weights import load_state

torch.set_num_threads(1)


def test_kd_loss_is_the_softened_kl_times_t_squared_averaged_over_positions():
    student = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])                              # (B=2, T=1, V=2)
    teacher = torch.tensor([[[math.log(3.0), 0.0]], [[0.0, 0.0]]])
    # T = 1: position 1 has p_t = (3/4, 1/4) against (1/2, 1/2); position 2 agrees (KL 0).
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(kl1 / 2, rel=1e-5)
    # T = 2 softens the teacher to (sqrt 3, 1) / (1 + sqrt 3) and scales the KL by 4.
    p = math.sqrt(3) / (1 + math.sqrt(3))
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2 / 2, rel=1e-5)


def test_cosine_loss_is_one_minus_the_cosine_per_position():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]]])                  # cos 0, 1, -1
    assert cosine_loss(student, teacher).item() == pytest.approx((1 + 0 + 2) / 3, rel=1e-5)


def test_the_student_starts_from_every_other_teacher_layer_where_shapes_allow():
    assert layer_map(12, 6) == [0, 2, 4, 6, 8, 10] and layer_map(4, 2) == [0, 2] and layer_map(3, 3) == [0, 1, 2]
    t_cfg = decoder_config("llama", "tiny", vocab_size=320, seq_len=64, n_layers=4)
    teacher = Decoder(t_cfg)
    s_cfg = decoder_config("llama", "tiny", vocab_size=320, seq_len=64, n_layers=2)
    state, layers = student_state(s_cfg, t_cfg, teacher.state_dict())
    student = Decoder(s_cfg)
    load_state(student, state, "test")                                              # every student key, no more
    assert layers == [0, 2]
    assert torch.equal(student.blocks[1].attn.q_proj.weight, teacher.blocks[2].attn.q_proj.weight)
    assert torch.equal(student.tok_emb.weight, teacher.tok_emb.weight)
    assert student_state(decoder_config("llama", "tiny", vocab_size=320, seq_len=64, d_model=64, n_heads=4),
                         t_cfg, teacher.state_dict()) is None                       # another width: random init
    # An encoder with a longer learned position table gives the student its first rows.
    t_enc = Encoder(encoder_config("bert", "tiny", vocab_size=320, seq_len=128, n_layers=4))
    s_cfg = encoder_config("bert", "tiny", vocab_size=320, seq_len=64, n_layers=2)
    state, layers = student_state(s_cfg, t_enc.cfg, t_enc.state_dict())
    student = Encoder(s_cfg)
    load_state(student, state, "test")
    assert torch.equal(student.embeddings.position.weight, t_enc.embeddings.position.weight[:64])
    assert torch.equal(student.blocks[1].mlp.up.weight, t_enc.blocks[2].mlp.up.weight)


def test_both_models_give_logits_and_their_last_hidden_states_for_encoder_and_decoder_batches():
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.where(ids % 5 == 0, ids, torch.full_like(ids, -100))
    for model, batch in ((Decoder(decoder_config("llama", "tiny", vocab_size=320, seq_len=16)),
                          {"idx": ids, "targets": ids}),
                         (Encoder(encoder_config("bert", "tiny", vocab_size=320, seq_len=16)),
                          {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "mlm_labels": labels,
                           "nsp_labels": torch.tensor([0, 1])})):
        model.eval()
        hidden = LastHidden(model)
        logits, own = forward(model, batch, labels=True)
        assert logits.shape == (2, 16, 320) and own.item() > 0
        expected = model.hidden(ids) if "idx" in batch else model.hidden(ids, batch["token_type_ids"])
        assert torch.equal(hidden.value, expected)                                  # what the cosine compares
        assert forward(model, batch, labels=False)[1] is None                       # the teacher's call


def test_distill_specs_name_what_is_missing():
    with pytest.raises(SpecError, match=r"distill\.teacher: give the teacher"):
        tiny_spec(kind="distill")
    with pytest.raises(SpecError, match="not electra"):
        tiny_spec(kind="distill", **{"distill.teacher": "/x", "model.family": "electra"})
    with pytest.raises(SpecError, match=r"distill\.temperature"):
        tiny_spec(kind="distill", **{"distill.teacher": "/x", "distill.temperature": 0})
    assert tiny_spec(kind="distill", **{"distill.teacher": "/x"}).distill.alpha_kd == 5.0     # DistilBERT's


@pytest.mark.ray
def test_distilled_student_learns_on_two_ranks_and_resumes_exactly(ray_cluster, cluster_cfg):
    from data.storage import Storage
    from orchestrator.runner import run_job
    from workers.checkpoint import checkpoint_dir, load_consolidated
    from workers.evaluator import evaluate_checkpoint

    def run(spec, resume=None):
        result = run_job(spec, cluster_cfg, resume_dir=resume, log=lambda *a, **k: None)
        assert result["state"] == "SUCCEEDED", result
        return result

    def rows(run_dir):
        by_step = {}
        for line in open(os.path.join(run_dir, "metrics.jsonl")):
            by_step[json.loads(line)["step"]] = json.loads(line)
        return [by_step[s] for s in sorted(by_step)]

    base = {"data.seq_len": 64, "checkpoint.every": 4}
    teacher = run(tiny_spec(**base, **{"name": "teacher", "model.n_layers": 4, "train.steps": 8}))["run_dir"]
    # From scratch, so that the loss has far to fall in 8 steps (the start from teacher layers 0 and 2 is
    # checked without Ray above; it begins near the teacher's loss).
    spec = tiny_spec(kind="distill", **base, **{"name": "student", "model.n_layers": 2, "train.steps": 8,
                                                "distill.teacher": teacher, "distill.init_from_teacher": False})
    result = run(spec)
    run_dir, first = result["run_dir"], rows(result["run_dir"])
    assert first[-1]["loss"] < first[0]["loss"] - 1.0
    assert first[-1]["lm_loss"] < first[0]["lm_loss"]
    for row in first:                                          # 5 KD + 2 LM + 1 cosine, DistilBERT's weights
        assert row["loss"] == pytest.approx(5 * row["kd_loss"] + 2 * row["lm_loss"] + row["cos_loss"], rel=1e-4)
        assert row["kd_loss"] >= 0 and 0 <= row["cos_loss"] <= 2
    assert result["final_eval"]["held_out_loss"] < first[0]["lm_loss"]
    scored = evaluate_checkpoint(Storage(cluster_cfg.storage), run_dir, checkpoint_dir(run_dir, 8), 8,
                                 spec.eval.batches, 4)                     # the controller's checkpoint evaluation
    assert scored["loss"] == pytest.approx(result["final_eval"]["held_out_loss"], rel=1e-4)
    # The checkpoint holds the two-layer student only (the teacher is fixed, never saved).
    saved = load_consolidated(Storage(cluster_cfg.storage), checkpoint_dir(run_dir, 8))
    assert {k.split(".")[1] for k in saved if k.startswith("blocks.")} == {"0", "1"}
    assert json.load(open(os.path.join(run_dir, "model_config.json")))["model"]["n_layers"] == 2
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    run(spec, resume=run_dir)                                  # steps 5-8 again, from the step-4 checkpoint
    assert [r["loss"] for r in rows(run_dir)] == pytest.approx([r["loss"] for r in first], rel=1e-5, abs=1e-5)
