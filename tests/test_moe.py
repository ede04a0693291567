"""Unit tests for the Switch MoE layer (models/moe.py): losses, capacity, dropping, precision, counts."""
from __future__ import annotations

import math

import pytest
import torch

from models.moe import SwitchConfig, SwitchMLP, load_balancing_loss, router_z_loss
from models.transformer import Block, Decoder, DecoderConfig, decoder_config, param_counts

torch.set_num_threads(1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() deduplicates tied weights


def all_to_expert_zero(layer: SwitchMLP) -> None:
    """Router weights that send every positive input to expert 0."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)


# ----------------------------------------------------------------------------- load balancing


def test_load_balancing_uniform_is_one():
    S, N = 8, 4
    probs = torch.full((S, N), 1.0 / N)
    index = torch.arange(S) % N                      # two tokens per expert
    assert load_balancing_loss(probs, index, N).item() == pytest.approx(1.0)


def test_load_balancing_all_to_one_is_n():
    S, N = 6, 4
    probs = torch.zeros(S, N)
    probs[:, 2] = 1.0
    index = torch.full((S,), 2)
    assert load_balancing_loss(probs, index, N).item() == pytest.approx(N)


def test_load_balancing_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    index = torch.tensor([0, 0, 1, 0])
    # f = (3/4, 1/4), P = (2.4/4, 1.6/4) = (0.6, 0.4); 2 * (0.75*0.6 + 0.25*0.4) = 1.1
    assert load_balancing_loss(probs, index, 2).item() == pytest.approx(1.1)


def test_load_balancing_gradient_flows_through_probs_only():
    logits = torch.randn(5, 3, requires_grad=True)
    probs = logits.softmax(-1)
    load_balancing_loss(probs, probs.argmax(-1), 3).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- z-loss


def test_z_loss_hand_computed():
    # logits (0, ln 3): logsumexp = ln(1 + 3) = ln 4
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert router_z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_aux_loss_is_alpha_lb_plus_z():
    cfg = SwitchConfig(num_experts=4, alpha=0.01, z_loss=1e-3)
    layer = SwitchMLP(8, 16, "gelu", True, cfg)
    with torch.no_grad():
        layer.router.weight.zero_()                  # logits all 0: probs 1/4, logsumexp = ln 4
    layer(torch.randn(2, 5, 8))
    # argmax ties go to expert 0: f = (1, 0, 0, 0), P = 1/4 each -> lb = 4 * 1/4 = 1
    assert layer.stats["load_balancing"].item() == pytest.approx(1.0)
    assert layer.stats["z_loss"].item() == pytest.approx(math.log(4.0) ** 2)
    assert layer.aux_loss.item() == pytest.approx(0.01 * 1.0 + 1e-3 * math.log(4.0) ** 2)


# ----------------------------------------------------------------------------- capacity and dropping


def test_capacity_formula():
    cfg = SwitchConfig(num_experts=4, capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4)
    assert cfg.capacity(64, training=True) == 20          # ceil(64 / 4 * 1.25)
    assert cfg.capacity(10, training=True) == 4           # ceil(3.125) = 4
    assert cfg.capacity(30, training=True) == 10          # ceil(9.375)
    assert cfg.capacity(64, training=False) == 32         # 64 / 4 * 2.0
    assert cfg.capacity(4, training=False) == 4           # min_capacity
    assert SwitchConfig(num_experts=4, drop_tokens=False).capacity(64, training=True) == 64


def test_applies_to_every_other_is_odd_layers():
    assert [SwitchConfig(every=2).applies_to(i) for i in range(4)] == [False, True, False, True]
    assert all(SwitchConfig(every=1).applies_to(i) for i in range(4))


def test_over_capacity_tokens_output_zero_in_token_order():
    cfg = SwitchConfig(num_experts=4, capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=0)
    layer = SwitchMLP(8, 16, "gelu", True, cfg).train()
    all_to_expert_zero(layer)
    x = torch.rand(2, 8, 8) + 0.1                              # 16 tokens, all routed to expert 0
    out = layer(x).reshape(16, 8)
    cap = 5                                                     # ceil(16 / 4 * 1.25)
    assert layer.stats["capacity"].item() == cap
    assert (out[:cap].abs().sum(-1) > 0).all()                  # first come, first served
    assert (out[cap:] == 0).all()
    assert layer.stats["dropped"].item() == pytest.approx(11 / 16)


def test_eval_mode_uses_eval_capacity_factor():
    cfg = SwitchConfig(num_experts=4, capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=0)
    layer = SwitchMLP(8, 16, "gelu", True, cfg).eval()
    all_to_expert_zero(layer)
    out = layer(torch.rand(16, 8) + 0.1)
    assert layer.stats["capacity"].item() == 8                  # 16 / 4 * 2.0
    assert (out[:8].abs().sum(-1) > 0).all() and (out[8:] == 0).all()
    assert layer.stats["dropped"].item() == pytest.approx(0.5)


def test_no_drop_tokens_keeps_everything():
    cfg = SwitchConfig(num_experts=4, drop_tokens=False)
    layer = SwitchMLP(8, 16, "gelu", True, cfg)
    all_to_expert_zero(layer)
    out = layer(torch.rand(16, 8) + 0.1)
    assert layer.stats["dropped"].item() == 0.0 and (out.abs().sum(-1) > 0).all()


def test_dropped_tokens_pass_through_block_residual():
    moe = SwitchConfig(num_experts=4, capacity_factor_train=1.0, min_capacity=0)
    cfg = decoder_config("gpt2", "tiny", d_model=32, n_heads=2, moe=moe)
    block = Block(cfg, layer=0).train()
    assert isinstance(block.mlp, SwitchMLP)
    with torch.no_grad():                                       # route every token to expert 0:
        block.mlp.router.weight.zero_()                         # logit_0 = norm2(x)[0], others 0,
        block.mlp.router.weight[0, 0] = 1.0                     # and norm2(x)[0] = z + 10 > 0 since |z| < sqrt(31)
        block.norm2.bias.zero_()
        block.norm2.bias[0] = 10.0
    x = torch.randn(1, 12, 32)
    after_attn = x + block.attn(block.norm1(x), None, None, 0)
    y = block(x)
    cap = 3                                                     # ceil(12 / 4 * 1.0)
    assert torch.equal(y[0, cap:], after_attn[0, cap:])         # dropped: residual only
    assert not torch.allclose(y[0, :cap], after_attn[0, :cap])  # kept: residual + expert output


def test_output_scaled_by_router_probability():
    cfg = SwitchConfig(num_experts=2, drop_tokens=False)
    layer = SwitchMLP(4, 8, "swiglu", False, cfg).eval()
    x = torch.randn(6, 4)
    out = layer(x)
    probs = layer.router_logits(x).softmax(-1)
    gate, index = probs.max(-1)
    for t in range(6):
        expected = layer.experts[int(index[t])](x[t:t + 1])[0] * gate[t]
        torch.testing.assert_close(out[t], expected)


def test_router_float32_under_bf16_autocast():
    cfg = SwitchConfig(num_experts=4)
    layer = SwitchMLP(16, 32, "swiglu", False, cfg)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        out = layer(x)
    assert logits.dtype == torch.float32
    reference = x @ layer.router.weight.T
    # bf16 matmul would be off by ~1e-2 relative; float32 agrees to float32 rounding
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.bfloat16                           # experts do run in bf16 under autocast
    assert layer.stats["load_balancing"].dtype == torch.float32


def test_stats_sum_sensibly():
    cfg = SwitchConfig(num_experts=4, capacity_factor_train=1.0, min_capacity=0)
    layer = SwitchMLP(8, 16, "gelu", True, cfg).train()
    layer(torch.randn(4, 16, 8))
    share, dropped = layer.stats["expert_share"], layer.stats["dropped"].item()
    assert share.shape == (4,) and share.sum().item() == pytest.approx(1.0)
    assert (share >= 0).all()
    # with capacity S/N per expert, the dropped fraction is exactly the overflow above 1/N
    assert dropped == pytest.approx(torch.clamp(share - 0.25, min=0).sum().item(), abs=1e-6)


def test_jitter_only_in_training():
    cfg = SwitchConfig(num_experts=4, jitter=0.1)
    layer = SwitchMLP(8, 16, "gelu", True, cfg)
    x = torch.randn(10, 8)
    layer.eval()
    torch.testing.assert_close(layer.router_logits(x), layer.router_logits(x))
    layer.train()
    assert not torch.allclose(layer.router_logits(x), layer.router_logits(x))


def test_gradients_reach_router_and_used_experts():
    cfg = SwitchConfig(num_experts=4, drop_tokens=False)
    layer = SwitchMLP(8, 16, "gelu", True, cfg)
    layer(torch.randn(64, 8)).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    used = layer.stats["expert_share"] > 0
    for e, expert in enumerate(layer.experts):
        if used[e]:
            assert expert.up.weight.grad.abs().sum() > 0


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="num_experts"):
        SwitchConfig(num_experts=0)
    with pytest.raises(ValueError, match="capacity_factor_eval"):
        SwitchConfig(capacity_factor_eval=0)


# ----------------------------------------------------------------------------- the decoder with Switch layers


@pytest.mark.parametrize("family,every", [("gpt2", 1), ("gpt2", 2), ("llama", 2), ("palm", 1)])
def test_param_counts_of_switch_decoder_match_module(family, every):
    cfg = decoder_config(family, "tiny", moe=SwitchConfig(num_experts=3, every=every))
    model = Decoder(cfg)
    assert param_counts(cfg)["total"] == n_params(model)
    n_switch = sum(1 for i in range(cfg.n_layers) if cfg.moe.applies_to(i))
    assert n_switch > 0
    assert sum(isinstance(b.mlp, SwitchMLP) for b in model.blocks) == n_switch


def test_decoder_loss_includes_aux_and_config_round_trips():
    cfg = decoder_config("gpt2", "tiny", seq_len=32, moe=SwitchConfig(num_experts=2, alpha=0.5))
    model = Decoder(cfg)
    idx = torch.randint(0, 256, (2, 32))
    logits, loss = model(idx, idx)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), idx.view(-1))
    aux = sum(b.mlp.aux_loss for b in model.blocks)
    torch.testing.assert_close(loss, ce + aux)
    assert aux.item() > 0
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
