"""Supervised (next-token) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism.core.example import IGNORE_INDEX
from prism.models.logprobs import head_log_probs


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


def head_token_nll(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   logits_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`shifted_token_nll(head(hidden), labels)` without the [B, T, V] logits.

    hidden: [B, T, H] final hidden states (prism.models.logprobs.final_hidden_states); head: the
    output projection; labels: [B, T] as above. Only the positions that predict a labelled token go
    through the head, `logits_chunk` of them at a time (checkpointed under gradients), so the head's
    compute is spent on the response alone and peak logits memory is logits_chunk x V floats.
    Returns (nll_sum: scalar float32, n_tokens: scalar long), as shifted_token_nll.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    log_probs, _ = head_log_probs(hidden[:, :-1][keep].unsqueeze(0), head, targets[keep].unsqueeze(0),
                                  logits_chunk=logits_chunk)
    return -log_probs.sum(), keep.sum()
