"""With the paper configs' settings (configs/paper/, docs/fidelity.md), prism's losses equal the reference
formulas — written here independently, one token at a time, from the papers and verl's documentation
(vanilla PPO loss with dual-clip, GSPO, low-variance k3 KL, token / sequence aggregation, the PRISM
advantage and Bradley–Terry loss, DAPO's group filter) — on random float64 inputs with ragged masks:
values and gradients to 1e-6."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from prism.align.losses import alignment_advantages, discriminator_loss
from prism.losses.advantages import all_equal_groups
from prism.losses.kl import kl_penalty
from prism.losses.policy import compute_policy_loss

TOL = dict(atol=1e-6, rtol=1e-6)


def _inputs(seed: int, n: int = 6, T: int = 7, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)  # ragged, every row at least one token
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    log_probs = (old + spread * torch.randn(n, T, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return log_probs, old, adv, mask


def _vanilla_token_loss(lp: float, old: float, a: float, lo: float, hi: float, c: float | None) -> float:
    """verl's vanilla PPO token loss: −A·r against its clipped twin, the larger; dual-clip caps A < 0 at −A·c."""
    r = math.exp(max(-20.0, min(20.0, lp - old)))
    loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


def _reference_token_mean(log_probs, old, adv, mask, lo, hi, c):
    total, count = 0.0, 0
    for i in range(log_probs.shape[0]):
        for t in range(log_probs.shape[1]):
            if mask[i, t]:
                total = total + _torch_token(log_probs[i, t], old[i, t], adv[i], lo, hi, c)
                count += 1
    return total / count


def _torch_token(lp, old, a, lo, hi, c):
    """The same token loss as `_vanilla_token_loss`, on a scalar tensor, so that it has a gradient."""
    r = torch.exp((lp - old).clamp(-20, 20))
    loss = torch.maximum(-a * r, -a * r.clamp(1 - lo, 1 + hi))
    if c is not None and a < 0:
        loss = torch.minimum(loss, -a * torch.tensor(c, dtype=loss.dtype))
    assert abs(float(loss.detach()) - _vanilla_token_loss(float(lp.detach()), float(old), float(a), lo, hi, c)) < 1e-12
    return loss


