"""T5 and BART pretrain on the token cache through run_job on two ranks (ZeRO), resume exactly, and export
to transformers with the trained logits (tier: ray)."""
import json
import os

import pytest
import torch

from orchestrator.runner import run_job
from tests.conftest import tiny_spec
from workers.checkpoint import checkpoint_dir

pytestmark = pytest.mark.ray


def _rows(run_dir):
    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _run(cluster_cfg, family, resume=None):
    spec = tiny_spec(**{"model.family": family, "train.steps": 8, "train.lr": 3e-3, "checkpoint.every": 4,
                        "data.seq_len": 64, "parallel.zero_stage": 2})
    result = run_job(spec, cluster_cfg, resume_dir=resume, log=lambda *a, **k: None)
    assert result["state"] == "SUCCEEDED", result
    return result


def _exported_logits_match(run_dir, tmp_path, cls_name):
    """``switchyard export`` of the run loads in transformers and gives our model's logits."""
    import transformers

    from data.storage import Storage
    from orchestrator.export import export_hf
    from workers.tasks import build_model
    from workers.weights import run_weights

    out = str(tmp_path / "hf")
    storage = Storage(run_dir)
    assert export_hf(storage, run_dir, out)["class"] == cls_name
    w = run_weights(storage, run_dir)
    ours = build_model(w.config).eval()
    ours.load_state_dict(w.state)
    theirs = getattr(transformers, cls_name).from_pretrained(out).eval()
    config = json.load(open(os.path.join(out, "config.json")))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 250, (2, 40), generator=g), torch.randint(0, 250, (2, 20), generator=g)
    with torch.no_grad():
        a, _ = ours(x, None, y)
        b = theirs(input_ids=x, decoder_input_ids=y).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    return config


@pytest.mark.parametrize("family,cls_name", [("t5", "T5ForConditionalGeneration"),
                                             ("bart", "BartForConditionalGeneration")])
def test_seq2seq_trains_resumes_exactly_and_exports(ray_cluster, cluster_cfg, tmp_path, family, cls_name):
    r = _run(cluster_cfg, family)
    run_dir = r["run_dir"]
    rows = _rows(run_dir)
    losses = [row["loss"] for row in rows]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    info = json.load(open(os.path.join(run_dir, "model_config.json")))
    assert info["kind"] == "encoder-decoder" and info["family"] == family
    assert r["final_eval"]["held_out_loss"] < losses[0]
    # Interrupted after step 4: the resumed run draws the same noise, so the same per-step losses.
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    _run(cluster_cfg, family, resume=run_dir)
    assert [row["loss"] for row in _rows(run_dir)] == pytest.approx(losses, rel=1e-5, abs=1e-5)
    # The checkpoint evaluation task scores the last checkpoint as the ranks' final evaluation did.
    from data.storage import Storage
    from workers.evaluator import evaluate_checkpoint

    scored = evaluate_checkpoint(Storage(run_dir), run_dir, checkpoint_dir(run_dir, 8), 8, batches=2, micro_batch=4)
    assert scored["loss"] == pytest.approx(r["final_eval"]["held_out_loss"], rel=1e-4)
    config = _exported_logits_match(run_dir, tmp_path, cls_name)
    tokenizer = json.load(open(os.path.join(tmp_path / "hf", "tokenizer_config.json")))
    assert tokenizer["pad_token"] == "<|pad|>"
    start = config["pad_token_id"] if family == "t5" else config["eos_token_id"]
    assert config["decoder_start_token_id"] == start
