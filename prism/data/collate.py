"""Chat templating and collation: Examples -> model inputs, labels on assistant tokens only.

The assistant spans are found with the processor's own chat template, for any template: the
text of turn i is rendered once as a prompt (`messages[:i]` + generation prompt) and once with
the turn (`messages[:i+1]`); the characters in between are what the model must produce (its
closing end-of-turn token included, the whitespace after it not). Those character spans are
mapped to tokens through the tokenizer's offsets, after accounting for the processor's expansion
of each `<|image_pad|>` into one token per merged vision patch.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from prism.core.errors import DataError
from prism.core.example import IGNORE_INDEX, IMAGE_PLACEHOLDER, Example
from prism.data.images import example_images, image_bounds, image_size, resized_size


def to_chat(messages: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """prism messages (`<image>` placeholders in text) -> HF chat messages with image parts."""
    chat = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for i, piece in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if i > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        chat.append({"role": m["role"], "content": parts})
    return chat


def render(processor, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        to_chat(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_with_spans(processor, ex: Example) -> tuple[str, list[tuple[int, int]]]:
    """Full conversation text and the character span of every assistant turn in it."""
    text = render(processor, ex.messages)
    spans = []
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        prefix = render(processor, ex.messages[:i], add_generation_prompt=True)
        upto = render(processor, ex.messages[: i + 1])
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise DataError(
                f"{ex.source}: the chat template rewrites earlier turns, so assistant tokens cannot be "
                "located; use a template whose renderings are prefixes of each other"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def _expanded(text: str, spans: list[tuple[int, int]], pad: str, counts: list[int]) -> list[tuple[int, int]]:
    """Move character spans to the text after each `pad` was repeated `counts[k]` times."""
    pads = [m.start() for m in re.finditer(re.escape(pad), text)]
    if len(pads) != len(counts):
        raise DataError(f"{len(pads)} image tokens in the rendered text but {len(counts)} images")

    def shift(pos: int) -> int:
        return pos + sum((c - 1) * len(pad) for p, c in zip(pads, counts) if p < pos)

    return [(shift(a), shift(b)) for a, b in spans]


def _image_token_counts(processor, batch, examples: Sequence[Example]) -> list[list[int]]:
    """Number of `<|image_pad|>` tokens each image expands to, grouped by example."""
    grids = batch.get("image_grid_thw")
    merge = processor.image_processor.merge_size ** 2
    flat = [] if grids is None else [int(g.prod()) // merge for g in grids]
    out, k = [], 0
    for ex in examples:
        out.append(flat[k: k + len(ex.images)])
        k += len(ex.images)
    return out


class SFTCollator:
    """Pads a list of demonstrations into one batch; `labels` are -100 except assistant tokens.

    Returns input_ids, attention_mask, labels [B, T] and the processor's vision inputs
    (pixel_values, image_grid_thw, mm_token_type_ids) — exactly what the model's forward takes.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.pad = processor.image_token

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        images = example_images(self.processor, examples)
        rendered = [render_with_spans(self.processor, ex) for ex in examples]
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(
            text=[t for t, _ in rendered], images=images or None, return_tensors="pt",
            padding=True, return_offsets_mapping=True,
        )
        offsets = batch.pop("offset_mapping")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        counts = _image_token_counts(self.processor, batch, examples)
        for b, ((text, spans), n_img) in enumerate(zip(rendered, counts)):
            for a, e in _expanded(text, spans, self.pad, n_img):
                starts, ends = offsets[b, :, 0], offsets[b, :, 1]
                inside = (starts >= a) & (ends <= e) & (ends > starts) & batch["attention_mask"][b].bool()
                labels[b][inside] = batch["input_ids"][b][inside]
            if not (labels[b] != IGNORE_INDEX).any():
                raise DataError(f"{examples[b].source}: no assistant tokens to train on")
        batch["labels"] = labels
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            raise DataError(
                f"batch of length {batch['input_ids'].shape[1]} exceeds data.max_length={self.max_length}; "
                "filter with prism.data.collate.token_length first"
            )
        return dict(batch)


def encode_prompts(processor, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (conversation up to the final assistant turn) for generation."""
    texts = [render(processor, ex.prompt_messages, add_generation_prompt=True) for ex in examples]
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=texts, images=example_images(processor, examples, prompt_only=True) or None,
                          return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "right"
    return dict(batch)


def token_length(processor, ex: Example) -> int:
    """Tokens of the full conversation (image tokens included), without running the processor."""
    return token_lengths(processor, [ex])[0]


def token_lengths(processor, examples: Sequence[Example], batch_size: int = 1024) -> list[int]:
    """`token_length` of many examples, `batch_size` at a time: the chat texts rendered and tokenised
    in one call each, each image's size read from its file header (no pixel decode, once per path) and
    resized for its own bounds (`prism.data.images`), and the image token counts asked of the processor
    once per batch for its distinct sizes."""
    out: list[int] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start: start + batch_size]
        texts = processor.apply_chat_template([to_chat(ex.messages) for ex in part], tokenize=False)
        ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        sizes = [[resized_size(processor, *image_size(ref, ex.source), bounds)[::-1]  # (height, width)
                  for ref, bounds in zip(ex.images, image_bounds(processor, ex))] for ex in part]
        distinct = sorted({hw for row in sizes for hw in row})
        tokens_of = {}
        if distinct:
            counts = processor._get_num_multimodal_tokens(image_sizes=[list(hw) for hw in distinct])
            tokens_of = dict(zip(distinct, counts["num_image_tokens"]))
        for row, tokens in zip(sizes, ids):
            out.append(len(tokens) + sum(tokens_of[hw] - 1 for hw in row))  # each image token stands for its count
    return out
