"""Log-probs of a model on given (prompt, response) pairs: one function for policy, old policy,
reference and evaluation alike.

    log_probs, entropy = token_log_probs(model, rollouts, temperature=1.0, chunk_size=16, with_entropy=True)

The forward runs on [prompt ; response] in the layout generation used (left-padded prompt,
right-padded response). Logits are never materialised for the whole [N, T, V] batch: rows go
through the model `chunk_size` at a time, and inside a forward the final hidden states of the
response positions (captured at the decoder's last norm) go through the output head
`logits_chunk` tokens at a time — under gradients each slice is checkpointed, so its [tokens, V]
logits are recomputed in the backward pass instead of being kept. Peak logits memory is then
logits_chunk × V floats (e.g. 2048 × 151,936 × 4 B = 1.2 GB for Qwen vocabularies) whatever the
batch and response length.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from prism.core.batching import token_budget_batches
from prism.core.rollouts import Rollouts
from prism.models.loader import is_fully_sharded, unwrap


def logits_to_log_probs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False,
                        suppress: torch.Tensor | None = None):
    """log softmax(logits)[tokens] and (optionally) the entropy of softmax(logits).

    logits: [..., V]; tokens: [...]; suppress: ids the sampler never emits (their logits are
    −inf here too, so these log-probs are those of the distribution that was sampled from).
    Returns ([...] float32, [...] float32 | None). Computed as logit − logsumexp in float32.
    """
    logits = logits.float()
    if suppress is not None and len(suppress):
        logits = logits.index_fill(-1, suppress.to(logits.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        p = torch.softmax(logits, dim=-1)
        # H = lse − Σ p·logit, over finite logits (a suppressed id has p = 0 and must not give 0 · ∞)
        entropy = lse - (p * torch.where(torch.isfinite(logits), logits, 0.0)).sum(-1)
    return log_probs, entropy


def head_log_probs(hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, suppress: torch.Tensor | None = None, logits_chunk: int = 2048):
    """Log-probs (and entropies) of `tokens` [n, T] from final hidden states `hidden` [n, T, H] through the
    output `head`, `logits_chunk` tokens at a time (checkpointed when gradients are on)."""
    n, T, H = hidden.shape
    flat_h, flat_t = hidden.reshape(n * T, H), tokens.reshape(n * T)

    def piece(h: torch.Tensor, t: torch.Tensor):
        # head(h), not F.linear(h, head.weight): under ZeRO-3 the module call gathers the sharded weight
        lp, ent = logits_to_log_probs(head(h) / temperature, t, with_entropy, suppress)
        return (lp, ent) if with_entropy else (lp,)

    lps, ents = [], []
    for s in range(0, n * T, logits_chunk):
        h, t = flat_h[s: s + logits_chunk], flat_t[s: s + logits_chunk]
        out = checkpoint(piece, h, t, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t)
        lps.append(out[0])
        if with_entropy:
            ents.append(out[1])
    lp = torch.cat(lps).view(n, T) if lps else hidden.new_zeros(n, T, dtype=torch.float32)
    ent = (torch.cat(ents).view(n, T) if ents else torch.zeros_like(lp)) if with_entropy else None
    return lp, ent


def token_log_probs(
    model: torch.nn.Module,
    rollouts: Rollouts,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    logits_chunk: int = 2048,
    token_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N, T] of `rollouts.response_ids` under `model` (0 outside the mask).

    temperature: logits are divided by it (match the sampling temperature; 0 is treated as 1).
    chunk_size: rows per forward (None: all at once). token_budget: instead, rows per forward such
    that rows × longest row ≤ budget (prism.core.batching). with_entropy: also return [N, T]
    entropies. logits_chunk: tokens per output-head slice (bounds the logits memory; module doc).
    """
    n = len(rollouts)
    if token_budget:
        groups = token_budget_batches(rollouts.sequence_lengths.tolist(), token_budget)
    else:
        step = chunk_size or max(n, 1)
        groups = [list(range(s, min(s + step, n))) for s in range(0, n, step)]
    if len(groups) <= 1:
        return _log_probs(model, rollouts, temperature, with_entropy, logits_chunk)
    T = rollouts.response_ids.shape[1]
    device = next(model.parameters()).device
    lp = torch.zeros(n, T, device=device)
    ent = torch.zeros(n, T, device=device) if with_entropy else None
    for rows in groups:
        part_lp, part_ent = _log_probs(model, rollouts.select(rows), temperature, with_entropy, logits_chunk)
        idx = torch.as_tensor(rows, device=device)
        lp = lp.index_put((idx,), torch.nn.functional.pad(part_lp, (0, T - part_lp.shape[1])))
        if with_entropy:
            ent = ent.index_put((idx,), torch.nn.functional.pad(part_ent, (0, T - part_ent.shape[1])))
    return lp, ent


def _log_probs(model: torch.nn.Module, part: Rollouts, temperature: float, with_entropy: bool,
               logits_chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over all rows of `part`: [n, T] log-probs (and entropies), 0 outside the mask."""
    device = next(model.parameters()).device
    temperature = temperature if temperature > 0 else 1.0
    T = part.response_ids.shape[1]
    if T == 0:
        empty = part.log_probs.new_zeros(len(part), 0, device=device)
        return empty, (empty if with_entropy else None)
    inputs = {k: v.to(device) for k, v in part.model_inputs().items()}
    hidden = final_hidden_states(model, inputs)[:, -(T + 1):-1]  # position t predicts response token t
    lp, ent = head_log_probs(hidden, output_head(model), part.response_ids.to(device), temperature, with_entropy,
                             part.suppress_ids, logits_chunk)
    mask = part.response_mask.to(device)
    return lp.masked_fill(~mask, 0.0), (ent.masked_fill(~mask, 0.0) if with_entropy else None)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output head (lm_head) of a policy, through any DDP / DeepSpeed / PEFT wrapper."""
    return unwrap(model).get_output_embeddings()


def final_hidden_states(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """[B, S, H] hidden states after the decoder's final norm, i.e. what the output head would see.

    The forward is the model's own (through its wrapper, so DDP / DeepSpeed hooks run) with
    logits_to_keep=1: its head only sees the last position, and no [B, S, V] logits exist. The
    caller sends the positions it needs through `head_log_probs`, a slice at a time.
    """
    final_norm = unwrap(model).get_decoder().norm
    captured = []
    hook = final_norm.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        out = model(**{**inputs, "logits_to_keep": 1, "use_cache": False})
    finally:
        hook.remove()
    hidden = captured[-1]
    if is_fully_sharded(model) and torch.is_grad_enabled():
        # FSDP2 readies the backward of its root shard group (embeddings, output head, ...) from the root
        # forward's *outputs*; a loss on `hidden` alone never passes through them and the embedding
        # gradient is lost. Tie the output in (this adds exactly zero).
        hidden = hidden + 0.0 * out.logits.sum()
    return hidden
