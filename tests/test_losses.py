"""Policy losses, aggregation, advantages and KL estimators against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from prism.losses.advantages import all_equal_groups, group_advantages, group_normalize
from prism.losses.aggregate import aggregate_loss
from prism.losses.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from prism.losses.policy import ALGORITHMS, compute_policy_loss, truncated_is_weights

L = math.log


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------ GRPO / DAPO


def test_grpo_clips_above_for_positive_advantage():
    # ratios 1.5, 0.5 on two valid tokens (third is padding); A = +1, ε = 0.2.
    # token 1: min(1.5, clip(1.5)=1.2) = 1.2 -> loss −1.2 (clipped); token 2: min(0.5, 0.8) = 0.5 -> −0.5.
    # seq-mean-token-mean over one sequence: (−1.2 − 0.5) / 2 = −0.85.
    lp, old, mask = t([[L(1.5), L(0.5), 7.0]]), t([[0.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0]])
    loss, m = compute_policy_loss("grpo", lp, old, t([1.0]), mask)
    assert loss.item() == pytest.approx(-0.85)
    assert m["clip_frac"] == pytest.approx(0.5) and m["clip_frac_high"] == pytest.approx(0.5)
    assert m["clip_frac_low"] == 0
    assert m["ratio_mean"] == pytest.approx(1.0)  # (1.5 + 0.5) / 2; padding ignored
    assert m["approx_kl"] == pytest.approx(-(L(1.5) + L(0.5)) / 2)


def test_grpo_clips_below_for_negative_advantage():
    # A = −1: token 1: −min(−1.5, −1.2) = 1.5 (unclipped); token 2: −min(−0.5, −0.8) = 0.8 (clipped at 0.8).
    lp, old, mask = t([[L(1.5), L(0.5)]]), t([[0.0, 0.0]]), torch.tensor([[1, 1]])
    loss, m = compute_policy_loss("grpo", lp, old, t([-1.0]), mask)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert m["clip_frac"] == pytest.approx(0.5) and m["clip_frac_low"] == pytest.approx(0.5)


def test_dapo_clip_higher_and_token_mean():
    # Sequence 1: ratios 1.5, 1.0, A = +1 -> per token −1.28 (clip-higher ε_hi = 0.28), −1.0.
    # Sequence 2: ratio 0.5 (one token), A = −1 -> −min(−0.5, −0.8) = 0.8.
    lp = t([[L(1.5), 0.0], [L(0.5), 0.0]])
    old = torch.zeros_like(lp)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = t([1.0, -1.0])
    loss, _ = compute_policy_loss("dapo", lp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 0.8) / 3)  # token-mean over the 3 valid tokens
    # the same batch under GRPO's defaults: ε_hi 0.2, seq-mean-token-mean
    loss, _ = compute_policy_loss("grpo", lp, old, adv, mask)
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 0.8) / 2)
    # overrides win over the algorithm's defaults
    loss, _ = compute_policy_loss("grpo", lp, old, adv, mask, clip_high=0.28, loss_agg="token-mean")
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 0.8) / 3)


def test_aggregation_modes_by_hand():
    loss = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    # micro-batches with the batch's totals sum to the whole-batch value
    for mode, kw in (("token-mean", {"num_tokens": 4}), ("seq-mean-token-mean", {"num_seqs": 2})):
        parts = sum(aggregate_loss(loss[i:i + 1], mask[i:i + 1], mode, **kw) for i in range(2))
        assert parts.item() == pytest.approx(aggregate_loss(loss, mask, mode).item())
    # a sequence without valid tokens contributes 0, never NaN
    assert aggregate_loss(loss, torch.zeros_like(mask), "seq-mean-token-mean").item() == 0
    with pytest.raises(ValueError, match="unknown loss_agg"):
        aggregate_loss(loss, mask, "mean")


def test_defaults_per_algorithm():
    assert (ALGORITHMS["grpo"].clip_low, ALGORITHMS["grpo"].clip_high) == (0.2, 0.2)
    assert (ALGORITHMS["dapo"].clip_low, ALGORITHMS["dapo"].clip_high) == (0.2, 0.28)
    assert (ALGORITHMS["gspo"].clip_low, ALGORITHMS["gspo"].clip_high) == (3e-4, 4e-4)
    assert ALGORITHMS["dapo"].loss_agg == "token-mean"
    assert ALGORITHMS["grpo"].loss_agg == ALGORITHMS["gspo"].loss_agg == "seq-mean-token-mean"


def test_bad_arguments_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'.*grpo"):
        compute_policy_loss("ppo", x, x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="advantages must be"):
        compute_policy_loss("grpo", x, x, torch.zeros(2, 3), x)


# ------------------------------------------------------------------------------------ GSPO


def test_gspo_sequence_ratio_value_and_clipping():
    # seq 1: token log-ratios 0.1, 0.3 -> s = exp(0.2); seq 2: 0.0001, 0.0001 -> s = exp(1e-4) (inside 1 ± 4e-4)
    old = torch.zeros(2, 2, dtype=torch.float64)
    lp = t([[0.1, 0.3], [1e-4, 1e-4]])
    mask = torch.ones(2, 2)
    loss, m = compute_policy_loss("gspo", lp, old, t([1.0, 1.0]), mask)
    s2 = math.exp(1e-4)
    # seq 1 clipped at 1 + 4e-4, seq 2 not; every token of a sequence carries its sequence's value
    assert loss.item() == pytest.approx((-(1 + 4e-4) - s2) / 2)
    assert m["clip_frac"] == pytest.approx(0.5)


def test_gspo_gradient_is_the_sequence_level_gradient():
    """∇_logp_t of the GSPO loss = −A_i · s_i / |y_i| / N on every valid token (unclipped)."""
    torch.manual_seed(0)
    N, T = 3, 5
    old = torch.randn(N, T, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    lp = (old + 1e-5 * torch.randn(N, T, dtype=torch.float64)).requires_grad_()
    adv = t([0.7, -1.3, 2.0])
    loss, m = compute_policy_loss("gspo", lp, old, adv, mask)
    assert m["clip_frac"] == 0
    loss.backward()
    lengths = mask.sum(-1).double()
    s = torch.exp(((lp.detach() - old) * mask).sum(-1) / lengths)
    expected = (-adv * s / lengths / N).unsqueeze(-1) * mask
    torch.testing.assert_close(lp.grad, expected)


def test_gspo_clipped_sequence_has_no_gradient():
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = t([[0.5, 0.5]]).requires_grad_()
    loss, _ = compute_policy_loss("gspo", lp, old, t([1.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.all(lp.grad == 0)


# ------------------------------------------------------------------------------------ advantages, KL


def _loop_reference(rewards: list[float], G: int, eps: float = 1e-6) -> list[float]:
    out = []
    for g in range(0, len(rewards), G):
        grp = rewards[g:g + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (G - 1))
        out += [(r - mean) / (std + eps) for r in grp]
    return out


def test_group_advantages_match_a_loop_reference():
    torch.manual_seed(1)
    rewards = torch.rand(6 * 4, dtype=torch.float64)
    rewards[4:8] = 0.5  # a group with all-equal rewards
    adv = group_advantages(rewards, 4)
    torch.testing.assert_close(adv, torch.tensor(_loop_reference(rewards.tolist(), 4), dtype=torch.float64))
    assert torch.all(adv[4:8] == 0)
    # by hand: [1, 0] -> mean 0.5, unbiased std 0.7071 -> ±0.7071
    assert group_advantages(t([1.0, 0.0]), 2).tolist() == pytest.approx([0.5 / (0.5 ** 0.5 + 1e-6), -0.5 / (0.5 ** 0.5 + 1e-6)])
    assert group_advantages(t([1.0, 0.0]), 2, scale_by_std=False).tolist() == [0.5, -0.5]
    assert torch.all(group_normalize(t([3.0, 1.0]), 1) == 0)  # a group of one gets 0
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)


def test_all_equal_groups():
    r = t([1, 1, 1, 0, 1, 0.5, 0, 0, 0])
    assert all_equal_groups(r, 3).tolist() == [True, False, True]


def test_kl_estimators():
    lp = t([[-1.0, -2.0]])
    assert torch.all(kl_k3(lp, lp) == 0) and torch.all(kl_k1(lp, lp) == 0) and torch.all(kl_k2(lp, lp) == 0)
    ref = t([[-1.5, -1.0]])  # x = ref − logp = −0.5, 1.0
    torch.testing.assert_close(kl_k1(lp, ref), t([[0.5, -1.0]]))
    torch.testing.assert_close(kl_k2(lp, ref), t([[0.125, 0.5]]))
    torch.testing.assert_close(kl_k3(lp, ref), t([[math.exp(-0.5) + 0.5 - 1, math.e - 2]]))
    assert torch.all(kl_k3(lp, ref) >= 0)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), kl_k2(lp, ref))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")


# ------------------------------------------------------------------------------------ dual-clip, k3 cap


def test_dual_clip_caps_negative_advantage_tokens_at_minus_a_times_c():
    # A = −1 on ratios 5.0, 1.5, 0.5 with c = 3: the clipped surrogate gives max(5, 1.2) = 5, 1.5 and
    # max(0.5, 0.8) = 0.8; the dual clip caps the first at −A·c = 3. seq-mean-token-mean: (3 + 1.5 + 0.8) / 3.
    lp = t([[L(5.0), L(1.5), L(0.5)]]).requires_grad_()
    old, mask = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3)
    loss, m = compute_policy_loss("grpo", lp, old, t([-1.0]), mask, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((3 + 1.5 + 0.8) / 3)
    assert m["clip_frac_dual"] == pytest.approx(1 / 3)
    loss.backward()
    # the capped token's loss is a constant: no gradient; the unclipped one has −A·r/3 = 0.5; the clipped one 0
    torch.testing.assert_close(lp.grad, t([[0.0, 1.5 / 3, 0.0]]))
    plain, _ = compute_policy_loss("grpo", lp.detach(), old, t([-1.0]), mask)
    assert plain.item() == pytest.approx((5 + 1.5 + 0.8) / 3)  # off by default


def test_dual_clip_leaves_positive_advantages_and_other_losses_alone():
    lp, old, mask = t([[L(5.0), L(0.5)]]), torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2)
    for algo in ("grpo", "dapo"):
        with_c, m = compute_policy_loss(algo, lp, old, t([1.0]), mask, clip_ratio_c=3.0)
        without, _ = compute_policy_loss(algo, lp, old, t([1.0]), mask)
        assert with_c.item() == without.item() and m["clip_frac_dual"] == 0
    with pytest.raises(ValueError, match="dual-clip needs c > 1 and a token-ratio loss"):
        compute_policy_loss("gspo", lp, old, t([-1.0]), mask, clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="dual-clip needs c > 1"):
        compute_policy_loss("grpo", lp, old, t([-1.0]), mask, clip_ratio_c=1.0)


def test_one_extreme_token_cannot_blow_up_the_k3_term():
    # x = ref − logp = 25 (clamped to 20): unclamped k3 would be e^20 − 21 ≈ 4.9e8; it is capped at 10,
    # and the capped token passes no gradient. The other tokens keep their exact k3 and gradient.
    lp = t([[-25.0, -1.0, -2.0]]).requires_grad_()
    ref = t([[0.0, -1.5, -1.0]])
    kl = kl_k3(lp, ref)
    torch.testing.assert_close(kl.detach(), t([[10.0, math.exp(-0.5) + 0.5 - 1, math.e - 2]]))
    aggregate_loss(kl, torch.ones(1, 3), "token-mean").backward()
    # d k3 / d logp = 1 − e^x  (x = ref − logp), divided by the 3 tokens of the mean
    torch.testing.assert_close(lp.grad, t([[0.0, (1 - math.exp(-0.5)) / 3, (1 - math.e) / 3]]))
    assert torch.isfinite(lp.grad).all()


def test_truncated_importance_weights_by_hand():
    # π_old / π_rollout = 2, 0.5, 4 (log-space inputs); C = 3 truncates the last to 3. No gradient flows.
    old = t([[L(0.4), L(0.1), L(0.8)]]).requires_grad_()
    rollout = t([[L(0.2), L(0.2), L(0.2)]])
    w = truncated_is_weights(old, rollout, 3.0)
    torch.testing.assert_close(w, t([[2.0, 0.5, 3.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap C must be > 0"):
        truncated_is_weights(old, rollout, 0.0)


def test_token_weights_scale_each_tokens_loss_before_aggregation():
    # ratio 1 everywhere (logp = old), A = 1: each token's loss is −1; weights 2, 0.5, 3 on a token-mean
    # over 3 tokens give −(2 + 0.5 + 3) / 3, and the gradient of token t is −w_t / 3.
    lp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old, mask, w = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3), t([[2.0, 0.5, 3.0]])
    loss, m = compute_policy_loss("dapo", lp, old, t([1.0]), mask, token_weights=w)
    assert loss.item() == pytest.approx(-(2 + 0.5 + 3) / 3)
    assert m["tis_weight_mean"] == pytest.approx((2 + 0.5 + 3) / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-2 / 3, -0.5 / 3, -1.0]]))
    plain, m = compute_policy_loss("dapo", lp.detach(), old, t([1.0]), mask)
    assert plain.item() == pytest.approx(-1.0) and "tis_weight_mean" not in m
    with pytest.raises(ValueError, match="token_weights must be"):
        compute_policy_loss("dapo", lp, old, t([1.0]), mask, token_weights=w[:, :2])
