"""Checkpoints of a trained policy: weights (or adapter, + merged), processor, optimizer, scheduler,
resolved config, RNG states and trainer state, written atomically (`prism.checkpoint.atomic`), and
the restore that makes a resumed run continue exactly.

Under ZeRO-3 and FSDP2 the weights are gathered for rank 0 to write; under FSDP2 the whole optimizer
state too, keyed by parameter name, so the run resumes on any number of processes. Under DeepSpeed
each process writes its own optimizer shard (resume with the same number of processes).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from prism.checkpoint.atomic import load_trainer_state, save_checkpoint
from prism.core.config import save_config
from prism.core.errors import RunError
from prism.dist.accelerator import is_deepspeed, is_fsdp
from prism.dist.optim import set_base_lr
from prism.models.loader import is_fully_sharded

log = logging.getLogger("prism")


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


def restore_optimizer(ckpt: Path, optimizer, scheduler, rank: int, model=None, lr: float | None = None) -> dict:
    """Load optimizer / scheduler / RNG state of a checkpoint; returns its trainer state. With `lr` (the run's
    `optim.lr`) a learning rate changed since the checkpoint takes effect, with a warning.

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
    if lr is not None and (saved_lr := set_base_lr(optimizer, scheduler, lr)) is not None:
        log.warning("optim.lr: %g in %s, %g now: the resumed run continues its schedule with %g", saved_lr, ckpt,
                    lr, lr)
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
