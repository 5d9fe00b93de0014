"""The clipped policy update on a batch of rollouts, shared by ALIGN and RL (docs/design.md §4, §5).

    update = ModelUpdate(accelerator, model, optimizer, params, max_grad_norm)
    metrics = policy_update(update, rollouts, advantages, cfg.algo, temperature=1.0, logprob_chunk_size=32)

Per call: `ppo_epochs` passes over the rollouts; each pass shuffles the prompt groups and splits
them into `mini_batches` optimizer steps; each optimizer step accumulates gradients over
micro-batches of `micro_batch_size` sequences. The loss of every micro-batch is normalised by the
token / sequence count of its whole mini-batch across all processes, so accumulation and data
parallelism give the same update as one big batch.

Old log-probs: with one epoch and one mini-batch the policy cannot move between sampling and the
update, so π_old = sg(π) (ratio exactly 1, the on-policy gradient) and no extra forward is
spent; otherwise they are recomputed once, before the first step, with the same forward.

The sampler's own log-probs (`rollouts.log_probs`) are compared with π_old over the response tokens:
`logprob_diff_mean` / `logprob_diff_max` (|π_rollout − π_old| in log space; verl's
`rollout_probs_diff`), which exposes a weight-sync or precision fault of the sampler, and with
`algo.tis_cap` they weight the loss (truncated importance sampling, `prism.losses.policy`).
"""

from __future__ import annotations

import torch

from prism.core.batching import token_budget_batches
from prism.core.config import AlgoSettings
from prism.core.rollouts import Rollouts
from prism.dist.update import ModelUpdate, reduce_mean
from prism.losses.aggregate import aggregate_loss, masked_mean
from prism.losses.kl import kl_penalty
from prism.losses.policy import ALGORITHMS, compute_policy_loss, truncated_is_weights
from prism.models.logprobs import token_log_probs


def _mini_batches(n_groups: int, group_size: int, k: int) -> list[torch.Tensor]:
    """Shuffle prompt groups and split them into k row-index mini-batches (groups never split)."""
    order = torch.randperm(n_groups)
    return [torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in part.tolist()])
            for part in order.tensor_split(k) if len(part)]


def _micro_batches(rollouts: Rollouts, rows: torch.Tensor, algo: AlgoSettings) -> list[torch.Tensor]:
    """A mini-batch's rows split into forwards: `micro_batch_size` sequences, or a token budget."""
    if algo.micro_token_budget:
        lengths = rollouts.sequence_lengths[rows].tolist()
        return [rows[torch.as_tensor(b)] for b in token_budget_batches(lengths, algo.micro_token_budget)]
    return list(rows.split(algo.micro_batch_size))


