"""The clipped policy update on a batch of rollouts, shared by ALIGN and RL (DESIGN §4, §5).

    metrics = policy_update(model, optimizer, accelerator, rollouts, advantages, cfg.algo,
                            temperature=1.0, logprob_chunk_size=32, params=trainable, max_grad_norm=1.0)

Per call: `ppo_epochs` passes over the rollouts; each pass shuffles the prompt groups and splits
them into `mini_batches` optimizer steps; each optimizer step accumulates gradients over
micro-batches of `micro_batch_size` sequences. The loss of every micro-batch is normalised by the
token / sequence count of its whole mini-batch across all processes, so accumulation and data
parallelism give the same update as one big batch.

Old log-probs: with one epoch and one mini-batch the policy cannot move between sampling and the
update, so π_old = sg(π) (ratio exactly 1, the on-policy gradient) and no extra forward is
spent; otherwise they are recomputed once, before the first step, with the same forward.
"""

from __future__ import annotations

import torch

from prism.config import AlgoSettings
from prism.loop import accumulating, backward, check_finite, clip_grad_norm
from prism.losses.aggregate import aggregate_loss, masked_mean
from prism.losses.kl import kl_penalty
from prism.losses.policy import ALGORITHMS, compute_policy_loss
from prism.rollout.batching import token_budget_batches
from prism.rollout.engine import Rollouts
from prism.rollout.logprobs import token_log_probs


def _mini_batches(n_groups: int, group_size: int, k: int) -> list[torch.Tensor]:
    """Shuffle prompt groups and split them into k row-index mini-batches (groups never split)."""
    order = torch.randperm(n_groups)
    return [torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in part.tolist()])
            for part in order.tensor_split(k) if len(part)]


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator,
    rollouts: Rollouts,
    advantages: torch.Tensor,
    algo: AlgoSettings,
    *,
    temperature: float,
    logprob_chunk_size: int,
    params: list[torch.nn.Parameter],
    logprob_token_budget: int | None = None,
    max_grad_norm: float | None,
    ref_log_probs: torch.Tensor | None = None,
    step: int = 0,
    out_dir=".",
) -> dict[str, float]:
    """Run the clipped update on `rollouts` (N rows) with `advantages` [N]; returns mean metrics."""
    n, G = len(rollouts), rollouts.group_size
    world = accelerator.num_processes
    device = accelerator.device
    advantages = advantages.to(device)
    single_pass = algo.ppo_epochs == 1 and algo.mini_batches == 1
    old_all = None
    if not single_pass:
        with torch.no_grad():
            old_all, _ = token_log_probs(model, rollouts, temperature, logprob_chunk_size,
                                         token_budget=logprob_token_budget)
    overrides = dict(clip_low=algo.clip_low, clip_high=algo.clip_high, loss_agg=algo.loss_agg)

    sums: dict[str, float] = {}
    weight = 0.0
    n_opt_steps = 0
    model.train()
    for _ in range(algo.ppo_epochs):
        for rows in _mini_batches(n // G, G, algo.mini_batches):
            mask_rows = rollouts.response_mask[rows]
            totals = torch.tensor([float(mask_rows.sum()), float(len(rows))], device=device)
            num_tokens, num_seqs = accelerator.reduce(totals, "sum").tolist()
            if algo.micro_token_budget:
                lengths = rollouts.sequence_lengths[rows].tolist()
                micro = [rows[torch.as_tensor(b)] for b in token_budget_batches(lengths, algo.micro_token_budget)]
            else:
                micro = rows.split(algo.micro_batch_size)
            loss_total = 0.0
            for m, idx in enumerate(micro):
                part = rollouts.select(idx)
                with accumulating(accelerator, model, last=m == len(micro) - 1):
                    log_probs, entropy = token_log_probs(model, part, temperature, with_entropy=True)
                    mask = part.response_mask.to(device)
                    T = mask.shape[1]
                    old = log_probs.detach() if old_all is None else old_all[idx, :T].to(device)
                    loss, pm = compute_policy_loss(algo.name, log_probs, old, advantages[idx], mask,
                                                   num_tokens=num_tokens, num_seqs=num_seqs, **overrides)
                    if ref_log_probs is not None and algo.kl_coef > 0:
                        kl = kl_penalty(log_probs, ref_log_probs[idx, :T].to(device), algo.kl_estimator)
                        agg = algo.loss_agg or ALGORITHMS[algo.name].loss_agg
                        loss = loss + algo.kl_coef * aggregate_loss(kl, mask, agg, num_tokens=num_tokens,
                                                                    num_seqs=num_seqs)
                        pm["kl"] = masked_mean(kl.detach(), mask).item()
                    # DDP averages gradients over processes; the loss is already a share of the global mean.
                    backward(accelerator, loss * world)
                tokens = float(mask.sum())
                pm["entropy"] = masked_mean(entropy.detach(), mask).item()
                for k, v in pm.items():
                    sums[k] = sums.get(k, 0.0) + v * tokens
                weight += tokens
                loss_total += loss.item()
            grad_norm = clip_grad_norm(accelerator, params, max_grad_norm)
            check_finite(step, out_dir, loss=loss_total, **({"grad_norm": grad_norm} if max_grad_norm else {}))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_opt_steps += 1
            sums["loss"] = sums.get("loss", 0.0) + loss_total
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
    metrics = {k: v / max(weight, 1.0) for k, v in sums.items() if k not in ("loss", "grad_norm")}
    metrics["loss"] = sums.get("loss", 0.0) / max(n_opt_steps, 1)
    metrics["grad_norm"] = sums.get("grad_norm", 0.0) / max(n_opt_steps, 1)
    if world > 1:  # the loss is each process's share of the global mean; the rest are per-process means
        keys = sorted(metrics)
        reduced = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=device), "mean").tolist()
        metrics = dict(zip(keys, reduced))
        metrics["loss"] *= world
    return metrics
