"""Padding-free (packed) batches for Qwen-VL models.

A collated batch [B, T] is laid end to end in one row [1, S] (S = the number of real tokens), with
no attention mask and `position_ids` of shape [4, 1, S]: row 0 the text positions, restarting at 0
for every sequence, rows 1-3 the multimodal rotary (M-RoPE) positions of each sequence as the model
computes them for the padded batch. From the restarts transformers builds a block-diagonal causal
mask (sdpa / eager) or calls the variable-length flash-attention kernel, so each token attends to
its own sequence only, at the same positions as in the padded batch: the loss is the padded
batch's, without computing on padding. Images need no change: their features are placed at the
image tokens in order, and the order of the image tokens is kept.

Attention is not all a layer can carry across a boundary: the Gated-DeltaNet layers of the recurrent
families (Qwen3.5, dense and MoE) run a convolution window and a recurrent state along the row, which
would flow from one sequence into the next (their fused kernels take sequence boundaries; the PyTorch
ones do not). `sequences_apart` runs those layers one sequence at a time during a packed forward and its
backward, so every sequence starts from an empty state, as in the padded batch.

    packed = pack(model, batch)
    with sequences_apart(model, packed):
        loss = loss_of(model(**packed)); loss.backward()
"""

from __future__ import annotations

import contextlib
import types

import torch

from prism.core.example import IGNORE_INDEX
from prism.models.families import family_of
from prism.models.loader import unwrap


def _vl_model(model):
    """The Qwen-VL base model (the one with `get_rope_index`) inside peft / accelerate wrappers."""
    m = unwrap(model)
    inner = getattr(m, "model", m)
    if not hasattr(inner, "get_rope_index"):
        raise TypeError(f"{type(m).__name__}: padding-free batches need a Qwen-VL model (no get_rope_index)")
    return inner


@torch.no_grad()
def mrope_positions(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[3, B, T] M-RoPE positions of a padded batch, as the model's own forward would compute them."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if "image_grid_thw" not in batch and "video_grid_thw" not in batch:  # text only: plain positions
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1)
    types = batch.get("mm_token_type_ids")
    if types is None:
        raise ValueError("padding-free batches with images need the processor's mm_token_type_ids")
    pos, _ = _vl_model(model).get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=mask)
    return pos


def pack(model, batch: dict[str, torch.Tensor]) -> dict:
    """A collated (left- or right-padded) batch as one padding-free row.

    batch: input_ids / attention_mask / labels [B, T] (+ mm_token_type_ids [B, T], pixel_values,
    image_grid_thw). Returns input_ids / labels [1, S], position_ids [4, 1, S], the image inputs
    unchanged, no attention_mask and use_cache=False. The label of each sequence's first token is
    IGNORE_INDEX, so no loss is taken across a boundary (position t predicts token t + 1).
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1)
    text_pos = torch.cat([torch.arange(int(n), device=mask.device) for n in lengths])
    rope = mrope_positions(model, batch)[:, mask]  # [3, S], rows in order
    out = {k: v for k, v in batch.items() if k not in ("attention_mask", "input_ids", "labels", "mm_token_type_ids")}
    out["use_cache"] = False  # transformers detects packed sequences only without a cache
    out["input_ids"] = batch["input_ids"][mask][None]
    out["position_ids"] = torch.cat([text_pos[None], rope.to(text_pos.dtype)])[:, None]
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][mask][None]
    if "labels" in batch:
        labels = batch["labels"][mask].clone()
        starts = torch.cumsum(lengths, 0) - lengths
        labels[starts] = IGNORE_INDEX
        out["labels"] = labels[None]
    return out


@contextlib.contextmanager
def sequences_apart(model, packed: dict):
    """During the block, each Gated-DeltaNet layer of `model` runs the packed row `packed` (from `pack`) one
    sequence at a time, with no state carried from one to the next. Keep the backward inside the block
    (gradient checkpointing recomputes the layers there). A model of another family: nothing changes."""
    family = family_of(model)
    if family is None or not family.recurrent:
        yield
        return
    text_positions = packed["position_ids"][0, 0]
    starts = (text_positions == 0).nonzero().squeeze(-1).tolist() + [text_positions.shape[0]]
    lengths = [b - a for a, b in zip(starts, starts[1:]) if b > a]
    layers = [layer.linear_attn for layer in unwrap(model).model.language_model.layers if hasattr(layer, "linear_attn")]

    def per_sequence(self, hidden_states, *args, cache=None, attention_mask=None, **kwargs):
        pieces = hidden_states.split(lengths, dim=1)
        return torch.cat([type(self).forward(self, piece, cache=None, attention_mask=None) for piece in pieces], 1)

    for layer in layers:
        layer.forward = types.MethodType(per_sequence, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
