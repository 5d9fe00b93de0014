"""Layer 5 — distributed training: the Accelerator (DDP, DeepSpeed ZeRO, FSDP2, plain), preparing a
model for it, the optimizer, and `ModelUpdate`, the one accumulate / backward / reduce / clip / step
path that the SFT model, the policy and the discriminator all use."""

from prism.dist.accelerator import is_deepspeed, is_fsdp, make_accelerator, prepare, replicated_load
from prism.dist.optim import make_optimizer, optimizer_from_config
from prism.dist.update import ModelUpdate, reduce_mean, reduce_sum

__all__ = ["ModelUpdate", "is_deepspeed", "is_fsdp", "make_accelerator", "make_optimizer", "optimizer_from_config",
           "prepare", "reduce_mean", "reduce_sum", "replicated_load"]
