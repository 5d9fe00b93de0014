"""The one update path of every trained model — the SFT model, the policy and the discriminator:
accumulate micro-batches, backward, reduce gradients over processes, clip, check, step.

    update = ModelUpdate(accelerator, model, optimizer, params, max_grad_norm)
    for m, batch in enumerate(micro_batches):
        with update.micro_batch(last=m == len(micro_batches) - 1):
            update.backward(loss_share(batch))     # this micro-batch's share of the global mean loss
    grad_norm = update.step(step, loss=total)

The contract every caller keeps: the loss handed to `backward` is normalised by the totals of the
*whole* optimizer step over all micro-batches and all processes (tokens, sequences or pairs), so the
accumulated gradient, summed over processes, is the gradient of the global mean. Accumulation and
data parallelism then give the update one big batch would.

How the sum over processes happens depends on the model:
- `replicated=False` (default): the model went through `accelerator.prepare` (DDP, DeepSpeed, FSDP2).
  Those average gradients over processes, so `backward` scales the loss by the number of processes;
  gradients are synchronised on the last micro-batch only.
- `replicated=True`: a model no engine owns (the discriminator: each forward runs one expert's
  adapter, which DDP would flag as unused parameters). `step` sums its gradients with one all-reduce.

Two guards stop the run before a bad step is saved (`prism.core.errors.TrainingStopped`): a non-finite
loss or gradient norm (the optimizer does not step), and an update that blew up while staying finite:
with `max_change`, a step that changes the norm of the trainable parameters by more than that
fraction, |‖θ'‖ − ‖θ‖| / ‖θ‖ (a lower bound of ‖θ' − θ‖ / ‖θ‖ that needs no copy of the weights;
healthy steps move it by well under 1 %). Both messages name the learning rate of this model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from prism.core.errors import DivergenceError, check_finite
from prism.dist.accelerator import is_deepspeed


class ModelUpdate:
    """Gradient accumulation, cross-process reduction, clipping and the optimizer step of one model.

    `name` and `lr_key` (the model, the config key of its learning rate) only word the stop messages."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer, params: list[torch.nn.Parameter],
                 max_grad_norm: float | None, *, replicated: bool = False, max_change: float | None = None,
                 name: str = "policy", lr_key: str = "optim.lr"):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.params, self.max_grad_norm, self.replicated = params, max_grad_norm, replicated
        self.max_change, self.name, self.lr_key = max_change, name, lr_key
        self.world = accelerator.num_processes
        self.last_change = float("nan")  # the relative change of the parameter norm at the last step
        self._norm_before: float | None = None

    @contextmanager
    def micro_batch(self, last: bool):
        """Forward + backward of one micro-batch; gradients are synchronised (DDP) or the DeepSpeed engine
        steps (its clipping, optimizer, zero-grad) only on the `last` one."""
        if self.max_change and self._norm_before is None:  # before the DeepSpeed engine can step
            self._norm_before = self.param_norm()
        if self.replicated:
            yield
        elif is_deepspeed(self.accelerator):
            self.accelerator.sync_gradients = last
            try:
                yield
            finally:
                self.accelerator.sync_gradients = True
        else:
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss that is its micro-batch's share of the step's global mean (module doc)."""
        if self.replicated:
            loss.backward()
        elif is_deepspeed(self.accelerator):  # DeepSpeed must not divide by its own accumulation steps as well
            self.accelerator.backward(loss * self.world, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss * self.world)

    def step(self, step: int | str, **finite: float) -> float:
        """Sum gradients over processes (replicated models), clip, stop on a non-finite `finite` value or
        gradient norm (`prism.core.errors.check_finite`), step the optimizer, stop if that step blew the
        parameters up (`max_change`), and zero the gradients. Returns the gradient norm before clipping
        (NaN when `max_grad_norm` is unset). `step` names the step in messages (an int: "step 3")."""
        if self.max_change and self._norm_before is None:
            self._norm_before = self.param_norm()
        if self.replicated:
            self._all_reduce_grads()
        grad_norm = self._clip()
        check_finite(step, self._lr_hint(), **finite, **({"grad_norm": grad_norm} if self.max_grad_norm else {}))
        self.optimizer.step()
        self.zero_grad()
        before, self._norm_before = self._norm_before, None
        if self.max_change and before is not None:
            after = self.param_norm()  # inf when it overflows float32, or NaN: a blow-up as well
            self.last_change = abs(after - before) / before if before > 0 and math.isfinite(after) else (
                0.0 if math.isfinite(after) else math.inf)
            if self.last_change > self.max_change:
                where = f"step {step}" if isinstance(step, int) else step
                raise DivergenceError(
                    f"{where}: the {self.name} update blew up: one optimizer step took the norm of its trainable "
                    f"parameters from {before:.4g} to {after:.4g} (a relative change of {self.last_change:.3g}, over "
                    f"optim.max_param_change={self.max_change:g}); lower {self._lr_hint()}")
        return grad_norm

    def param_norm(self) -> float:
        """‖θ‖ over the trainable parameters; under ZeRO-3 / FSDP2 each process holds a shard, summed here."""
        local, sharded = [], False
        for p in self.params:
            shard = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3
            if shard is None and hasattr(p, "to_local"):  # FSDP2's DTensor
                shard = p.to_local()
            sharded |= shard is not None
            local.append((p if shard is None else shard).detach())
        with torch.no_grad():
            sq = torch.nn.utils.get_total_norm(local, 2.0).double() ** 2 if local else torch.zeros((), dtype=torch.float64)
            if sharded and self.world > 1:
                sq = sq.to(self.accelerator.device)
                torch.distributed.all_reduce(sq)
        return float(sq) ** 0.5

    def _lr_hint(self) -> str:
        lr = self.optimizer.param_groups[0]["lr"] if getattr(self.optimizer, "param_groups", None) else None
        return f"{self.lr_key}" + (f" (now {lr:g})" if lr is not None else "")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self) -> float:
        if not self.max_grad_norm:
            return float("nan")
        if self.replicated:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        # Under DeepSpeed the engine clips with its own `gradient_clipping` when it steps; this returns its norm.
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm) if norm is not None else float("nan")

    def _all_reduce_grads(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.accelerator.device)  # the backend's device (nccl: GPU)
        torch.distributed.all_reduce(flat)
        flat = flat.to(self.params[0].device)
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()


def reduce_mean(accelerator: Accelerator, metrics: dict[str, float],
                prefixes: tuple[str, ...] | None = None) -> dict[str, float]:
    """`metrics` with the keys starting with one of `prefixes` (all keys: None) averaged over processes."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(k for k in metrics if prefixes is None or k.startswith(prefixes))
    values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
    return {**metrics, **dict(zip(keys, values.tolist()))}


def reduce_sum(accelerator: Accelerator, value: torch.Tensor | float) -> float:
    """A per-process count or sum added up over processes."""
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.as_tensor(value).to(accelerator.device), "sum"))
