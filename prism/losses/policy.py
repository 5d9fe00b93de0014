"""Clipped policy-gradient losses, registered by algorithm name (docs/design.md §5). Used by ALIGN and RL.

    loss, metrics = compute_policy_loss("grpo", log_probs, old_log_probs, advantages, response_mask)

Shapes: log_probs, old_log_probs, response_mask [N, T] (N = B·G sequences, T response tokens);
advantages [N], one per sequence, broadcast over its tokens. Notation: r_t = exp(logp_t − logp_old_t),
m = response mask, A = advantage, ε_lo / ε_hi the clip range.

Each algorithm is one function with the same signature, plus its defaults in `ALGORITHMS`;
`clip_low`, `clip_high` and `loss_agg` can be overridden per call, and `num_tokens` / `num_seqs`
pass batch totals to the aggregation under gradient accumulation (see prism.losses.aggregate).

Dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"; verl's
`clip_ratio_c`), for the token-ratio losses (grpo, dapo) when `clip_ratio_c` = c > 1 is given: the
loss of a token with A < 0 is capped at −A·c,

    l_t = min(−min(r_t·A, clip(r_t, 1−ε_lo, 1+ε_hi)·A), −A·c)   if A < 0,   unchanged if A ≥ 0,

so a token whose ratio ran far above 1 cannot push the loss (and the update) without bound.

Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training"; verl's `tis_imp_ratio_cap`), when the sampler's distribution π_rollout (e.g.
vLLM's kernels) differs from the trainer's π_old: each token's loss is weighted by

    w_t = min(π_old(y_t) / π_rollout(y_t), C)       (`truncated_is_weights`, `token_weights` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from prism.losses.aggregate import LOSS_AGG_MODES, aggregate_loss, masked_mean
from prism.losses.kl import MAX_LOG_RATIO


@dataclass(frozen=True)
class AlgoDefaults:
    clip_low: float
    clip_high: float
    loss_agg: str


PolicyLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
ALGORITHMS: dict[str, AlgoDefaults] = {}


def register(name: str, clip_low: float, clip_high: float, loss_agg: str):
    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        ALGORITHMS[name] = AlgoDefaults(clip_low, clip_high, loss_agg)
        return fn
    return wrap


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """Per-token −min(r·A, clip(r, 1−ε_lo, 1+ε_hi)·A) and where the clipped branch was taken."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


