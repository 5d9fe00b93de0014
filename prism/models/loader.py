"""One loader for policy, reference and processor of any local Qwen-VL checkpoint.

Every family of `prism.models.families` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5,
Qwen3.5-MoE) loads through `AutoModelForImageTextToText`, safetensors only, `trust_remote_code` off
unless asked for. Freezing works on parameter names, which are the same across those families:
`...visual.merger.*` / `...visual.deepstack_merger_list.*` is the projector, every other
`...visual.*` parameter is the vision tower, and the rest is the language model.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText

from prism.core.config import ModelSettings
from prism.core.errors import DataError
from prism.models.families import FAMILIES

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
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


def read_json_object(file: Path, key: str) -> dict:
    """The JSON object in `file`; a DataError naming `key` and the file if it is not one."""
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{key}: {file} is not valid JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise DataError(f"{key}: {file} is not a JSON object (it holds a {type(value).__name__})")
    return value


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    """A model directory whose config.json is a JSON object and whose safetensors weights are whole
    (`check_weights`), or a one-line error naming `key` and the file at fault."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {path} is not a model directory (no config.json)")
    model_type = read_json_object(path / "config.json", key).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        log.warning("%s: model_type %r is not one prism was tested with (%s)", path, model_type,
                    ", ".join(SUPPORTED_MODEL_TYPES))
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{key}: {path} has no .safetensors weights (prism loads safetensors only)")
    check_weights(path, key)
    return path


_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def check_weights(path: str | Path, key: str = "model.path") -> None:
    """Check that every `*.safetensors` file of the directory `path` (or the file `path`) is whole.

    Reads only each file's header: the 8-byte little-endian header length, the JSON header, and
    compares the file size with the end of its last tensor. A directory's
    `*.safetensors.index.json` must name only shards that exist. A directory without safetensors
    files passes (`check_model_dir` says that). Raises DataError `"{key}: {file} is truncated or
    corrupt (why)"`, one line; FileNotFoundError if `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if path.is_dir():
        for index in sorted(path.glob("*.safetensors.index.json")):
            weight_map = read_json_object(index, key).get("weight_map", {})
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
            missing = [s for s in shards if not (path / str(s)).is_file()]
            if missing:
                raise DataError(f"{key}: {index} names {len(missing)} missing shard(s): {', '.join(map(str, missing))}")
        files = sorted(path.glob("*.safetensors"))
    else:
        files = [path]
    for file in files:
        why = safetensors_fault(file)
        if why:
            raise DataError(f"{key}: {file} is truncated or corrupt ({why})")


def safetensors_fault(file: Path) -> str | None:
    """Why the safetensors `file` is not whole, or None; reads the header only."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                return f"header length {n} is not plausible"
            if 8 + n > size:
                return f"{size} bytes, but its header alone needs {8 + n}"
            raw = f.read(n)
    except OSError as e:
        return f"cannot read it: {first_line(e)}"
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return f"header is not valid JSON: {first_line(e)}"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"{size} bytes, but its tensors end at byte {8 + n + end}"
    return None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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
        try:
            return AutoModelForImageTextToText.from_pretrained(
                from_dir,
                dtype=resolve_dtype(s.dtype, device),
                attn_implementation=s.attn_implementation,
                trust_remote_code=s.trust_remote_code,
                use_safetensors=True,
            )
        except (OSError, ValueError, SafetensorError) as e:  # what check_model_dir cannot see from headers
            raise DataError(f"{key}: cannot load the model in {from_dir} ({first_line(e)})") from None

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
