"""One loader for policy, reference and processor of any local Qwen-VL checkpoint.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE all load through
`AutoModelForImageTextToText`, safetensors only, `trust_remote_code` off unless asked for.
Freezing works on parameter names, which are the same across those families:
`...visual.merger.*` / `...visual.deepstack_merger_list.*` is the projector, every other
`...visual.*` parameter is the vision tower, and the rest is the language model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from prism.core.config import ModelSettings

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """`auto` means bfloat16 on a GPU and float32 on the CPU."""
    if name == "auto":
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    return _DTYPES[name]


def is_projector(name: str) -> bool:
    return ".visual." in f".{name}" and ("merger" in name)


def is_vision_tower(name: str) -> bool:
    return ".visual." in f".{name}" and not is_projector(name)


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {path} is not a model directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        log.warning("%s: model_type %r is not one prism was tested with (%s)", path, model_type,
                    ", ".join(SUPPORTED_MODEL_TYPES))
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{key}: {path} has no .safetensors weights (prism loads safetensors only)")
    return path


def freeze(model: torch.nn.Module, vision: bool, projector: bool) -> dict[str, int]:
    """Freeze (or unfreeze) the vision tower and projector; returns trainable counts per part."""
    counts = {"vision": 0, "projector": 0, "language": 0}
    frozen = {"vision": vision, "projector": projector}
    for name, p in model.named_parameters():
        part = "projector" if is_projector(name) else "vision" if is_vision_tower(name) else "language"
        if part in frozen:  # language-model parameters are left as they are (full or LoRA)
            p.requires_grad_(not frozen[part])
        if p.requires_grad:
            counts[part] += p.numel()
    return counts


def apply_lora(model: torch.nn.Module, s: ModelSettings) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                     target_modules=s.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def load_model(s: ModelSettings, *, trainable: bool = True, device: torch.device | str | None = None,
               init_from: str | Path | None = None, key: str = "model.path") -> torch.nn.Module:
    """Load a policy (trainable=True: LoRA, freezing, checkpointing applied) or a frozen reference.

    `init_from` is a prism checkpoint to resume from: its full weights, or under LoRA its adapter
    on top of the base model at `s.path`.
    """
    path = check_model_dir(s.path, key)

    def base(from_dir):
        return AutoModelForImageTextToText.from_pretrained(
            from_dir,
            dtype=resolve_dtype(s.dtype, device),
            attn_implementation=s.attn_implementation,
            trust_remote_code=s.trust_remote_code,
            use_safetensors=True,
        )

    if not trainable:
        return base(init_from or path).requires_grad_(False).eval()
    if s.lora.enabled:
        # Adapters on the language model; peft freezes the rest, and `freeze` below then
        # unfreezes the vision tower / projector if they are configured to train.
        from peft import PeftModel

        model = (PeftModel.from_pretrained(base(path), init_from, is_trainable=True) if init_from
                 else apply_lora(base(path), s))
    else:
        model = base(init_from or path)
    counts = freeze(model, vision=s.freeze_vision, projector=s.freeze_merger)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if s.compile:
        compile_layers(model)
    log.info("trainable parameters: %s", {k: f"{v / 1e6:.2f}M" for k, v in counts.items()})
    return model


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (before accelerate wraps the model, so DDP / DeepSpeed /
    FSDP2 wrap the compiled layers); one graph serves every layer: same code, parameters as inputs."""
    for layer in unwrap(model).get_decoder().layers:
        layer.compile()


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded in place by FSDP2 (`fully_shard`, as accelerate's FSDP2 prepares it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForConditionalGeneration model inside DDP / DeepSpeed / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
