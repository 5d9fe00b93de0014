"""Group-relative advantages (GRPO, docs/design.md §5).

Rollouts of one prompt are contiguous: rewards of shape [B·G] are viewed as [B, G].
"""

from __future__ import annotations

import torch


def group_normalize(scores: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """GN(s)_i = (s_i − mean_group(s)) / (std_group(s) + eps), unbiased std (docs/design.md §4 step 2, §5).

    scores: [B·G] float, groups contiguous. Returns [B·G]. A group whose scores are all equal
    gets 0 everywhere; a group of one (G = 1) gets 0 (its unbiased std is undefined).
    With scale_by_std=False only the group mean is subtracted (Dr. GRPO).
    """
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(scores.shape)}")
    if group_size == 1:
        return torch.zeros_like(scores)
    s = scores.view(-1, group_size)
    s = s if s.is_floating_point() else s.float()
    centred = s - s.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (s.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centred.view(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     scale_by_std: bool = True) -> torch.Tensor:
    """GRPO advantages A_i = (R_i − mean_g) / (std_g + eps): rewards [B·G] -> advantages [B·G]."""
    return group_normalize(rewards, group_size, eps=eps, scale_by_std=scale_by_std)


def all_equal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: groups whose rewards are all equal (no learning signal; DAPO drops them)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)
