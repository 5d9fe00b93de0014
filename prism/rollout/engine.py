"""The rollout engine: the only code in prism that samples from a model.

For now it has one backend (HF `generate`, KV cache, left padding, batched in chunks that bound
memory) and one entry point returning decoded response texts. The RL issue extends it with
per-token log-probs, response masks and finish reasons behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prism.data.collate import encode_prompts
from prism.data.example import Example


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0


@torch.no_grad()
def generate(
    model, processor, examples: Sequence[Example], params: SamplingParams, batch_size: int = 32
) -> list[str]:
    """Generate one response per example (the conversation up to its last assistant turn)."""
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    device = next(model.parameters()).device
    greedy = params.temperature <= 0
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in encode_prompts(processor, examples[i: i + batch_size]).items()}
            ids = model.generate(
                **batch,
                max_new_tokens=params.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p,
                top_k=None if greedy else params.top_k,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            new = ids[:, batch["input_ids"].shape[1]:]
            out.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
