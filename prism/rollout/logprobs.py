"""Log-probs of a model on given (prompt, response) pairs: one function for policy, old policy,
reference and evaluation alike.

    log_probs, entropy = token_log_probs(model, rollouts, temperature=1.0, chunk_size=16, with_entropy=True)

The forward runs on [prompt ; response] in the layout generation used (left-padded prompt,
right-padded response), keeps logits only for the response positions (`logits_to_keep`), and
reduces them to per-token log-probs chunk by chunk over rows, so [N, T, V] is never
materialised for the whole batch. Gradients flow when called with grad enabled.
"""

from __future__ import annotations

import torch

from prism.rollout.engine import Rollouts


def logits_to_log_probs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False,
                        suppress: torch.Tensor | None = None):
    """log softmax(logits)[tokens] and (optionally) the entropy of softmax(logits).

    logits: [n, T, V]; tokens: [n, T]; suppress: ids the sampler never emits (their logits are
    −inf here too, so these log-probs are those of the distribution that was sampled from).
    Returns ([n, T] float32, [n, T] float32 | None). Computed as logit − logsumexp in float32.
    """
    logits = logits.float()
    if suppress is not None and len(suppress):
        logits = logits.index_fill(-1, suppress.to(logits.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        p = torch.softmax(logits, dim=-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 · log 0 = 0 for suppressed ids
    return log_probs, entropy


def token_log_probs(
    model: torch.nn.Module,
    rollouts: Rollouts,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N, T] of `rollouts.response_ids` under `model` (0 outside the mask).

    temperature: logits are divided by it (match the sampling temperature; 0 is treated as 1).
    chunk_size: rows per forward (None: all at once). with_entropy: also return [N, T] entropies.
    """
    device = next(model.parameters()).device
    temperature = temperature if temperature > 0 else 1.0
    n = len(rollouts)
    step = chunk_size or max(n, 1)
    lps, ents = [], []
    for start in range(0, n, step):
        part = rollouts if step >= n else rollouts.select(range(start, min(start + step, n)))
        T = part.response_ids.shape[1]
        if T == 0:
            lps.append(part.log_probs.new_zeros(len(part), 0))
            ents.append(part.log_probs.new_zeros(len(part), 0))
            continue
        inputs = {k: v.to(device) for k, v in part.model_inputs().items()}
        logits = model(**inputs, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        lp, ent = logits_to_log_probs(logits / temperature, part.response_ids.to(device), with_entropy,
                                      part.meta.get("suppress_ids"))
        mask = part.response_mask.to(device)
        lps.append(lp.masked_fill(~mask, 0.0))
        if with_entropy:
            ents.append(ent.masked_fill(~mask, 0.0))
    T_all = rollouts.response_ids.shape[1]

    def stack(chunks):
        return torch.cat([torch.nn.functional.pad(c, (0, T_all - c.shape[1])) for c in chunks], 0)

    return stack(lps), (stack(ents) if with_entropy else None)
