"""Pure loss functions over tensors. Shape legend: B prompts, G samples per prompt, N = B*G, T tokens, V vocab."""

from prism.losses.sft import shifted_token_nll

__all__ = ["shifted_token_nll"]
