"""Pieces every stage's training loop shares (functions, not a base class): run set-up, the data
order, held-out evaluation, policy checkpoints and resume.

Each stage's `train.py` still reads top to bottom; it calls these where SFT, ALIGN and RL would
otherwise carry three copies of the same twenty lines.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object, set_seed

from prism.checkpoint import load_trainer_state, save_checkpoint
from prism.config import save_config
from prism.data.example import Example
from prism.eval.metrics import score_responses
from prism.models.loader import is_fully_sharded
from prism.rollout.engine import SamplingParams, generate

log = logging.getLogger("prism")


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to change. The CLI prints it as one line."""


class NonFiniteLossError(RunError):
    """A NaN/inf loss or gradient: the run stops without saving, keeping the last good checkpoint."""


def make_accelerator(cpu: bool = False) -> Accelerator:
    """The run's Accelerator. Without a GPU it runs on the CPU: plain processes or DDP over gloo, and
    DeepSpeed or FSDP2 when launched with such a config (accelerate's `cpu=True` would silently fall
    back to DDP; for DeepSpeed, without an explicit gloo backend it would see every process as rank 0
    of 1)."""
    on_cpu = cpu or not torch.cuda.is_available()
    if on_cpu and not cpu and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    accelerator = Accelerator(cpu=on_cpu)
    if on_cpu and not cpu and _env_flag("ACCELERATE_USE_FSDP") and accelerator.num_processes > 1:
        # accelerate shards only on accelerators: give its state what a GPU launch would, so that
        # fully_shard runs over gloo (how FSDP2 is tested without GPUs).
        from accelerate.state import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        if plugin.fsdp_version != 2:
            raise RunError("FSDP on the CPU: only fsdp_version 2 (FSDP2) is supported")
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def setup_run(cfg) -> tuple[Accelerator, Path]:
    """Accelerator (CPU unless a GPU is visible and not disabled), seeds, output dir + resolved config."""
    accelerator = make_accelerator(cpu=cfg.train.cpu)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return accelerator, out


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


@contextmanager
def accumulating(accelerator: Accelerator, model, last: bool):
    """Forward + backward of one micro-batch of an optimizer step; gradients are synchronised (DDP)
    or the DeepSpeed engine steps (clipping, optimizer, zero-grad) only on the `last` one.

    prism normalises every micro-batch loss by the whole step's token / sequence count, so the
    accumulated gradient is already the step's mean: use `backward` below, which keeps DeepSpeed
    from dividing by its own gradient_accumulation_steps as well.
    """
    if is_deepspeed(accelerator):
        accelerator.sync_gradients = last
        try:
            yield
        finally:
            accelerator.sync_gradients = True
    else:
        with nullcontext() if last else accelerator.no_sync(model):
            yield


