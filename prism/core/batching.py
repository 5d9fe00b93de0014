"""Batch layout helpers: token-budget batches, and text positions of padded rows.

Token-budget batching splits rows into batches whose padded size stays within a token budget.

A padded batch costs rows × longest-row tokens of activation memory, whatever the mean length, so
a fixed number of rows per batch either wastes memory on short responses or runs out of it on long
ones. Here rows are sorted by length (similar lengths share a batch: little padding) and packed
greedily while rows × longest ≤ budget; a row longer than the budget gets a batch of its own. All
prism losses are normalised by the token / sequence counts of the whole step, so how the rows of a
step are split changes memory and speed, not the update.
"""

from __future__ import annotations

from typing import Sequence

import torch


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices grouped into batches with len(batch) × max(length in batch) ≤ budget (see module doc)."""
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the row being added is the batch's longest
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (0 on padding), for inputs without images.

    With images the Qwen-VL models derive their multimodal rotary positions from the attention
    mask themselves; without, they would number every slot 0..T-1 and shift left-padded rows.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
