"""T5 and BART to transformers' T5ForConditionalGeneration / BartForConditionalGeneration and back, with equal
logits on padded inputs (no Ray)."""
import pytest
import torch

from models.bart import Bart, BartConfig
from models.hf import hf_class, import_hf_family, save_hf
from models.t5 import T5, T5Config


def _inputs():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 200, (2, 30), generator=g), torch.randint(0, 200, (2, 12), generator=g)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 22:] = 0                                                         # the second row is padded
    return x, mask, y


@pytest.mark.parametrize("cfg", [
    T5Config(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_kv=16, d_ff=64, max_distance=20),
    T5Config(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64, tie_embeddings=False),
    BartConfig(vocab_size=256, seq_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64),
], ids=["t5", "t5-v1.1-untied", "bart"])
def test_round_trip_gives_equal_logits(cfg, tmp_path):
    import transformers

    torch.manual_seed(0)
    ours = (T5(cfg) if isinstance(cfg, T5Config) else Bart(cfg)).eval()
    if isinstance(cfg, BartConfig):
        ours.final_logits_bias.normal_()                                     # an imported BART may have one
    cls = save_hf(str(tmp_path), cfg, ours.state_dict())
    theirs = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
    x, mask, y = _inputs()
    with torch.no_grad():
        a, _ = ours(x, mask, y)
        b = theirs(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    family, back_cfg, state = import_hf_family(str(tmp_path))
    assert family == ("t5" if isinstance(cfg, T5Config) else "bart") and back_cfg == cfg
    back = (T5(back_cfg) if family == "t5" else Bart(back_cfg)).eval()
    back.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(back(x, mask, y)[0], a)


def test_a_t5_v1_1_checkpoint_in_transformers_4_layout_imports():
    # T5 v1.1: its own unscaled head and a gated-GELU MLP, as google/t5-v1_1-* ship them (a config.json
    # with only the non-default keys); the untied round trip is in test_round_trip_gives_equal_logits.
    from models.hf import from_hf
    from models.hf_seq2seq import t5_names

    cfg = T5Config(vocab_size=256, d_model=32, n_layers=1, n_heads=4, d_ff=64, tie_embeddings=False)
    model = T5(cfg).eval()
    assert model.lm_head is not None and hasattr(model.encoder.blocks[0].ff, "wi_0")
    assert hf_class(cfg) == "T5ForConditionalGeneration"
    theirs = {hf: model.state_dict()[ours] for ours, hf in t5_names(cfg).items()}
    config = {"model_type": "t5", "vocab_size": 256, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
              "num_heads": 4, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    family, back_cfg, state = from_hf(config, theirs)
    assert (family, back_cfg) == ("t5", cfg)
    back = T5(back_cfg).eval()
    back.load_state_dict(state)
    x, mask, y = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, mask, y)[0], model(x, mask, y)[0])


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_init_from_a_hugging_face_folder_takes_its_weights(family, tmp_path):
    # model.init_from an exported folder: the architecture and weights of the folder, dropout from the spec.
    from data.storage import Storage
    from data.tokenizer import byte_tokenizer
    from tests.conftest import tiny_spec
    from workers.tasks import build_model, model_config
    from workers.weights import init_config, load_init_state

    tok = byte_tokenizer()
    folder, cache = tmp_path / "hf", tmp_path / "cache"
    tok.save(str(cache))
    spec = tiny_spec(**{"model.family": family, "model.init_from": str(folder), "model.dropout": 0.1})
    cfg = model_config(spec, tok.padded_vocab_size)
    source = build_model(cfg)
    save_hf(str(folder), cfg, source.state_dict(), {"tokenizer.json": tok.to_json()})
    new_cfg, weights = init_config(spec, Storage(str(tmp_path)), cfg, tok, str(cache))
    assert new_cfg.dropout == 0.1 and new_cfg.vocab_size == cfg.vocab_size
    model = build_model(new_cfg)
    load_init_state(model, weights)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
