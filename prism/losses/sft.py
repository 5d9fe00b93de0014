"""Supervised (next-token) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it sums over.

    logits: [B, T, V] — position t predicts token t + 1.
    labels: [B, T] — token ids, IGNORE_INDEX (-100) where no loss is taken.
    Returns (nll_sum: scalar float32, n_tokens: scalar long). Summing (not averaging) lets the
    caller normalise by the token count of the whole global batch, so gradient accumulation and
    data parallelism give the same update as one big batch.
    """
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()
