"""What a rollout backend returns and what it is asked for: `Rollouts` (typed, one field per
tensor) and `SamplingParams`. Shape legend: N sequences (B prompts × G samples, the G rollouts of
one prompt contiguous), P prompt tokens (left-padded), T response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prism.core.batching import text_position_ids


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    n: int = 1
    """Samples per prompt (the group size G)."""

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")


# Per-row tensors of a prompt batch (everything else — pixel_values, image_grid_thw — is per image).
_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class Rollouts:
    """N sampled responses with their prompts. Shapes: P prompt tokens (left-padded), T response tokens.

    prompt: processor outputs for the N prompts (input_ids / attention_mask [N, P], mm_token_type_ids,
        pixel_values [sum of patches, D], image_grid_thw [images, 3]).
    images_per_row: [N] number of images of each row's prompt (to slice pixel_values by row).
    response_ids [N, T] long, response_mask [N, T] bool (sampled tokens up to and including EOS),
    log_probs [N, T] float (sampling policy, 0 outside the mask).
    """

    prompt: dict[str, torch.Tensor]
    images_per_row: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    log_probs: torch.Tensor
    texts: list[str]
    finish_reasons: list[str]
    suppress_ids: torch.Tensor
    """[k] long: token ids the sampler never emitted (vision placeholders); the log-prob function masks
    them too, so both describe the distribution actually sampled. Required: a backend cannot forget it."""
    pad_token_id: int
    """Fills response_ids after EOS and input_ids of left padding."""
    group_size: int = 1

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[N] real tokens of each row: prompt (image tokens included) + response."""
        return self.prompt["attention_mask"].sum(-1) + self.response_lengths

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Rollouts":
        """The rows `rows` (in that order), with columns that became all-padding trimmed."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        prompt = select_prompt_rows(self.prompt, self.images_per_row, rows)
        keep_p = prompt["attention_mask"].any(0)
        first = int(keep_p.nonzero()[0]) if keep_p.any() else 0
        for k in _ROW_KEYS:
            if k in prompt:
                prompt[k] = prompt[k][:, first:]
        t = int(self.response_mask[rows].sum(-1).max()) if len(rows) else 0
        return Rollouts(
            prompt=prompt, images_per_row=self.images_per_row[rows],
            response_ids=self.response_ids[rows, :t], response_mask=self.response_mask[rows, :t],
            log_probs=self.log_probs[rows, :t], texts=[self.texts[i] for i in rows.tolist()],
            finish_reasons=[self.finish_reasons[i] for i in rows.tolist()], suppress_ids=self.suppress_ids,
            pad_token_id=self.pad_token_id, group_size=self.group_size,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Forward inputs for [prompt ; response]: the layout generation used (left/right padding)."""
        p = self.prompt
        inputs = {
            "input_ids": torch.cat([p["input_ids"], self.response_ids], 1),
            "attention_mask": torch.cat([p["attention_mask"], self.response_mask.to(p["attention_mask"].dtype)], 1),
        }
        if "mm_token_type_ids" in p:
            inputs["mm_token_type_ids"] = torch.cat(
                [p["mm_token_type_ids"], torch.zeros_like(self.response_ids, dtype=p["mm_token_type_ids"].dtype)], 1)
        for k, v in p.items():
            if k not in _ROW_KEYS:
                inputs[k] = v
        if "pixel_values" not in inputs:
            # Text only: the model would number positions 0..L-1 ignoring the left padding; generation
            # counted only real tokens, so do the same here.
            inputs["position_ids"] = text_position_ids(inputs["attention_mask"])
        return inputs

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """Stack rollouts (e.g. several generation rounds of DAPO's dynamic sampling)."""
        parts = [r for r in parts if len(r)]
        if len(parts) == 1:
            return parts[0]
        P = max(r.prompt["input_ids"].shape[1] for r in parts)
        T = max(r.response_ids.shape[1] for r in parts)
        prompt: dict[str, torch.Tensor] = {}
        for k in parts[0].prompt:
            vals = [r.prompt[k] for r in parts]
            if k in _ROW_KEYS:
                pad = 0 if k != "input_ids" else parts[0].pad_token_id
                vals = [torch.nn.functional.pad(v, (P - v.shape[1], 0), value=pad) for v in vals]
            prompt[k] = torch.cat(vals, 0)

        def right(name, value=0):
            return torch.cat([torch.nn.functional.pad(getattr(r, name), (0, T - getattr(r, name).shape[1]),
                                                      value=value) for r in parts], 0)

        return Rollouts(
            prompt=prompt, images_per_row=torch.cat([r.images_per_row for r in parts]),
            response_ids=right("response_ids", parts[0].pad_token_id),
            response_mask=right("response_mask", False), log_probs=right("log_probs", 0.0),
            texts=[t for r in parts for t in r.texts], finish_reasons=[f for r in parts for f in r.finish_reasons],
            suppress_ids=parts[0].suppress_ids, pad_token_id=parts[0].pad_token_id, group_size=parts[0].group_size,
        )


def select_prompt_rows(prompt: dict[str, torch.Tensor], images_per_row: torch.Tensor, rows: torch.Tensor) -> dict:
    """The prompt batch of `rows` (in that order, repeats allowed): per-row tensors indexed, and each row's
    images (image_grid_thw rows, pixel_values patches) gathered with it. Rows without an image get no image
    tensors at all: the Qwen-VL models fail on an empty pixel_values."""
    out = {k: prompt[k][rows] for k in _ROW_KEYS if k in prompt}
    grid = prompt.get("image_grid_thw")
    if grid is not None and int(images_per_row[rows].sum()) > 0:  # (text-only rows: no empty image tensors)
        first_image = torch.cumsum(images_per_row, 0) - images_per_row  # [N] index of each row's first image
        image_idx = torch.cat([torch.arange(int(first_image[r]), int(first_image[r] + images_per_row[r]))
                               for r in rows.tolist()]) if len(rows) else torch.zeros(0, dtype=torch.long)
        patches = grid.prod(-1)  # rows of pixel_values per image
        first_patch = torch.cumsum(patches, 0) - patches
        patch_idx = (torch.cat([torch.arange(int(first_patch[i]), int(first_patch[i] + patches[i]))
                                for i in image_idx.tolist()]) if len(image_idx) else torch.zeros(0, dtype=torch.long))
        out["image_grid_thw"] = grid[image_idx]
        out["pixel_values"] = prompt["pixel_values"][patch_idx]
    return out
