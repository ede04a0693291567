"""Hugging Face interchange: our models -> transformers folders -> the same logits, and back (models/hf.py).

The unit tests build random tiny models (every weight perturbed, so a swapped
or untransposed tensor shows), export them, load them with the transformers
class and compare logits. The last test runs the whole path through Ray:
train -> ``switchyard export`` -> transformers -> ``model.init_from``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.tokenizer import byte_tokenizer  # noqa: E402
from models.encoder import Encoder, encoder_config  # noqa: E402
from models.hf import HFError, import_hf, import_hf_family, save_hf  # noqa: E402
from models.moe import SwitchConfig  # noqa: E402
from models.transformer import Decoder, decoder_config  # noqa: E402
from orchestrator.cli import main  # noqa: E402

torch.set_num_threads(1)
TOK = byte_tokenizer()
V, T = TOK.padded_vocab_size, 32


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TOK.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def _files() -> dict[str, str]:
    import tempfile

    d = tempfile.mkdtemp()
    TOK.save(d)
    return {n: open(os.path.join(d, n)).read() for n in ("tokenizer.json", "tokenizer_config.json")}


DECODERS = {
    "llama": dict(n_kv_heads=2),                              # grouped-query attention, untied head
    "llama-tied": dict(tie_embeddings=True),
    "gpt2": dict(),                                           # tied, Conv1D layout
    "gpt2-untied": dict(tie_embeddings=False),
}
HF_DECODER = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_export_gives_the_same_logits_in_transformers_and_back(tmp_path, name):
    family = name.split("-")[0]
    cfg = decoder_config(family, "tiny", vocab_size=V, seq_len=T, **DECODERS[name])
    ours = _perturbed(Decoder(cfg))
    cls = save_hf(str(tmp_path), cfg, ours.state_dict(), _files())
    assert cls == HF_DECODER[family]
    assert json.load(open(tmp_path / "config.json"))["architectures"] == [cls]

    hf = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
    idx = _ids()
    with torch.no_grad():
        expected = ours(idx)[0]
        torch.testing.assert_close(hf(input_ids=idx).logits, expected, rtol=1e-4, atol=1e-4)
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(auto).__name__ == cls

    # ... and back: import_hf gives our config and a state dict the Decoder loads strictly.
    cfg2, state = import_hf(str(tmp_path))
    assert (cfg2.d_model, cfg2.n_layers, cfg2.kv_heads, cfg2.ff_dim, cfg2.tie_embeddings) == \
           (cfg.d_model, cfg.n_layers, cfg.kv_heads, cfg.ff_dim, cfg.tie_embeddings)
    back = Decoder(cfg2)
    back.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_encoder_export_gives_the_same_logits_in_transformers_and_back(tmp_path, family):
    cfg = encoder_config(family, "tiny", vocab_size=V, seq_len=T, dropout=0.0)
    ours = _perturbed(Encoder(cfg))
    cls = save_hf(str(tmp_path), cfg, ours.state_dict(), _files())
    idx = _ids()
    types = torch.zeros_like(idx)
    types[:, T // 2:] = 1 if cfg.type_vocab_size else 0
    mask = torch.ones_like(idx)
    mask[1, -5:] = 0                                           # padding in the second row
    mlm_cls = {"bert": "BertForMaskedLM", "roberta": "BertForMaskedLM", "albert": "AlbertForMaskedLM"}[family]
    with torch.no_grad():
        h = ours.hidden(idx, types if cfg.type_vocab_size else None, mask)
        expected = ours.mlm_logits(h)
        mlm = getattr(transformers, mlm_cls).from_pretrained(str(tmp_path)).eval()
        got = mlm(input_ids=idx, token_type_ids=types, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        if cfg.nsp:                                            # BERT's NSP / ALBERT's SOP head too
            assert cls.endswith("ForPreTraining")
            pre = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
            out = pre(input_ids=idx, token_type_ids=types, attention_mask=mask)
            nsp = out.seq_relationship_logits if family == "bert" else out.sop_logits
            torch.testing.assert_close(nsp, ours.nsp_logits(h), rtol=1e-4, atol=1e-4)
        else:
            assert cls == "BertForMaskedLM"

    fam2, cfg2, state = import_hf_family(str(tmp_path))
    assert fam2 == family and cfg2.type_vocab_size == cfg.type_vocab_size and cfg2.nsp == cfg.nsp
    assert cfg2.share_layers == cfg.share_layers and cfg2.emb_dim == cfg.emb_dim
    back = Encoder(cfg2)
    back.load_state_dict(state, strict=True)
    with torch.no_grad():
        h2 = back.eval().hidden(idx, types if cfg.type_vocab_size else None, mask)
        torch.testing.assert_close(back.mlm_logits(h2), expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_files_load_in_auto_tokenizer(tmp_path):
    cfg = decoder_config("llama", "tiny", vocab_size=V, seq_len=T)
    save_hf(str(tmp_path), cfg, Decoder(cfg).state_dict(), _files())
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok("def f(x): return x")["input_ids"] == TOK.encode("def f(x): return x")
    config = json.load(open(tmp_path / "config.json"))
    assert config["eos_token_id"] == TOK.eos_id == tok.eos_token_id


def test_models_without_a_transformers_class_are_refused(tmp_path):
    palm = decoder_config("palm", "tiny", vocab_size=V, seq_len=T)
    with pytest.raises(HFError, match="parallel attention"):
        save_hf(str(tmp_path / "palm"), palm, Decoder(palm).state_dict())
    moe = decoder_config("llama", "tiny", vocab_size=V, seq_len=T, moe=SwitchConfig(num_experts=2))
    with pytest.raises(HFError, match="Switch"):
        save_hf(str(tmp_path / "moe"), moe, Decoder(moe).state_dict())
    assert not (tmp_path / "palm").exists() and not (tmp_path / "moe").exists()   # nothing half-written


def test_export_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("switchyard: error: export:") and "\n" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(tmp_path), "--format", "hf", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end (Ray)


@pytest.mark.ray
def test_train_export_load_and_start_a_job_from_the_hf_folder(ray_cluster, cluster_cfg, tmp_path, capsys):
    from data.storage import Storage
    from orchestrator.runner import run_job
    from tests.conftest import tiny_spec
    from workers.weights import run_weights

    quiet = dict(log=lambda *a, **k: None)
    a = run_job(tiny_spec(**{"train.steps": 6, "checkpoint.every": 3}), cluster_cfg, **quiet)
    assert a["state"] == "SUCCEEDED", a
    # Without best_checkpoint.json the latest complete checkpoint is exported; with one, the best.
    st = Storage(cluster_cfg.storage)
    assert run_weights(st, a["run_dir"]).source.endswith("step_00000006")
    st.write_json(f"{a['run_dir']}/best_checkpoint.json", {"path": f"{a['run_dir']}/checkpoints/step_00000003"})
    assert run_weights(st, a["run_dir"]).source.endswith("step_00000003")
    os.remove(f"{a['run_dir']}/best_checkpoint.json")

    out = str(tmp_path / "hf")
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(f"storage: {cluster_cfg.storage}\n")
    assert main(["--cluster", str(cluster_file), "export", a["run_dir"], "--format", "hf", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["class"] == "LlamaForCausalLM" and result["checkpoint"].endswith("step_00000006")

    # transformers gives the trained model's logits
    w = run_weights(st, a["run_dir"])
    ours = Decoder(w.config).eval()
    ours.load_state_dict(w.state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    idx = torch.tensor([tok("Return the number of items in a container.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)

    # A new job starts from the exported folder: its first loss is the trained model's, not a fresh one's.
    b = run_job(tiny_spec(**{"train.steps": 2, "model.init_from": out, "checkpoint.every": 100}), cluster_cfg, **quiet)
    assert b["state"] == "SUCCEEDED", b
    assert b["first_loss"] < a["first_loss"] - 0.4
