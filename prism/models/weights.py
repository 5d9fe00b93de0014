"""The policy's weights as a checkpoint would hold them, for an inference engine to load (vLLM).

    for chunk in weight_chunks(model, max_bytes=1 << 30, skip=("model.visual.",)):
        engine_model.load_weights(chunk)        # [(name, tensor)], names as in model.safetensors

Names are those `save_pretrained` writes for the plain transformers model (`model.language_model.…`,
`model.visual.…`, `lm_head.…`), and layouts those of the family's published checkpoints (Qwen3-VL-MoE's fused
experts transposed back, `Family.transposed_in_checkpoints`), whatever wraps the model: DDP / DeepSpeed
(`.module`), peft (its `base_model.model.` prefix and `.base_layer` are dropped). A LoRA-wrapped linear is yielded merged,
W + ΔW with ΔW = peft's `get_delta_weight` (scale · B·A), computed aside: the trained weights are not
touched (merging in place and unmerging would leave rounding error in them). Sharded parameters are
gathered a chunk at a time: FSDP2's DTensors with `full_tensor()`, DeepSpeed ZeRO-3's with
`GatheredParameters` (every process must call this together, as with any collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from prism.models.families import family_of

_PEFT_PREFIX = "base_model.model."


def weight_chunks(model: torch.nn.Module, max_bytes: int = 1 << 30, skip: Sequence[str] = ()
                  ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Lists of (checkpoint name, full tensor) of `model`'s parameters, LoRA merged, each list at most
    `max_bytes` (one larger tensor alone), names starting with a prefix in `skip` left out."""
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    family = family_of(model)
    transposed = family.transposed_in_checkpoints if family is not None else ()
    entries = list(_entries(model, tuple(skip)))
    chunk: list[tuple[str, torch.nn.Parameter, list[torch.nn.Parameter]]] = []
    size = 0
    for entry in entries:
        param = entry[1]
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if chunk and size + nbytes > max_bytes:
            yield _materialise(chunk, transposed)
            chunk, size = [], 0
        chunk.append(entry)
        size += nbytes
    if chunk:
        yield _materialise(chunk, transposed)


def _entries(model: torch.nn.Module, skip: tuple[str, ...]):
    """(name, parameter, LoRA parameters [A, B] or []) for every parameter to yield, in module order."""
    lora_modules = {name: module for name, module in model.named_modules()
                    if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if ".lora_" in name or "lora_magnitude" in name:
            continue  # merged into their base layer's weight below
        if id(param) in seen:
            continue
        seen.add(id(param))
        module_name, _, leaf = name.rpartition(".")
        lora = []
        if module_name.endswith(".base_layer") and leaf == "weight":
            owner = lora_modules.get(module_name.removesuffix(".base_layer"))
            if owner is not None:
                lora = [owner]
        clean = _checkpoint_name(name)
        if clean.startswith(skip):
            continue
        yield clean, param, lora


def _checkpoint_name(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def _materialise(chunk, transposed: tuple[str, ...] = ()) -> list[tuple[str, torch.Tensor]]:
    params = [p for _, p, _ in chunk] + [p for _, _, lora in chunk for m in lora for p in m.parameters()
                                         if p.requires_grad]
    with _gathered(params):
        out = []
        for name, param, lora in chunk:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            tensor = tensor.detach()
            for module in lora:
                for adapter in module.active_adapters:
                    if adapter in getattr(module, "lora_A", {}):
                        delta = module.get_delta_weight(adapter)
                        delta = delta.full_tensor() if hasattr(delta, "full_tensor") else delta
                        tensor = tensor + delta.to(tensor.dtype)
            if name.endswith(transposed):  # the published checkpoints' layout
                tensor = tensor.transpose(1, 2)
            # a ZeRO-3 parameter is freed again after the block: keep a copy of it
            out.append((name, tensor.clone() if hasattr(param, "ds_id") else tensor))
        return out


def _gathered(params: list[torch.nn.Parameter]):
    """DeepSpeed ZeRO-3: the full parameters for the duration of the block; elsewhere nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")])
    return contextlib.nullcontext()
