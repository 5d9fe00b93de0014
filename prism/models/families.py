"""What prism knows of each Qwen-VL family, in one place.

    family = family_of(model)            # or of a config / a config.json's model_type
    family.recurrent                     # Qwen3.5: Gated-DeltaNet layers carry state per row

Generic code asks the model itself wherever it can (its config, `get_rope_index`, its own modules); a
`Family` records only what differs between the families and cannot be asked:

- `processor_class`: the processor to assemble where torchvision is missing (`prism.models.processor`);
- `recurrent`: hybrid Gated-DeltaNet + attention layers (Qwen3.5, dense and MoE). The native sampler keeps
  each row's convolution and recurrent state in its cache (`prism.rollout.native`), and a packed row runs
  those layers one sequence at a time (`prism.data.packing`), since their state would otherwise flow from
  one sequence into the next;
- the config keys that `prism-tiny` shrinks (`prism.models.tiny`): where the language model's head width
  comes from (`head_dim` or hidden / heads), and the vision tower's width and output keys (Qwen2-VL names
  them `embed_dim` and `hidden_size`, the later families `hidden_size` and `out_hidden_size`).

Freezing is the same for every family (`visual.merger*` and `visual.deepstack_merger_list*` are the
projector, every other `visual.*` parameter the vision tower), and so is the chat markup (ChatML with
Qwen's vision tokens); the templates themselves come with each checkpoint (`prism.models.processor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prism.core.errors import DataError


@dataclass(frozen=True)
class Family:
    model_type: str
    """config.json's `model_type`."""
    name: str
    """As its makers write it (tables, messages)."""
    processor_class: str
    """transformers' processor class of the family."""
    model_class: str
    """transformers' *ForConditionalGeneration class."""
    video_processor_class: str = "Qwen3VLVideoProcessor"
    """transformers' video processor class (recorded with a processor assembled without torchvision)."""
    moe: bool = False
    """Mixture-of-experts MLP blocks."""
    recurrent: bool = False
    """Hybrid Gated-DeltaNet (linear attention, a recurrent + convolution state per row) and attention layers."""
    head_dim_key: bool = True
    """The text config sets `head_dim` (Qwen3 families); else it is hidden_size / num_attention_heads."""
    vision_width: str = "hidden_size"
    """The vision config's width key (Qwen2-VL: embed_dim)."""
    vision_out: str = "out_hidden_size"
    """The vision config's key for the projector's output width, the language model's (Qwen2-VL: hidden_size)."""
    vision_mlp: str | None = "intermediate_size"
    """The vision config's MLP width key (Qwen2-VL: none, its mlp_ratio is kept)."""
    transposed_in_checkpoints: tuple[str, ...] = ()
    """Parameters (name suffixes) whose published checkpoints hold them with dims 1 and 2 swapped: transformers
    (>= 5) transposes Qwen3-VL-MoE's fused experts on load, and an engine that loads checkpoints (vLLM) wants
    them back in the published layout (`prism.models.weights.weight_chunks`)."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLProcessor", "Qwen2VLForConditionalGeneration", "Qwen2VLVideoProcessor",
           head_dim_key=False, vision_width="embed_dim", vision_out="hidden_size", vision_mlp=None),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration",
           "Qwen2VLVideoProcessor", head_dim_key=False),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLProcessor", "Qwen3VLForConditionalGeneration"),
    Family("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLProcessor", "Qwen3VLMoeForConditionalGeneration", moe=True,
           transposed_in_checkpoints=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    Family("qwen3_5", "Qwen3.5", "Qwen3VLProcessor", "Qwen3_5ForConditionalGeneration", recurrent=True),
    Family("qwen3_5_moe", "Qwen3.5-MoE", "Qwen3VLProcessor", "Qwen3_5MoeForConditionalGeneration", moe=True,
           recurrent=True),
)}
"""model_type -> Family, for every family prism supports and tests (README, support matrix)."""


def family_of(obj: Any) -> Family | None:
    """The family of a model (through any wrapper), a config, or a `model_type` string; None if prism does not
    know it."""
    if isinstance(obj, str):
        return FAMILIES.get(obj)
    while hasattr(obj, "module"):  # DDP / DeepSpeed
        obj = obj.module
    if hasattr(obj, "get_base_model"):  # peft
        obj = obj.get_base_model()
    config = getattr(obj, "config", obj)
    return FAMILIES.get(getattr(config, "model_type", None))


def family_named(model_type: str, where: str) -> Family:
    """The family of `model_type`, or a DataError naming `where` and the families prism supports."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise DataError(f"{where}: model_type {model_type!r} is not a Qwen-VL family prism supports "
                        f"({', '.join(FAMILIES)})")
    return family
