"""The token ids every backend needs from a model: where sampling stops and what it never samples."""

from __future__ import annotations

import torch

from prism.models.loader import unwrap


def vision_ids(model: torch.nn.Module) -> list[int]:
    """Vision placeholder tokens: a sampled one would be read as an image slot by the next forward."""
    cfg = getattr(unwrap(model), "config", None)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({i for i in (getattr(cfg, n, None) for n in names) if isinstance(i, int)})


def eos_ids(model: torch.nn.Module, processor) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (Qwen: <|im_end|>, <|endoftext|>)."""
    ids = {processor.tokenizer.eos_token_id}
    extra = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)
