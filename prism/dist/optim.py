"""The optimizer every trained model uses: AdamW with an LR schedule."""

from __future__ import annotations

import math

import torch


def make_optimizer(params: list[torch.nn.Parameter], lr: float, *, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, scheduler: str = "constant", warmup_ratio: float = 0.0,
                   max_steps: int = 1):
    """AdamW over `params` and its LR schedule (warm-up as a fraction of `max_steps` scheduler steps)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    schedule = get_scheduler(scheduler, optimizer, num_warmup_steps=math.ceil(warmup_ratio * max_steps),
                             num_training_steps=max_steps)
    return optimizer, schedule


def set_base_lr(optimizer, scheduler, lr: float) -> float | None:
    """Make `lr` the base learning rate of a restored optimizer and schedule, keeping the schedule's position:
    loading their state brings the saved base back, which would silently override a learning rate changed for
    the resumed run. Returns the saved base when it differed (None: unchanged)."""
    saved = scheduler.base_lrs[0]
    if saved == lr:
        return None
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return saved


def optimizer_from_config(cfg, params: list[torch.nn.Parameter]):
    """`make_optimizer` with a stage config's `optim.*` and `train.max_steps`."""
    o = cfg.optim
    return make_optimizer(params, o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, scheduler=o.scheduler,
                          warmup_ratio=o.warmup_ratio, max_steps=cfg.train.max_steps)
