"""Layer 4 — pure loss functions over tensors. Shape legend: B prompts, G samples per prompt, N = B*G, T tokens, V vocab.

    compute_policy_loss(algo, log_probs, old_log_probs, advantages, response_mask)   # grpo | dapo | gspo
    aggregate_loss(loss_mat, mask, mode)                                            # token-mean | seq-mean-token-*
    group_advantages(rewards, group_size)                                           # GRPO advantages
    kl_penalty(log_probs, ref_log_probs, "k3")                                      # k1 | k2 | k3
"""

from prism.losses.advantages import all_equal_groups, group_advantages, group_normalize
from prism.losses.aggregate import aggregate_loss, masked_mean
from prism.losses.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from prism.losses.policy import ALGORITHMS, compute_policy_loss
from prism.losses.sft import shifted_token_nll

__all__ = ["ALGORITHMS", "aggregate_loss", "all_equal_groups", "compute_policy_loss", "group_advantages",
           "group_normalize", "kl_k1", "kl_k2", "kl_k3", "kl_penalty", "masked_mean", "shifted_token_nll"]
