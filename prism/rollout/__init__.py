"""The rollout engine: the only code in prism that samples."""

from prism.rollout.engine import SamplingParams, generate

__all__ = ["SamplingParams", "generate"]
