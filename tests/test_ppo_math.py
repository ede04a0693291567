"""RM and PPO arithmetic against hand-computed numbers, plus a two-step pulse of the stage functions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from workers.rlhf import ppo_math as pm

torch.set_num_threads(1)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- reward model


def test_ranking_loss_k3_by_hand():
    # Best first: r = (2, 1, 0). Pairs (2-1), (2-0), (1-0); C(3,2) = 3.
    rewards = torch.tensor([[2.0, 1.0, 0.0]])
    expected = -(logsig(1.0) + logsig(2.0) + logsig(1.0)) / 3
    assert pm.ranking_loss(rewards).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.251150, abs=1e-6)
    # A ranking the scores contradict costs more.
    assert pm.ranking_loss(rewards.flip(1)).item() > 1.0


def test_ranking_loss_mixed_k_with_mask_weighs_prompts_equally():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    k3 = -(2 * logsig(1.0) + logsig(2.0)) / 3
    k2 = -logsig(-1.0)                                   # one pair, 0.5 ranked above 1.5
    assert pm.ranking_loss(rewards, mask).item() == pytest.approx((k3 + k2) / 2, abs=1e-6)


def test_ranking_loss_centring_term():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [4.0, 2.0, 0.0]])     # prompt means 1 and 2
    plain = pm.ranking_loss(rewards).item()
    assert pm.ranking_loss(rewards, center_coef=0.1).item() == pytest.approx(plain + 0.1 * (1 + 4) / 2, abs=1e-6)


def test_leave_one_out_scores():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    close(pm.leave_one_out_scores(scores, 3), [-1.5, 0.0, 1.5, -15.0, 0.0, 15.0])
    assert torch.equal(pm.leave_one_out_scores(scores, 1), scores)
    with pytest.raises(ValueError, match="groups of 4"):
        pm.leave_one_out_scores(scores, 4)


def test_pairwise_loss_is_the_k2_case():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    as_ranking = pm.ranking_loss(torch.stack([chosen, rejected], 1))
    assert pm.pairwise_loss(chosen, rejected).item() == pytest.approx(as_ranking.item(), abs=1e-6)
    assert pm.pairwise_loss(chosen, rejected).item() == pytest.approx(-(logsig(1.0) + logsig(-1.0)) / 2, abs=1e-6)


def test_ranking_loss_gradient_pushes_better_up():
    rewards = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    pm.ranking_loss(rewards).backward()
    g = rewards.grad[0]
    assert g[0] < 0 < g[2] and g[1] == pytest.approx(0.0, abs=1e-7)   # descent raises the best, lowers the worst


def test_pairwise_accuracy_and_ties():
    assert pm.pairwise_accuracy(torch.tensor([[3.0, 1.0, 2.0]])).item() == pytest.approx(2 / 3)
    assert pm.pairwise_accuracy(torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.5)
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert pm.pairwise_accuracy(rewards, mask).item() == pytest.approx(2 / 4)


def test_group_rewards():
    flat = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])
    index = torch.tensor([[2, 0, 1], [4, 3, -1]])
    rewards, mask = pm.group_rewards(flat, index)
    assert rewards.tolist() == [[12.0, 10.0, 11.0], [14.0, 13.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


# ----------------------------------------------------------------------------- rewards and KL


def test_kl_penalized_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = pm.kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    close(kl, [[0.5, -0.5, 0.0], [0.0, 1.0, 0.0]])
    close(rewards, [[-0.05, 0.05 + 2.0, 0.0], [0.0, -0.1, -1.0]])


def test_reward_clipping():
    assert pm.clip_reward(torch.tensor([-9.0, 0.5, 9.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]
    assert pm.clip_reward(torch.tensor([-9.0]), 0.0).tolist() == [-9.0]


def test_kl_controllers():
    fixed = pm.FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    ctl = pm.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))      # error clipped to +0.2
    ctl = pm.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))       # error clipped to -0.2
    ctl = pm.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(6.6, 1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))       # within the clip


# ----------------------------------------------------------------------------- advantages


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.0, 0.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas (1.5, 0.5, 0.5); A2 = 0.5, A1 = 0.5 + 0.5*0.5, A0 = 1.5 + 0.5*0.75.
    # Row 1: the padded position is ignored: deltas (1, 1); A1 = 1, A0 = 1 + 0.5*1.
    close(adv, [[1.875, 0.75, 0.5], [1.5, 1.0, 0.0]])
    close(ret, [[2.375, 1.75, 2.0], [1.5, 1.0, 0.0]])


def test_gae_lambda_one_is_discounted_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.3, 0.4]])
    adv, ret = pm.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(ret, [[0.81, 0.9, 1.0]])
    close(adv, [[0.61, 0.6, 0.6]])


def test_whiten_masked():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    s = math.sqrt(1.5)                                     # 1 / sqrt(var = 2/3)
    assert pm.whiten(x, mask).tolist() == pytest.approx([-s, 0.0, s, 0.0], abs=1e-5)
    assert pm.whiten(x, mask, shift_mean=False).tolist() == pytest.approx([2 - s, 2.0, 2 + s, 0.0], abs=1e-5)


# ----------------------------------------------------------------------------- losses


def test_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac, approx_kl = pm.policy_loss(logp, old, adv, mask, clip=0.2)
    # Token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2.2.
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(-(math.log(1.5) + math.log(0.5) + math.log(1.1)) / 3, abs=1e-6)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[1] == 0 and g[3] == 0            # clipped and padded tokens pass no gradient
    assert g[2].item() == pytest.approx(-2.0 * 1.1 / 3, abs=1e-6)


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.6]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, clipfrac = pm.value_loss(values, old, returns, mask, clip=0.2)
    # Token 0: max(1.0, (0.7-2)^2=1.69); token 1: max(0, (0.3-0)^2=0.09); token 2 inside the clip: 0.16.
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 0.16) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_entropy_and_token_logprobs():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert pm.entropy_from_logits(logits).tolist() == pytest.approx([math.log(4), 0.0], abs=1e-5)
    assert pm.token_logprobs(logits, torch.tensor([2, 0])).tolist() == pytest.approx([-math.log(4), 0.0], abs=1e-5)


def test_ptx_loss_and_masked_mean():
    assert pm.ptx_loss(torch.tensor(1.0), torch.tensor(2.0), 27.8).item() == pytest.approx(56.6)
    x, m = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert pm.masked_mean(x, m).item() == pytest.approx(8 / 3)
    assert pm.masked_mean(x, m, dim=1).tolist() == pytest.approx([1.0, 3.5])


def test_ema_update():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    nn.init.ones_(model.weight), nn.init.zeros_(ema.weight)
    pm.ema_update(ema, model)                              # decay 0.992
    close(ema.weight, [[0.008, 0.008]])
    pm.ema_update(ema, model, decay=0.5)
    close(ema.weight, [[0.504, 0.504]])


# ----------------------------------------------------------------------------- stage functions (two-step pulse)


def _tiny():
    from data.tokenizer import byte_tokenizer
    from models.transformer import Decoder, decoder_config

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = decoder_config("llama", "tiny", vocab_size=tok.padded_vocab_size, d_model=32, n_layers=1, n_heads=2)
    return tok, Decoder(cfg)


def test_sft_and_rm_steps_learn_on_one_batch():
    from data import instruct
    from models.heads import ScalarHeadModel
    from workers.rlhf import steps as ref

    tok, model = _tiny()
    batch = ref.sft_batch(tok, instruct.demonstrations(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = ref.optimizer_step(opt, model.parameters())
    losses = [ref.sft_step(model, batch, step)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]

    rm = ScalarHeadModel(model)
    comps = instruct.comparisons(6, k=3)
    batch = ref.comparison_batch(tok, comps)
    assert batch["index"].shape[0] == 6 and batch["input_ids"].shape[0] == sum(len(c.responses) for c in comps)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    calls = []

    def recording_step(loss):                              # an injected StepFn, as a DeepSpeed engine would be
        calls.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(8):
        ref.rm_step(rm, batch, recording_step)
    assert len(calls) == 8 and calls[-1] < calls[0]
    bias = rm.set_reward_bias(ref.demo_batches(tok, instruct.demonstrations(4)))
    ids, lengths = next(ref.demo_batches(tok, instruct.demonstrations(4)))
    assert rm(ids, lengths).mean().item() == pytest.approx(0.0, abs=1e-5)
    assert float(rm.reward_bias) == bias


def test_ppo_step_runs_all_phases_and_moves_only_the_trained_models():
    import copy

    from data import instruct
    from models.generate import SamplingConfig
    from models.heads import ScalarHeadModel
    from workers.rlhf import steps as ref

    tok, sft = _tiny()
    rm = ScalarHeadModel(copy.deepcopy(sft))
    policy, reference, value, ema = copy.deepcopy(sft), copy.deepcopy(sft), copy.deepcopy(rm), copy.deepcopy(sft)
    p_opt, v_opt = torch.optim.AdamW(policy.parameters(), lr=1e-3), torch.optim.AdamW(value.parameters(), lr=1e-3)
    roles = ref.PPORoles(policy, value, reference, rm, ref.optimizer_step(p_opt, policy.parameters()),
                         ref.optimizer_step(v_opt, value.parameters()), ema=ema)
    cfg = ref.PPOConfig(rollout_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=6, ptx_coef=0.5)
    sampling = SamplingConfig(max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id)
    kl_ctl = pm.AdaptiveKLController(0.1, target=1.0, horizon=100)
    prompts = [tok.encode(p) for p in instruct.make_prompts(4)]
    ptx = iter(lambda: ref.sft_batch(tok, instruct.demonstrations(2)), None)
    stats = ref.ppo_step(roles, prompts, cfg, kl_ctl, sampling, torch.Generator().manual_seed(0), ptx)
    for key in ("t_generate", "t_score", "t_advantages", "t_update", "policy_loss", "value_loss", "kl", "score",
                "clipfrac", "entropy", "ptx_loss"):
        assert key in stats and math.isfinite(stats[key]), key
    assert kl_ctl.beta != 0.1
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert changed(policy, sft) and changed(value, rm) and changed(ema, sft)
    assert not changed(reference, sft)
