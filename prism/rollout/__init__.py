"""The rollout engine: the only code that samples, and the one log-prob function."""

from prism.rollout.engine import HFBackend, RolloutBackend, Rollouts, SamplingParams, generate, sample
from prism.rollout.logprobs import token_log_probs

__all__ = ["HFBackend", "RolloutBackend", "Rollouts", "SamplingParams", "generate", "sample", "token_log_probs"]
