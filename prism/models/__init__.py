"""Model and processor loading, freezing, LoRA, and the tiny offline Qwen3-VL."""

from prism.models.loader import freeze, load_model, resolve_dtype
from prism.models.processor import load_processor

__all__ = ["freeze", "load_model", "load_processor", "resolve_dtype"]
