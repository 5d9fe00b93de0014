"""Layer 1 — models: loading a policy, reference or processor of any local Qwen-VL checkpoint
(freezing, LoRA, dtype), the tiny offline Qwen3-VL, and the forward pieces every stage shares:
final hidden states, the output head and token log-probs (`logprobs`)."""

from prism.models.loader import freeze, load_model, resolve_dtype
from prism.models.processor import load_processor

__all__ = ["freeze", "load_model", "load_processor", "resolve_dtype"]
