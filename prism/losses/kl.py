"""Per-token KL estimators between the policy and a reference (Schulman, "Approximating KL
Divergence", 2020). With samples y ~ π and log-ratio x = log π_ref(y) − log π(y):

    k1 = −x                   unbiased, high variance, can be negative
    k2 = x² / 2               biased, low variance, ≥ 0
    k3 = min(eˣ − x − 1, 10)  unbiased (before the cap), low variance, ≥ 0   (docs/design.md §5: the default)

k3 grows like eˣ: one token whose reference log-prob is far above the policy's (x = 20 gives 5e8)
would dominate the loss and its gradient. As in verl's `low_var_kl`, the estimate is capped at
`K3_MAX` = 10 (reached at x ≈ 2.6, or x ≈ −11), where that token's gradient is 0.

All take log_probs and ref_log_probs of shape [N, T] and return [N, T]; aggregate with
`prism.losses.aggregate.aggregate_loss` under the response mask.
"""

from __future__ import annotations

from typing import Callable

import torch

# A log-ratio beyond ±20 means a ratio of 5e8 or 2e-9: clipped (policy loss) or uninformative (KL) anyway,
# and exp() of it must not overflow float32. Shared by every loss that exponentiates a log-ratio.
MAX_LOG_RATIO = 20.0
K3_MAX = 10.0
"""Cap of the per-token k3 estimate (verl clamps it to [−10, 10]; k3 ≥ 0)."""


def _log_ratio(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return (ref_log_probs - log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return -_log_ratio(log_probs, ref_log_probs)


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    return 0.5 * _log_ratio(log_probs, ref_log_probs) ** 2


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    x = _log_ratio(log_probs, ref_log_probs)
    return (torch.exp(x) - x - 1).clamp(max=K3_MAX)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """[N, T] per-token KL estimate by name (k1 | k2 | k3)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](log_probs, ref_log_probs)