def policy_update(
    update: ModelUpdate,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    algo: AlgoSettings,
    *,
    temperature: float,
    logprob_chunk_size: int,
    logprob_token_budget: int | None = None,
    ref_log_probs: torch.Tensor | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Run the clipped update on `rollouts` (N rows) with `advantages` [N]; returns mean metrics
    (token-weighted means of the loss terms; `loss` and `grad_norm` averaged over optimizer steps)."""
    model, accelerator = update.model, update.accelerator
    n, G = len(rollouts), rollouts.group_size
    device = accelerator.device
    advantages = advantages.to(device)
    old_all = None
    if not (algo.ppo_epochs == 1 and algo.mini_batches == 1):
        with torch.no_grad():
            old_all, _ = token_log_probs(model, rollouts, temperature, logprob_chunk_size,
                                         token_budget=logprob_token_budget)
    sums: dict[str, float] = {}
    weight = 0.0
    n_opt_steps = 0
    diff = _LogProbDiff()
    if old_all is not None:
        diff.add(old_all, rollouts.log_probs, rollouts.response_mask)
    model.train()
    for _ in range(algo.ppo_epochs):
        for rows in _mini_batches(n // G, G, algo.mini_batches):
            totals = torch.tensor([float(rollouts.response_mask[rows].sum()), float(len(rows))], device=device)
            num_tokens, num_seqs = accelerator.reduce(totals, "sum").tolist()
            micro = _micro_batches(rollouts, rows, algo)
            loss_total = 0.0
            for m, idx in enumerate(micro):
                with update.micro_batch(last=m == len(micro) - 1):
                    loss, pm, tokens = _micro_loss(model, rollouts.select(idx), advantages[idx], old_all, idx,
                                                   ref_log_probs, algo, temperature, num_tokens, num_seqs,
                                                   diff if old_all is None else None)
                    update.backward(loss)  # already this micro-batch's share of the global mean
                for k, v in pm.items():
                    sums[k] = sums.get(k, 0.0) + v * tokens
                weight += tokens
                loss_total += loss.item()
            grad_norm = update.step(step, loss=loss_total)
            n_opt_steps += 1
            sums["loss"] = sums.get("loss", 0.0) + loss_total
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
    metrics = {k: v / max(weight, 1.0) for k, v in sums.items() if k not in ("loss", "grad_norm")}
    metrics["loss"] = sums.get("loss", 0.0) / max(n_opt_steps, 1)
    metrics["grad_norm"] = sums.get("grad_norm", 0.0) / max(n_opt_steps, 1)
    if update.max_change:
        metrics["param_change"] = update.last_change  # of the last optimizer step
    if update.world > 1:  # the loss is each process's share of the global mean; the rest are per-process means
        metrics = reduce_mean(accelerator, metrics)
        metrics["loss"] *= update.world
    metrics.update(diff.result(accelerator))
    return metrics


class _LogProbDiff:
    """|π_rollout − π_old| over response tokens, accumulated on the device (no sync per micro-batch), then
    summed over processes: mean and max."""

    def __init__(self):
        self.sums: torch.Tensor | None = None  # [sum, count]
        self.max: torch.Tensor | None = None

    def add(self, old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
        T = old.shape[1]
        d = (old.detach().float() - rollout.to(old.device).float()[:, :T]).abs()[mask.bool().to(old.device)[:, :T]]
        sums = torch.stack([d.sum(), torch.tensor(float(d.numel()), device=d.device)])
        peak = d.max() if d.numel() else torch.zeros((), device=d.device)
        self.sums = sums if self.sums is None else self.sums + sums
        self.max = peak if self.max is None else torch.maximum(self.max, peak)

    def result(self, accelerator) -> dict[str, float]:
        device = accelerator.device
        sums = torch.zeros(2, device=device) if self.sums is None else self.sums.to(device)
        peak = torch.zeros((), device=device) if self.max is None else self.max.to(device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        total, count = sums.tolist()
        return {"logprob_diff_mean": total / max(count, 1.0), "logprob_diff_max": float(peak)}


def _micro_loss(model, part: Rollouts, advantages: torch.Tensor, old_all: torch.Tensor | None, idx: torch.Tensor,
                ref_log_probs: torch.Tensor | None, algo: AlgoSettings, temperature: float, num_tokens: float,
                num_seqs: float, diff: _LogProbDiff | None = None) -> tuple[torch.Tensor, dict[str, float], float]:
    """The policy loss of one micro-batch (+ β·KL with a reference), its metrics and its token count.
    π_old is sg(π) in a single on-policy pass (ratio 1), else the log-probs recomputed before the first step;
    `diff` (the single pass) records |π_rollout − π_old| of this micro-batch."""
    device = advantages.device
    log_probs, entropy = token_log_probs(model, part, temperature, with_entropy=True)
    mask = part.response_mask.to(device)
    T = mask.shape[1]
    old = log_probs.detach() if old_all is None else old_all[idx, :T].to(device)
    if diff is not None:
        diff.add(old, part.log_probs, mask)
    weights = None
    if algo.tis_cap is not None:
        weights = truncated_is_weights(old, part.log_probs[:, :T].to(device), algo.tis_cap)
    loss, pm = compute_policy_loss(algo.name, log_probs, old, advantages, mask, num_tokens=num_tokens,
                                   num_seqs=num_seqs, clip_low=algo.clip_low, clip_high=algo.clip_high,
                                   loss_agg=algo.loss_agg, clip_ratio_c=algo.clip_ratio_c, token_weights=weights)
    if ref_log_probs is not None and algo.kl_coef > 0:
        kl = kl_penalty(log_probs, ref_log_probs[idx, :T].to(device), algo.kl_estimator)
        agg = algo.loss_agg or ALGORITHMS[algo.name].loss_agg
        loss = loss + algo.kl_coef * aggregate_loss(kl, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
        pm["kl"] = masked_mean(kl.detach(), mask).item()
    pm["entropy"] = masked_mean(entropy.detach(), mask).item()
    return loss, pm, float(mask.sum())
