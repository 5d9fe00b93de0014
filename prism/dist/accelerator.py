"""The run's Accelerator and how a trained model is handed to it (DDP, DeepSpeed ZeRO, FSDP2, or one
plain process), including the CPU-only set-ups prism is tested with."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from prism.core.errors import RunError


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


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


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


def prepare(accelerator: Accelerator, model, optimizer, micro_batch_size: int):
    """`accelerator.prepare(model, optimizer)` -> (model, optimizer, trainable parameters of the prepared
    model). The parameters are read again afterwards because FSDP2 replaces them with sharded ones
    (clipping the old list would clip nothing). prism batches by itself (no dataloader), so under
    DeepSpeed the per-process micro-batch size is given to its config here (it only enters DeepSpeed's
    bookkeeping: prism's own accumulation decides when the engine steps, see `prism.dist.update`)."""
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["train_batch_size"] = micro_batch_size * ds.get("gradient_accumulation_steps", 1) * accelerator.num_processes
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, [p for p in model.parameters() if p.requires_grad]