def backward(accelerator: Accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward` for a loss that already is its share of the step's mean (see `accumulating`)."""
    if is_deepspeed(accelerator):
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


@contextmanager
def replicated_load():
    """Load a model whole on every process even under DeepSpeed ZeRO-3, for models no engine will own
    (the discriminator, a frozen reference): transformers would otherwise shard their weights at load
    time, and outside an engine nothing would gather them back for the forward."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def make_optimizer(cfg, params: list[torch.nn.Parameter]):
    """AdamW and its LR schedule (`optim.*`, warm-up as a fraction of `train.max_steps`)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer,
                              num_warmup_steps=math.ceil(cfg.optim.warmup_ratio * cfg.train.max_steps),
                              num_training_steps=cfg.train.max_steps)
    return optimizer, scheduler


def prepare(accelerator: Accelerator, model, optimizer, micro_batch_size: int):
    """`accelerator.prepare(model, optimizer)` -> (model, optimizer, trainable parameters of the prepared
    model). The parameters are read again afterwards because FSDP2 replaces them with sharded ones
    (clipping the old list would clip nothing). prism batches by itself (no dataloader), so under
    DeepSpeed the per-process micro-batch size is given to its config here (it only enters DeepSpeed's
    bookkeeping: prism's own accumulation decides when the engine steps, see `accumulating`)."""
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["train_batch_size"] = micro_batch_size * ds.get("gradient_accumulation_steps", 1) * accelerator.num_processes
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, [p for p in model.parameters() if p.requires_grad]


def clip_grad_norm(accelerator: Accelerator, params, max_norm: float | None) -> float:
    """Clip the global gradient norm and return it (NaN when not clipping). Under DeepSpeed the engine
    clips with its own `gradient_clipping` when it steps; this returns the norm it measured."""
    if not max_norm:
        return float("nan")
    norm = accelerator.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm) if norm is not None else float("nan")


def micro_batch_indices(n: int, k: int, batch_size: int, world: int, rank: int, seed: int) -> list[int]:
    """Example indices of global batch `k` (0-based, counted over the run) on `rank`.

    Epoch e is the permutation seeded by seed + e; a global batch is `batch_size * world`
    consecutive entries of it (an incomplete tail is dropped), and each rank takes its slice.
    The order is a pure function of (seed, k), so resuming needs only the batch counter.
    """
    per_epoch = n // (batch_size * world)
    epoch, j = divmod(k, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = (j * world + rank) * batch_size
    return perm[start: start + batch_size].tolist()


def evaluate_policy(accelerator: Accelerator, model, processor, examples: Sequence[Example], *,
                    max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                    prefix: str = "eval/") -> dict[str, float]:
    """One response per held-out example (greedy, or sampled at `temperature`), sharded over
    processes; answer accuracy, format validity and (synthetic task) caption match."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    # padded to equal shares (the last index repeated), so that every process runs as many generate
    # calls: under ZeRO-3 / FSDP2 each of their forwards is a collective
    with accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as mine:
        texts = generate(accelerator.unwrap_model(model), processor, [examples[i] for i in mine], params,
                         batch_size=batch_size)
    by_index = dict(zip(gather_object(list(mine)), gather_object(texts)))
    metrics = score_responses(examples, [by_index[i] for i in range(len(examples))])
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def save_policy_checkpoint(cfg, accelerator: Accelerator, step: int, model, processor, optimizer, scheduler,
                           state: dict, extra: Callable[[Path], None] | None = None) -> Path:
    """Atomic checkpoint of a policy: weights (or adapter, + merged), processor, optimizer, scheduler,
    resolved config, RNG states and `state` (trainer_state.json). `extra(tmp_dir)` adds stage files."""

    deepspeed, fsdp = is_deepspeed(accelerator), is_fsdp(accelerator)
    # ZeRO-3 and FSDP2 shard the weights themselves: gather a full state dict (a collective) for rank 0
    # to write; under FSDP2 the optimizer state too, so that a run resumes on any number of processes.
    state_dict = accelerator.get_state_dict(model) if deepspeed or fsdp else None
    optimizer_state = full_optimizer_state(model, optimizer) if fsdp else None

    def write(tmp: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(tmp)
        merge = cfg.model.lora.enabled and cfg.model.lora.merge_on_save
        if merge and fsdp:
            log.warning("model.lora.merge_on_save: no merged copy under FSDP (the adapter is saved; merge it "
                        "afterwards with peft's merge_and_unload)")
        elif merge:
            merged = copy.deepcopy(unwrapped).merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            processor.save_pretrained(tmp / "merged")
        if not deepspeed:
            torch.save(optimizer_state if fsdp else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(cfg, tmp / "config.yaml")
        if extra is not None:
            extra(tmp)

    def sharded_optimizer(tmp: Path) -> None:  # every process writes its own optimizer shard
        model.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag="state", save_latest=False)

    return save_checkpoint(cfg.train.output_dir, step, write, state, rank=accelerator.process_index,
                           barrier=accelerator.wait_for_everyone, keep_last=cfg.train.keep_last,
                           every_rank=sharded_optimizer if deepspeed else None)


DEEPSPEED_DIR = "deepspeed"


def restore_optimizer(ckpt: Path, optimizer, scheduler, rank: int, model=None) -> dict:
    """Load optimizer / scheduler / RNG state of a checkpoint; returns its trainer state.

    Under DeepSpeed (`model` is its engine) the optimizer states are the engine's sharded
    checkpoint, which needs the same number of processes as the run that wrote it.
    """
    if (ckpt / DEEPSPEED_DIR).is_dir():
        if model is None or not hasattr(model, "load_checkpoint"):
            raise RunError(f"train.resume: {ckpt} holds DeepSpeed optimizer shards; resume it under DeepSpeed "
                           "with the same accelerate config and number of processes")
        model.load_checkpoint(str(ckpt / DEEPSPEED_DIR), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=False, load_module_only=False)
    else:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
        by_name = all(isinstance(k, str) for k in saved.get("state", {}))  # as full_optimizer_state saves it
        sharded = is_fully_sharded(model)
        if sharded and not by_name:
            raise RunError(f"train.resume: {ckpt} holds an optimizer state saved without FSDP; resume it "
                           "without FSDP (its parameters are numbered, FSDP2 needs their names)")
        if sharded or (by_name and saved.get("state")):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, _torch_optimizer(optimizer), saved,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    state = load_trainer_state(ckpt, rank)
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state


def full_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state of an FSDP2 model, keyed by parameter names (a collective: every process
    calls it; rank 0 receives the tensors, on the CPU). Loads on any number of processes, with or
    without FSDP (`restore_optimizer`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # inside accelerate's AcceleratedOptimizer


def check_finite(step: int, out: Path, **values: float) -> None:
    import math

    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteLossError(f"non-finite {what} at step {step}; stopping without saving — the last good "
                                 f"checkpoint in {out} is kept (try a lower optim.lr)")
