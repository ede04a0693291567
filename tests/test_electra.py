"""ELECTRA: generator sampling and RTD labels by hand, the task's masks and uniforms, the Hugging Face
export and import (the discriminator; the generator starts fresh), and one two-rank run that trains,
resumes exactly and exports (models/electra.py, workers/electra.py)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data.masking import IGNORE_INDEX
from data.sampler import DataPlan
from data.tokenizer import byte_tokenizer
from models.electra import Electra, corrupt, electra_config, param_counts, rtd_labels, sample_tokens
from workers.electra import ReplacedTokenDetection

torch.set_num_threads(1)
TOK = byte_tokenizer()


def test_sampling_is_the_inverse_cdf_of_the_generator_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.7]] * 4)                                      # cdf 0.1, 0.3, 1.0
    u = torch.tensor([0.05, 0.25, 0.31, 0.999])
    assert sample_tokens(probs, u).tolist() == [0, 1, 2, 2]
    # Sampled, not the argmax: over many uniforms each id comes up as often as its probability says.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = sample_tokens(p.expand(40_000, 4), torch.rand(40_000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=4).float() / 40_000
    assert torch.allclose(freq, p, atol=0.01)


def test_rtd_labels_mark_replaced_tokens_and_a_sample_equal_to_the_original_is_original():
    original = torch.tensor([[5, 6, 7, 8, 9]])
    chosen = torch.tensor([[False, True, True, False, True]])
    samples = torch.tensor([[1, 6, 3, 1, 2]])                                       # position 1 samples its original
    corrupted = corrupt(original, chosen, samples)
    assert corrupted.tolist() == [[5, 6, 3, 8, 2]]                                  # unchosen positions never change
    assert rtd_labels(corrupted, original).tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]


def test_forward_samples_from_the_generator_and_weighs_rtd_by_50():
    cfg = electra_config("tiny", vocab_size=TOK.padded_vocab_size, seq_len=32, dropout=0.0)
    model = Electra(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]
    words = [n for n, p in model.named_parameters() if p.shape[0] == cfg.vocab_size and p.dim() == 2]
    assert words == ["embeddings.word.weight"]                                       # one table, shared by both
    with torch.no_grad():
        model.gen_head.bias[42] = 100.0                                              # the generator always says 42
    original = torch.randint(40, 50, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(original, IGNORE_INDEX)
    labels[:, ::4] = original[:, ::4]
    masked = torch.where(labels != IGNORE_INDEX, torch.full_like(original, TOK.mask_id), original)
    logits, loss = model(masked, original, labels, torch.rand(2, 32))
    assert logits.shape == (2, 32)
    replaced = (original[:, ::4] != 42).float().sum() / original.numel()              # 42 there already: original
    assert model.stats["replaced_share"] == pytest.approx(float(replaced))
    assert loss.item() == pytest.approx(model.stats["mlm_loss"] + 50 * model.stats["rtd_loss"], rel=1e-5)
    loss.backward()                                                                  # both models get gradients
    assert model.gen_blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.disc_head.prediction.weight.grad.abs().sum() > 0


def test_task_masks_without_random_tokens_and_repeats_masks_and_uniforms_by_sample():
    tokens = np.array([TOK.encode("The quick brown fox jumps over the lazy dog. " * 40)], dtype=np.int64)[0]
    plan = DataPlan(tokens, 32, 200, seed=0)
    task = ReplacedTokenDetection(plan, TOK, 32, seed=3)
    a, b = task.batch(range(0, 4)), task.batch(range(0, 4))
    for key in a:
        assert torch.equal(a[key], b[key])                                           # a resume sees the same
    chosen = a["mlm_labels"] != IGNORE_INDEX
    ordinary = chosen.sum(1).float() / (32 - 2)                                      # [CLS] and [SEP] never chosen
    assert torch.all((ordinary > 0.1) & (ordinary < 0.2))                            # 15% of 30 rounds to 4 or 5
    x = a["input_ids"]
    assert torch.all((x[chosen] == TOK.mask_id) | (x[chosen] == a["original_ids"][chosen]))   # no random tokens
    assert torch.equal(x[~chosen], a["original_ids"][~chosen])
    assert a["sample_u"].shape == (4, 32) and not torch.equal(a["sample_u"][0], a["sample_u"][1])
    later = task.batch(range(plan.n_windows, plan.n_windows + 4))                    # the next epoch: a new mask
    assert not torch.equal(later["mlm_labels"], a["mlm_labels"])


def test_discriminator_exports_as_electra_for_pretraining_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from models.hf import save_hf

    cfg = electra_config("tiny", vocab_size=TOK.padded_vocab_size, seq_len=32, dropout=0.0)
    model = Electra(cfg)
    with torch.no_grad():
        for p in model.parameters():                                                 # a swapped tensor shows
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    assert save_hf(str(tmp_path), cfg, model.state_dict()) == "ElectraForPreTraining"
    hf = transformers.ElectraForPreTraining.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, TOK.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    types = torch.randint(0, 2, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.eval().discriminator_logits(ids, types)
        theirs = hf(input_ids=ids, token_type_ids=types).logits
    assert torch.allclose(ours, theirs, atol=1e-5)

    from models.hf import import_hf_family                                           # and back
    from models.hf_electra import FRESH_ON_IMPORT
    from workers.weights import load_state

    _, back_cfg, state = import_hf_family(str(tmp_path))
    back = Electra(back_cfg).eval()
    load_state(back, state, "the export", FRESH_ON_IMPORT)
    with torch.no_grad():
        assert torch.allclose(back.discriminator_logits(ids, types), ours, atol=1e-6)


def _hf_electra(transformers, folder, cls="ElectraForPreTraining", **sizes):
    """A small ELECTRA written by transformers itself (random weights) into ``folder``; the model."""
    conf = transformers.ElectraConfig(**{
        "vocab_size": TOK.padded_vocab_size, "embedding_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **sizes})
    torch.manual_seed(5)
    model = getattr(transformers, cls)(conf).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def test_a_transformers_electra_discriminator_imports_with_its_logits_and_a_fresh_generator(tmp_path):
    transformers = pytest.importorskip("transformers")
    from models.hf import import_hf_family
    from models.hf_electra import FRESH_ON_IMPORT
    from workers.weights import load_state

    hf = _hf_electra(transformers, tmp_path / "disc")
    family, cfg, state = import_hf_family(str(tmp_path / "disc"))
    assert family == "electra" and (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (64, 2, 4, 128)
    assert (cfg.gen_d_model, cfg.gen_n_heads, cfg.gen_d_ff) == (16, 1, 64)            # a quarter, fresh
    assert not any(k.startswith("gen_") for k in state) and "disc_head.prediction.weight" in state
    model = Electra(cfg).eval()
    with pytest.raises(ValueError, match="missing"):                                 # strict but for the generator
        load_state(model, state, "the folder")
    load_state(model, state, "the folder", FRESH_ON_IMPORT)
    ids = torch.randint(0, TOK.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    types = torch.randint(0, 2, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model.discriminator_logits(ids, types), hf(input_ids=ids, token_type_ids=types).logits,
                              atol=1e-5)

    base = _hf_electra(transformers, tmp_path / "base", cls="ElectraModel")          # no RTD head: it stays fresh
    _, cfg, state = import_hf_family(str(tmp_path / "base"))
    assert not any(k.startswith("disc_head.") for k in state)
    model = Electra(cfg).eval()
    load_state(model, state, "the folder", FRESH_ON_IMPORT)
    with torch.no_grad():
        assert torch.allclose(model.hidden(ids, types), base(input_ids=ids, token_type_ids=types).last_hidden_state,
                              atol=1e-5)


def test_electra_folders_that_do_not_map_are_refused_in_one_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from models.hf import HFError, import_hf_family

    _hf_electra(transformers, tmp_path / "gen", cls="ElectraForMaskedLM")
    with pytest.raises(HFError, match=r"ELECTRA's generator \(ElectraForMaskedLM\); import the discriminator"):
        import_hf_family(str(tmp_path / "gen"))
    _hf_electra(transformers, tmp_path / "small", embedding_size=32)                 # ELECTRA-Small's layout
    with pytest.raises(HFError, match="embedding_size 32 differs from hidden_size 64"):
        import_hf_family(str(tmp_path / "small"))


def test_a_classify_job_starts_its_electra_trunk_from_a_transformers_folder(tmp_path):
    """The worker's own path (init_config, build_model, load_init_state): the trunk's features are the folder's."""
    transformers = pytest.importorskip("transformers")
    from data.storage import Storage
    from models.classifier import SequenceClassifier
    from tests.conftest import tiny_spec
    from workers.model_config import model_config
    from workers.tasks import build_model
    from workers.weights import init_config, load_init_state

    hf = _hf_electra(transformers, tmp_path / "disc")
    spec = tiny_spec(kind="classify", **{"model.family": "electra", "model.init_from": str(tmp_path / "disc"),
                                         "data.seq_len": 48})
    cfg, init = init_config(spec, Storage(str(tmp_path)), model_config(spec, TOK.padded_vocab_size), TOK,
                            str(tmp_path / "cache"))
    assert init.fresh and cfg.d_model == 64 and cfg.dropout == spec.model.dropout
    trunk = build_model(cfg)
    load_init_state(trunk, init)
    clf = SequenceClassifier(trunk, 3).eval()
    ids = torch.randint(0, TOK.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(trunk.hidden(ids), hf.electra(input_ids=ids).last_hidden_state, atol=1e-5)
        assert clf(ids)[0].shape == (2, 3)


@pytest.mark.ray
def test_electra_trains_on_two_ranks_resumes_exactly_and_exports(ray_cluster, cluster_cfg, tmp_path):
    transformers = pytest.importorskip("transformers")
    from data.storage import Storage
    from orchestrator.export import export_hf
    from orchestrator.runner import run_job
    from tests.conftest import tiny_spec
    from workers.checkpoint import checkpoint_dir, load_consolidated
    from workers.evaluator import evaluate_checkpoint

    spec = tiny_spec(**{"model.family": "electra", "train.steps": 8, "checkpoint.every": 4, "data.seq_len": 64})

    def run(resume=None):
        result = run_job(spec, cluster_cfg, resume_dir=resume, log=lambda *a, **k: None)
        assert result["state"] == "SUCCEEDED", result
        return result

    def rows(run_dir):
        by_step = {}
        for line in open(os.path.join(run_dir, "metrics.jsonl")):
            by_step[json.loads(line)["step"]] = json.loads(line)
        return [by_step[s] for s in sorted(by_step)]

    result = run()
    run_dir, first = result["run_dir"], rows(result["run_dir"])
    assert len(first) == 8 and first[-1]["loss"] < first[0]["loss"] - 1.0
    assert first[-1]["gen_mlm_loss"] < first[0]["gen_mlm_loss"]
    for row in first:                                            # loss = MLM + 50 RTD, averaged over the ranks
        assert row["loss"] == pytest.approx(row["gen_mlm_loss"] + 50 * row["rtd_loss"], rel=1e-4)
        assert 0.0 < row["replaced_share"] < 0.15
    os.remove(os.path.join(checkpoint_dir(run_dir, 8), "manifest.json"))
    run(resume=run_dir)                                          # steps 5-8 again from the step-4 checkpoint
    assert [r["loss"] for r in rows(run_dir)] == pytest.approx([r["loss"] for r in first], rel=1e-5, abs=1e-5)

    # The controller's checkpoint evaluation scores the checkpoint as the ranks' final evaluation did.
    storage = Storage(cluster_cfg.storage)
    scored = evaluate_checkpoint(storage, run_dir, checkpoint_dir(run_dir, 8), 8, spec.eval.batches, 4)
    assert scored["loss"] == pytest.approx(result["final_eval"]["held_out_loss"], rel=1e-4)
    out = str(tmp_path / "hf")
    assert export_hf(Storage(cluster_cfg.storage), run_dir, out)["class"] == "ElectraForPreTraining"
    cfg = electra_config(**json.load(open(os.path.join(run_dir, "model_config.json")))["model"])
    model = Electra(cfg)
    model.load_state_dict(load_consolidated(Storage(cluster_cfg.storage), checkpoint_dir(run_dir, 8)))
    ids = torch.randint(0, TOK.vocab_size, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = transformers.ElectraForPreTraining.from_pretrained(out).eval()(input_ids=ids).logits
        assert torch.allclose(model.eval().discriminator_logits(ids), theirs, atol=1e-5)