@pytest.mark.parametrize("algo, lo, hi", [("grpo", 0.2, 0.2), ("dapo", 0.2, 0.28)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_and_dapo_with_token_mean_and_dual_clip_equal_verl_vanilla(algo, lo, hi, seed):
    log_probs, old, adv, mask = _inputs(seed, spread=0.6)  # ratios well outside the clip range
    ours, _ = compute_policy_loss(algo, log_probs, old, adv, mask, loss_agg="token-mean", clip_ratio_c=3.0)
    (g_ours,) = torch.autograd.grad(ours, log_probs)
    ref = _reference_token_mean(log_probs, old, adv, mask, lo, hi, 3.0)
    (g_ref,) = torch.autograd.grad(ref, log_probs)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(g_ours, g_ref, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_equals_the_sequence_ratio_loss_with_seq_mean_token_mean(seed):
    log_probs, old, adv, mask = _inputs(seed, spread=1e-3)  # sequence ratios around the 3e-4 / 4e-4 clip
    ours, _ = compute_policy_loss("gspo", log_probs, old, adv, mask)
    (g_ours,) = torch.autograd.grad(ours, log_probs)
    per_seq = []
    for i in range(log_probs.shape[0]):
        toks = [t for t in range(log_probs.shape[1]) if mask[i, t]]
        seq_log_ratio = sum(log_probs[i, t] - old[i, t] for t in toks) / len(toks)
        losses = []
        for t in toks:  # s_i,t = sg(s_i) · π_t / sg(π_t)
            s = torch.exp(seq_log_ratio.detach() + log_probs[i, t] - log_probs[i, t].detach())
            losses.append(torch.maximum(-adv[i] * s, -adv[i] * s.clamp(1 - 3e-4, 1 + 4e-4)))
        per_seq.append(sum(losses) / len(toks))
    ref = sum(per_seq) / len(per_seq)
    (g_ref,) = torch.autograd.grad(ref, log_probs)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(g_ours, g_ref, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_k3_equals_verl_low_var_kl(seed):
    log_probs, _, _, mask = _inputs(seed)
    ref_lp = log_probs.detach() + 2.5 * torch.randn(log_probs.shape, dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(seed + 9))
    ours = kl_penalty(log_probs, ref_lp, "k3")
    (g_ours,) = torch.autograd.grad((ours * mask).sum(), log_probs)
    x = (ref_lp - log_probs).clamp(-20, 20)
    ref = (torch.exp(x) - x - 1).clamp(-10, 10)  # verl: kl = ref − logp; ratio = e^kl; (ratio − kl − 1) clamped
    (g_ref,) = torch.autograd.grad((ref * mask).sum(), log_probs)
    assert (ref.detach() >= 10).any()  # the cap is exercised
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(g_ours, g_ref, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_advantages_equal_the_paper_steps_one_to_three(seed):
    g = torch.Generator().manual_seed(seed)
    G, B = 4, 5
    s_v = torch.randn(B * G, generator=g, dtype=torch.float64)
    s_r = torch.randn(B * G, generator=g, dtype=torch.float64)
    valid = torch.rand(B * G, generator=g) > 0.35
    valid[:G] = False  # a group with no valid rollout
    ours = alignment_advantages(s_v, s_r, valid, G, alpha=0.5, format_penalty=1.5)
    ref = []
    for b in range(B):
        rows = range(b * G, (b + 1) * G)
        normalised = {}
        for name, s in (("v", s_v), ("r", s_r)):
            valid_scores = [float(s[i]) for i in rows if valid[i]]
            floor = (min(valid_scores) if valid_scores else 0.0) - 1.0  # step 1
            filled = [float(s[i]) if valid[i] else floor for i in rows]
            mean, std = statistics.fmean(filled), statistics.stdev(filled)  # step 2: unbiased std
            normalised[name] = [(x - mean) / (std + 1e-6) for x in filled]
        for k, i in enumerate(rows):  # step 3
            ref.append(0.5 * normalised["v"][k] + 0.5 * normalised["r"][k] - 1.5 * (not valid[i]))
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_discriminator_loss_equals_bradley_terry_over_valid_rollouts(seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    scores = {k: torch.randn(n, generator=g, dtype=torch.float64).requires_grad_() for k in ("tv", "pv", "tr", "pr")}
    valid = torch.rand(n, generator=g) > 0.3
    teacher = {"perception": scores["tv"], "reasoning": scores["tr"]}
    policy = {"perception": scores["pv"], "reasoning": scores["pr"]}
    ours, _ = discriminator_loss(teacher, policy, valid, reg=1e-3)
    idx = [i for i in range(n) if valid[i]]
    bt = sum(-torch.log(torch.sigmoid(scores["tv"][i] - scores["pv"][i])) for i in idx) / len(idx)
    bt = bt + sum(-torch.log(torch.sigmoid(scores["tr"][i] - scores["pr"][i])) for i in idx) / len(idx)
    reg = sum(sum(scores[k][i] ** 2 for i in idx) / len(idx) for k in scores) / 4  # prism: over valid rows
    ref = bt + 1e-3 * reg
    grads_ours = torch.autograd.grad(ours, list(scores.values()))
    grads_ref = torch.autograd.grad(ref, list(scores.values()))
    torch.testing.assert_close(ours, ref, **TOL)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dapo_group_filter_drops_exactly_the_groups_with_uniform_accuracy(seed):
    g = torch.Generator().manual_seed(seed)
    G, B = 4, 50
    accuracy = (torch.rand(B * G, generator=g) < torch.rand(B, generator=g).repeat_interleave(G) ** 3).double()
    dropped = all_equal_groups(accuracy, G)
    # verl / DAPO: keep a group iff the std of its metric is > 0
    reference = [statistics.pstdev(accuracy[b * G:(b + 1) * G].tolist()) == 0 for b in range(B)]
    assert dropped.tolist() == reference and 0 < sum(reference) < B
