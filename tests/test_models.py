"""Decoder families, exact parameter counts and FLOPs per token."""
import pytest
import torch

from models.transformer import FAMILIES, Decoder, decoder_config, flops_per_token, param_counts


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("preset", ["tiny", "mini", "small"])
def test_param_counts_match_module(family, preset):
    cfg = decoder_config(family, preset, vocab_size=320)
    model = Decoder(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.tok_emb.weight.numel()
    emb += model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    emb += 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    assert param_counts(cfg) == {"total": total, "non_embedding": total - emb}


def test_tiny_is_a_few_hundred_thousand_params():
    for family in FAMILIES:
        n = param_counts(decoder_config(family, "tiny"))["total"]
        assert 100_000 < n < 1_000_000


def test_family_switches():
    gpt2 = Decoder(decoder_config("gpt2", "tiny"))
    assert isinstance(gpt2.norm_f, torch.nn.LayerNorm) and gpt2.pos_emb is not None
    assert gpt2.lm_head.weight is gpt2.tok_emb.weight and gpt2.blocks[0].mlp.gate is None
    llama = Decoder(decoder_config("llama", "tiny"))
    assert llama.pos_emb is None and llama.blocks[0].mlp.gate is not None and llama.blocks[0].attn.q_proj.bias is None
    palm = Decoder(decoder_config("palm", "tiny"))
    assert palm.blocks[0].parallel and palm.blocks[0].norm2 is None
    assert palm.blocks[0].attn.k_proj.out_features == palm.cfg.head_dim  # multi-query: one K/V head
    gqa = decoder_config("llama", "tiny", n_kv_heads=2)
    assert Decoder(gqa).blocks[0].attn.k_proj.out_features == 2 * gqa.head_dim
    with pytest.raises(ValueError, match="n_kv_heads"):
        decoder_config("llama", "tiny", n_kv_heads=3)


def test_flops_hand_computed_llama_tiny():
    cfg = decoder_config("llama", "tiny", vocab_size=320)  # d=96, L=3, H=4, seq 128, untied, SwiGLU d_ff=256
    d, L, V, ff, T = 96, 3, 320, 256, 128
    assert cfg.ff_dim == ff
    per_layer = 4 * d * d + 3 * d * ff + 2 * d   # q,k,v,o + gate,up,down + two RMSNorm weights
    n = L * per_layer + d + 2 * V * d             # + final norm + embedding + untied head
    f = flops_per_token(cfg)
    assert f["6N"] == 6 * n
    assert f["with_attention"] == 6 * n + 12 * L * d * T


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_matches_full_forward(family):
    torch.manual_seed(0)
    model = Decoder(decoder_config(family, "tiny")).eval()
    idx = torch.randint(0, 320, (2, 24))
    full, _ = model(idx)
    cache = model.new_cache()
    parts = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 10), (10, 11), (11, 24)]]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_loss_ignores_masked_targets_and_learns():
    torch.manual_seed(0)
    model = Decoder(decoder_config("gpt2", "tiny"))
    x = torch.randint(0, 50, (4, 32))
    y = x.clone()
    y[:, :16] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 1.0