@register("grpo", clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean")
def grpo_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_low, clip_high):
    """GRPO (Shao et al. 2024, DeepSeekMath): token-level PPO clip with group-relative A.

    l_t = −min(r_t·A, clip(r_t, 1−ε_lo, 1+ε_hi)·A). Returns per-token loss, ratio, clipped mask, all [N, T].
    """
    log_ratio = (log_probs - old_log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss, clipped = _clipped_surrogate(ratio, advantages.unsqueeze(-1), clip_low, clip_high)
    return loss, ratio, clipped


@register("dapo", clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
def dapo_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_low, clip_high):
    """DAPO (Yu et al. 2025): the GRPO surrogate with clip-higher (ε_hi 0.28 > ε_lo 0.2), aggregated as a
    token mean over the whole batch. Dynamic sampling and overlong shaping live in the RL loop."""
    return grpo_loss(log_probs, old_log_probs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high)


@register("gspo", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean")
def gspo_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_low, clip_high):
    """GSPO (Zheng et al. 2025): a sequence-level ratio s_i = exp(Σ_t m_t(logp_t − logp_old_t) / Σ_t m_t).

    Per token s_i,t = sg(s_i) · π_t / sg(π_t): its value is s_i for every token of sequence i and its
    gradient is s_i ∇log π_t, so with seq-mean-token-mean the unclipped gradient is
    −A_i · s_i · (1/|y_i|) Σ_t ∇log π_t — the sequence-level policy gradient. Clipping (on s_i) is
    tiny (3e-4 / 4e-4) because a sequence ratio moves much less than a token ratio.
    """
    mask = response_mask.to(log_probs.dtype)
    seq_log_ratio = ((log_probs - old_log_probs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    seq_log_ratio = seq_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_probs - log_probs.detach()  # [N, T]
    ratio = torch.exp(token_log_ratio)
    loss, clipped = _clipped_surrogate(ratio, advantages.unsqueeze(-1), clip_low, clip_high)
    return loss, ratio, clipped


DUAL_CLIP = ("grpo", "dapo")
"""The losses with a per-token ratio, to which dual-clip applies (verl's GSPO loss has none either)."""


def dual_clip(loss_mat: torch.Tensor, advantages: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N, T] with tokens of A < 0 capped at −A·c (module doc), and where the cap was taken."""
    adv = advantages.unsqueeze(-1)
    cap = -adv * c
    capped = (adv < 0) & (loss_mat > cap)
    return torch.where(capped, cap.expand_as(loss_mat), loss_mat), capped


def compute_policy_loss(
    algo: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float | None = None,
    loss_agg: str | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | None = None,
    clip_ratio_c: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss of `algo` (grpo | dapo | gspo) with its defaults unless overridden.

    log_probs, old_log_probs, response_mask: [N, T]; advantages: [N]; token_weights: [N, T] or None,
    multiplied into each token's loss before aggregation (truncated importance sampling, module doc).
    Returns (scalar loss, metrics): `clip_frac` (tokens where the clipped branch is taken),
    `clip_frac_low` / `clip_frac_high` (of those, r below 1−ε_lo with A < 0 / above 1+ε_hi with A > 0),
    `approx_kl` (mean of logp_old − logp over tokens: KL(π_old‖π) by the k1 estimator), `ratio_mean`
    and, with `clip_ratio_c` (dual-clip, module doc), `clip_frac_dual` (tokens capped at −A·c); all token
    means over the response mask.
    """
    if algo not in POLICY_LOSSES:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {', '.join(POLICY_LOSSES)}")
    if log_probs.shape != old_log_probs.shape or log_probs.shape != response_mask.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must have the same [N, T] shape")
    if advantages.shape != log_probs.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{log_probs.shape[0]}], got {tuple(advantages.shape)}")
    if clip_ratio_c is not None and (algo not in DUAL_CLIP or clip_ratio_c <= 1):
        raise ValueError(f"clip_ratio_c={clip_ratio_c}: dual-clip needs c > 1 and a token-ratio loss "
                         f"({', '.join(sorted(DUAL_CLIP))}), not {algo}")
    d = ALGORITHMS[algo]
    clip_low = d.clip_low if clip_low is None else clip_low
    clip_high = d.clip_high if clip_high is None else clip_high
    loss_agg = d.loss_agg if loss_agg is None else loss_agg
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose from {', '.join(LOSS_AGG_MODES)}")

    loss_mat, ratio, clipped = POLICY_LOSSES[algo](
        log_probs, old_log_probs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high)
    capped = torch.zeros_like(clipped)
    if clip_ratio_c is not None:
        loss_mat, capped = dual_clip(loss_mat, advantages, clip_ratio_c)
    if token_weights is not None:
        if token_weights.shape != loss_mat.shape:
            raise ValueError(f"token_weights must be [N, T] = {tuple(loss_mat.shape)}, got {tuple(token_weights.shape)}")
        loss_mat = loss_mat * token_weights.detach()
    loss = aggregate_loss(loss_mat, response_mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)

    with torch.no_grad():
        adv = advantages.unsqueeze(-1)
        m = response_mask.bool()
        metrics = {
            "clip_frac": masked_mean(clipped.float(), m).item(),
            "clip_frac_low": masked_mean((clipped & (adv < 0)).float(), m).item(),
            "clip_frac_high": masked_mean((clipped & (adv > 0)).float(), m).item(),
            "approx_kl": masked_mean(old_log_probs - log_probs, m).item(),
            "ratio_mean": masked_mean(ratio, m).item(),
        }
        if clip_ratio_c is not None:
            metrics["clip_frac_dual"] = masked_mean(capped.float(), m).item()
        if token_weights is not None:
            metrics["tis_weight_mean"] = masked_mean(token_weights.float(), m).item()
    return loss, metrics


def truncated_is_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(logp_old_t − logp_rollout_t), C) [N, T], no gradient (module doc: truncated IS, Yao et
    al. 2025). old_log_probs: the trainer's π_old; rollout_log_probs: the sampler's, both [N, T]."""
    if cap <= 0:
        raise ValueError(f"the truncation cap C must be > 0, got {cap}")
    log_ratio = (old_log_probs - rollout_log_probs).detach().clamp(max=MAX_LOG_RATIO)
    return torch.exp(log_ratio).clamp(max=cap)
