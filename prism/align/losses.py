"""ALIGN's two pure functions (docs/design.md §4): the discriminator's Bradley–Terry loss and the policy's
alignment advantages. Shapes: N = B·G rollouts, the G rollouts of one prompt contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism.losses.advantages import group_normalize

COMPONENTS = ("perception", "reasoning")
"""The discriminator's experts, named by what they judge."""
SECTION_OF = {"perception": "caption", "reasoning": "think"}
"""The response section (docs/design.md §2) each expert scores."""


def discriminator_loss(
    teacher: dict[str, torch.Tensor],
    policy: dict[str, torch.Tensor],
    valid: torch.Tensor,
    reg: float = 1e-3,
    distinct: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D = mean_valid −log σ(t_v − p_v) + mean_valid −log σ(t_r − p_r) + reg · mean_valid (t_v² + p_v² + t_r² + p_r²)/4.

    teacher / policy: {"perception": [N], "reasoning": [N]} — scores of the teacher reference of each
    rollout's prompt and of the rollout itself; valid: [N] bool, format-valid rollouts (only they
    are compared). Metrics per expert: `acc` (teacher scored higher), `teacher` / `policy` mean
    scores, `gap` (teacher − policy). With no valid rollout the loss is 0 (keeping the graph, so a
    backward pass is still a no-op in every process) and `no_valid` is 1.
    distinct (metrics only): {"perception": [N] bool, ...}, rollouts whose section differs from the
    reference's. A rollout that copies the reference's caption cannot be told apart from it, so
    `acc` counts it as a miss; `acc_distinct` is the accuracy over the distinguishable pairs only.
    """
    valid = valid.bool()
    n_valid = int(valid.sum())
    ref = teacher["perception"]
    if n_valid == 0:
        zero = sum((teacher[e] * 0).sum() + (policy[e] * 0).sum() for e in COMPONENTS)
        return zero, {"no_valid": 1.0, "n_valid": 0.0}
    loss = ref.new_zeros(())
    squares = ref.new_zeros(())
    metrics: dict[str, float] = {"no_valid": 0.0, "n_valid": float(n_valid)}
    for e in COMPONENTS:
        t, p = teacher[e][valid], policy[e][valid]
        loss = loss + F.softplus(-(t - p)).mean()  # −log σ(t − p), computed stably
        squares = squares + (t ** 2).mean() + (p ** 2).mean()
        with torch.no_grad():
            metrics[f"{e}/acc"] = (t > p).float().mean().item()
            metrics[f"{e}/teacher"] = t.mean().item()
            metrics[f"{e}/policy"] = p.mean().item()
            metrics[f"{e}/gap"] = (t - p).mean().item()
            if distinct is not None:
                d = distinct[e].to(valid.device)[valid]
                metrics[f"{e}/distinct"] = d.float().mean().item()
                if d.any():
                    metrics[f"{e}/acc_distinct"] = (t[d] > p[d]).float().mean().item()
    loss = loss + reg * squares / 4
    metrics["loss"] = loss.item()
    return loss, metrics


def alignment_advantages(
    perception: torch.Tensor,
    reasoning: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    alpha: float = 0.5,
    format_penalty: float = 1.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A_i = α·GN(s_v)_i + (1 − α)·GN(s_r)_i − format_penalty·1[invalid_i]  (docs/design.md §4 steps 1–3).

    perception, reasoning: [N] discriminator scores s_v, s_r; valid: [N] bool. Step 1: an invalid
    rollout's scores become (the group's valid minimum) − 1, or −1 when no rollout of the group is
    valid. Step 2: GN normalises within each group (unbiased std, eps 1e-6; a group of one gets 0).
    Returns [N].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    valid = valid.bool().view(-1, group_size)

    def fill_invalid(s: torch.Tensor) -> torch.Tensor:
        s = s.view(-1, group_size)
        s = s if s.is_floating_point() else s.float()  # float64 stays float64
        group_min = torch.where(valid, s, torch.full_like(s, float("inf"))).min(dim=1, keepdim=True).values
        floor = torch.where(torch.isinf(group_min), torch.zeros_like(group_min), group_min) - 1.0
        return torch.where(valid, s, floor.expand_as(s)).reshape(-1)

    adv = (alpha * group_normalize(fill_invalid(perception), group_size, eps)
           + (1 - alpha) * group_normalize(fill_invalid(reasoning), group_size, eps))
    return adv - format_penalty * (~valid).reshape(-1).float()
