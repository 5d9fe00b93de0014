"""Loss aggregation: how a [N, T] per-token loss becomes one scalar (docs/design.md §5).

This is where GRPO, DAPO and GSPO differ most, so it is one function with named modes:

    token-mean            Σ_{i,t} m·l / Σ_{i,t} m              every valid token of the batch weighs the same (DAPO)
    seq-mean-token-mean   (1/N) Σ_i [Σ_t m·l / Σ_t m]          every sequence weighs the same (GRPO, GSPO)
    seq-mean-token-sum    (1/N) Σ_i Σ_t m·l                    long sequences weigh more (Dr. GRPO without length norm)

Under gradient accumulation a micro-batch sees only part of the batch the mean is over; pass the
batch's totals as `num_tokens` (token-mean) or `num_seqs` (seq-* modes) and sum the micro-batch
losses, and the result equals the loss of the whole batch at once.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    loss_mat: [N, T] per-token loss; mask: [N, T] (bool or 0/1), 1 on tokens that count.
    num_tokens / num_seqs: the denominators to use instead of this batch's own (see module doc).
    Sequences with no valid token contribute 0 (never NaN).
    """
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=loss_mat.dtype)
        return masked.sum() / denom.clamp(min=1)
    seq_sum = masked.sum(-1)  # [N]
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        raise ValueError(f"unknown loss_agg {mode!r}; choose from {', '.join(LOSS_AGG_MODES)}")
    denom = loss_mat.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(denom), 1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is set (0 when none is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
