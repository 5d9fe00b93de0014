"""Typed configs: one per stage, built from shared parts, loaded from YAML with dotted overrides.

    cfg = load_config(SFTConfig, "configs/sft/demo.yaml", ["optim.lr=2e-4", "data.train=x.jsonl"])

Order of precedence: dataclass defaults < YAML file < command-line overrides. Validation is
pydantic's (types, ranges, unknown keys); every failure is re-raised as a one-line `ConfigError`
that names the file and the dotted key. Each field is documented by the docstring under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line naming the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              coerce_numbers_to_str=True)  # `run_name=123` is the string "123"


class LoraSettings(Section):
    enabled: bool = False
    """Train LoRA adapters instead of the full language model."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    """peft target_modules: a regex (default: the language model's projections) or a list of names."""
    merge_on_save: bool = False
    """Also write the merged full model next to the adapter in every checkpoint."""


class ModelSettings(Section):
    path: str = "runs/tiny-model"
    """Local directory of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) checkpoint in HF format."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    freeze_vision: bool = True
    """Freeze the vision tower (all `visual.*` parameters except the merger)."""
    freeze_merger: bool = True
    """Freeze the multimodal projector (`visual.merger`, `visual.deepstack_merger_list`)."""
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    """Off by default: prism only loads architectures that transformers ships."""
    lora: LoraSettings = LoraSettings()


class DataSettings(Section):
    train: str = "data/demo/curated.jsonl"
    """Training data: sharegpt JSON/JSONL, verl Parquet or prism JSONL (see prism.data.formats)."""
    eval: str | None = "data/demo/test.jsonl"
    """Held-out data for periodic evaluation (null to skip)."""
    format: Literal["auto", "sharegpt", "verl", "prism"] = "auto"
    max_length: int = Field(1024, gt=0)
    """Examples longer than this many tokens are dropped (with a count in the log)."""
    skip_bad: bool = False
    """Skip bad examples with one warning and a count instead of stopping."""
    eval_limit: int | None = Field(256, gt=0)
    """Evaluate on at most this many held-out examples (null: all)."""


class OptimSettings(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    """Fraction of `train.max_steps` spent in linear warm-up."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""


class TrainSettings(Section):
    output_dir: str = "runs/sft"
    max_steps: int = Field(100, gt=0)
    """Optimizer steps to run."""
    batch_size: int = Field(8, gt=0)
    """Micro-batch size per process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (global batch = batch_size * grad_accum * processes)."""
    seed: int = 0
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = Field(2, gt=0)
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """auto: the latest complete checkpoint in output_dir, if any; none: start fresh; or a checkpoint path."""
    log_every: int = Field(1, gt=0)
    cpu: bool = False
    """Force CPU even when a GPU is visible."""


class EvalSettings(Section):
    every: int = Field(0, ge=0)
    """Evaluate every this many steps (0: only at the end)."""
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(192, gt=0)


class LoggingSettings(Section):
    tensorboard: bool = True
    wandb_project: str | None = None
    """Log to this wandb project (offline mode when no WANDB_API_KEY is set)."""
    run_name: str | None = None


class SFTConfig(Section):
    """`prism-sft`: supervised fine-tuning on demonstrations, loss on assistant tokens only."""

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    logging: LoggingSettings = LoggingSettings()


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.lr=2e-4", "data.eval=null"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=2e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _one_line(err: ValidationError, origin: str) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden":
        return f"{origin}: unknown config key '{key}'"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else ""
    return f"{origin}: {key}: {e['msg']}{got}{more}"


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults < YAML file < dotted overrides, validated into `cls`."""
    data: dict = {}
    origin = "config"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        origin = f"{origin} + overrides" if path else "overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, origin)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
