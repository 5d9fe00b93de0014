"""Layer 3 — the rollout engine: the sampling protocol (`RolloutBackend`) and its backends. The only
code in prism that samples from a model; SFT evaluation, ALIGN and RL all call it.

    rollouts = sample(model, processor, examples, SamplingParams(n=8, temperature=1.0))
"""

from prism.core.rollouts import Rollouts, SamplingParams
from prism.rollout.engine import (
           BACKENDS,
           HFBackend,
           RolloutBackend,
           make_backend,
           sample,
           sample_texts,
)
from prism.rollout.native import NativeBackend

__all__ = ["BACKENDS", "HFBackend", "NativeBackend", "RolloutBackend", "Rollouts", "SamplingParams", "make_backend",
           "sample", "sample_texts"]
