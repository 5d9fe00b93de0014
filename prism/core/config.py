"""Typed configs: the loader, and the sections the stages share. Each stage's config class is built
from these in its own package (`prism.sft.config`, `prism.rl.config`, `prism.align.config`).

    cfg = load_config(SFTConfig, "configs/sft/demo.yaml", ["optim.lr=2e-4", "data.train=x.jsonl"])

Order of precedence: class defaults < YAML file < command-line overrides. Validation is pydantic's
(types, ranges, unknown keys); every failure is re-raised as a one-line `ConfigError` that names the
file and the dotted key. A key that was renamed stops with a line naming its replacement (a config
class lists them in `renamed`). Each field is documented by the docstring under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prism.core.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              coerce_numbers_to_str=True)  # `run_name=123` is the string "123"
    renamed: ClassVar[dict[str, str]] = {}
    """Old dotted key -> its replacement; loading a config that still uses the old key stops naming the new."""


LM_PROJECTIONS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                  r"|in_proj_qkv|in_proj_z|out_proj)")
"""Every linear projection of the language model's layers in each Qwen-VL family: attention (q/k/v/o), the gated
MLP and shared experts (gate/up/down), and the Gated-DeltaNet layers of Qwen3.5 (in_proj_qkv, in_proj_z,
out_proj; their two per-head gate projections, in_proj_a / in_proj_b, are a few columns each and left out).
Fused MoE experts are 3D parameters, not linear modules, and so not adapted (as in peft)."""


class LoraSettings(Section):
    enabled: bool = False
    """Train LoRA adapters instead of the full language model."""
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = LM_PROJECTIONS
    """peft target_modules: a regex (default: the language model's projections, `LM_PROJECTIONS`) or a list of
    names."""
    merge_on_save: bool = False
    """Also write the merged full model next to the adapter in every checkpoint."""


class ModelSettings(Section):
    path: str | None = None
    """Local directory of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) checkpoint in HF format (required)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    freeze_vision: bool = True
    """Freeze the vision tower (all `visual.*` parameters except the merger)."""
    freeze_merger: bool = True
    """Freeze the multimodal projector (`visual.merger`, `visual.deepstack_merger_list`)."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile each decoder layer of the trained model (fuses its norms, rotary and activation
    ops; one graph serves every layer). Measured on an H100, 1.7B SFT step: 25.7% -> 36.6% MFU
    (docs/results.md). The first steps pay the compilation; generation always runs eager."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    """Off by default: prism only loads architectures that transformers ships."""
    chat_template: str = "auto"
    """The chat template: auto (the checkpoint's own), chatml (Qwen's ChatML as the Instruct templates render it,
    prism.models.processor.CHATML_TEMPLATE) or a Jinja file. A template that does not render PRISM's assistant
    turns as written stops the run at load: a Thinking checkpoint's (Qwen3-VL-*-Thinking) drops the caption, so
    such a checkpoint needs chatml."""
    lora: LoraSettings = LoraSettings()


class DataSettings(Section):
    train: str | None = None
    """Training data (required): sharegpt JSON/JSONL, verl Parquet or prism JSONL (see prism.data.formats)."""
    eval: str | None = None
    """Held-out data for periodic evaluation (null: none)."""
    task: str | None = None
    """The task whose checks evaluation adds (caption accuracy, per-group accuracy) and whose corruptions
    the ALIGN warm-start uses: a built-in name (grids, the demo task) or module.path:attribute
    (prism.core.task). null: none — accuracy and format metrics only."""
    format: Literal["auto", "sharegpt", "verl", "prism"] = "auto"
    max_length: int = Field(1024, gt=0)
    """Examples longer than this many tokens are dropped (with a count in the log)."""
    image_max_pixels: int | None = Field(None, gt=0)
    """Resize every image to at most this many pixels (the processor's smart_resize: sides multiples of
    patch x merge, aspect kept), in collation, corpus lengths, every sampler and the discriminator alike.
    null: the checkpoint's bound (Qwen3-VL's 16,777,216 px = up to 16,384 visual tokens an image; e.g.
    1003520 = 980 tokens at Qwen3-VL's 32 px per token, LLaMA-Factory's 768 x 768 default 589824)."""
    image_min_pixels: int | None = Field(None, gt=0)
    """Resize every image to at least this many pixels (null: the checkpoint's bound)."""
    skip_bad: bool = False
    """Skip bad examples with one warning and a count instead of stopping."""
    eval_limit: int | None = Field(256, gt=0)
    """Evaluate on at most this many held-out examples (null: all)."""
    num_workers: int = Field(0, ge=0)
    """SFT: loader worker processes that build each step's batches (image decode, chat template,
    processor) ahead of the training step (prism.data.loader); 0: in the training process."""
    prefetch: int = Field(2, gt=0)
    """Steps each loader worker keeps ready."""


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
    max_param_change: float | None = Field(1.0, gt=0)
    """Stop the run, before the step is saved, when one optimizer step changes the norm of the trainable
    parameters by more than this fraction of it (|‖θ'‖ − ‖θ‖| / ‖θ‖; healthy steps: well under 0.01; a far
    too high learning rate: ≫ 1). Guards every trained model of the run (the discriminator too). null: off."""


class RunSettings(Section):
    """What every stage's run has: where it writes, how long it runs, how it saves and resumes."""

    output_dir: str = "runs/sft"
    max_steps: int = Field(100, gt=0)
    """Optimizer steps to run."""
    seed: int = 0
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = Field(2, gt=0)
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """auto: the newest checkpoint in output_dir that loads, if any; none: start fresh; or a checkpoint path."""
    overwrite: bool = False
    """Let a fresh run (or one resumed from a checkpoint path) delete the checkpoints and logs of another run
    in output_dir. Without it such a start stops with one line: an output dir holds one run."""
    log_every: int = Field(1, gt=0)
    cpu: bool = False
    """Force CPU even when a GPU is visible."""


class EvalSettings(Section):
    backend: Literal["native", "hf"] = "native"
    """The rollout backend of held-out evaluation (as rollout.backend)."""
    every: int = Field(0, ge=0)
    """Evaluate every this many steps (0: only at the end)."""
    chunk_size: int = Field(32, gt=0)
    """Sequences per generate call (as rollout.chunk_size)."""
    max_new_tokens: int = Field(192, gt=0)
    temperature: float = Field(1.0, ge=0)
    """Besides the greedy evaluation (eval/...), one sample per example at this temperature
    (eval_sampled/...); 0: greedy only."""


class LoggingSettings(Section):
    tensorboard: bool = True
    wandb_project: str | None = None
    """Log to this wandb project (offline mode when no WANDB_API_KEY is set)."""
    run_name: str | None = None


class OnPolicyRunSettings(RunSettings):
    """A run that samples its own data (RL, ALIGN): prompts per step instead of examples per micro-batch."""

    output_dir: str = "runs/rl"
    prompts_per_step: int = Field(4, gt=0)
    """Prompts per process per step; each is sampled rollout.group_size times."""


class VLLMSettings(Section):
    """The colocated vLLM engine of `rollout.backend=vllm` (prism.rollout.vllm_engine): one `vllm.LLM` in
    each training process, on that process's device."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Fraction of the device's memory vLLM may take (weights + KV cache); the rest is the trainer's.
    On a CPU, vLLM reads it as a fraction of the machine's memory: set kv_cache_memory_bytes there."""
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    """The KV cache's size in bytes, instead of deriving it from gpu_memory_utilization."""
    max_model_len: int | None = Field(None, gt=0)
    """Longest prompt + response in tokens (default: the model's context length)."""
    enable_prefix_caching: bool = True
    """The G samples of a prompt share its prefill and its image encoding."""
    tensor_parallel_size: int = Field(1, gt=0)
    """GPUs one engine spans (a model that does not fit one GPU); untested: prism has no multi-GPU vLLM test."""
    enable_sleep_mode: bool = False
    """CUDA: free the engine's weights and KV cache while the trainer computes, back before each rollout."""
    enforce_eager: bool = False
    """No CUDA graphs (faster start, slower decoding)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """The engine's dtype; auto: the policy's parameter dtype, so both compute the same distribution."""
    sync_chunk_mb: int = Field(1024, gt=0)
    """Weight sync moves the policy into the engine this many MB at a time (bounds the extra memory)."""


class RolloutSettings(Section):
    backend: Literal["native", "hf", "vllm"] = "native"
    """Which rollout backend samples (prism.rollout.BACKENDS): native = prism's sampler (one prefill per
    prompt, static KV cache; prism.rollout.native), hf = transformers' generate, vllm = a colocated vLLM
    engine (`rollout.vllm`; `pip install -e ".[vllm]"`). A model native cannot run (sharded weights) falls
    back to hf with a warning."""
    vllm: VLLMSettings = VLLMSettings()
    compile: bool = False
    """native: torch.compile the decode step (CUDA graphs on a GPU). Costs one compile per process and
    batch-size bucket (~15 s on a CPU for the tiny model); falls back to eager decoding if compiling fails."""
    group_size: int = Field(8, gt=0)
    """Samples per prompt (G); advantages are normalised within each group."""
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy). Log-probs for the loss use the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """0 disables top-k."""
    chunk_size: int = Field(64, gt=0)
    """Sequences per `generate` call (bounds generation memory)."""
    logprob_chunk_size: int = Field(32, gt=0)
    """Sequences per forward when computing old / reference log-probs without gradients."""
    logprob_token_budget: int | None = Field(None, gt=0)
    """Instead of logprob_chunk_size: sequences per such forward within this many padded tokens."""


class AlgoSettings(Section):
    """The clipped policy update shared by ALIGN and RL (prism.losses.policy, docs/design.md §5)."""

    name: Literal["grpo", "dapo", "gspo"] = "grpo"
    """Policy loss; `prism-rl --algo` sets it."""
    clip_low: float | None = Field(None, ge=0, lt=1)
    """ε_lo (null: the algorithm's default: 0.2, 0.2, 3e-4 for grpo, dapo, gspo)."""
    clip_high: float | None = Field(None, ge=0)
    """ε_hi (null: the algorithm's default: 0.2, 0.28, 4e-4)."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] | None = None
    """Loss aggregation (null: the algorithm's default: seq-mean-token-mean, token-mean, seq-mean-token-mean)."""
    clip_ratio_c: float | None = Field(None, gt=1)
    """Dual-clip c (grpo, dapo): the loss of a token with A < 0 is capped at −A·c (prism.losses.policy).
    null (default): off, the plain clipped surrogate of the GRPO and DAPO papers; verl defaults to 3."""
    ppo_epochs: int = Field(1, gt=0)
    """Passes over each rollout batch."""
    mini_batches: int = Field(1, gt=0)
    """Optimizer steps per pass (the rollout batch is split by prompt groups)."""
    micro_batch_size: int = Field(16, gt=0)
    """Sequences per forward/backward (gradient accumulation inside a mini-batch)."""
    micro_token_budget: int | None = Field(None, gt=0)
    """Instead of micro_batch_size: sequences per forward/backward such that sequences x longest
    (prompt + response) tokens <= this budget (similar lengths grouped; the update is unchanged)."""
    tis_cap: float | None = Field(None, gt=0)
    """Truncated importance sampling: weight each token's loss by min(π_old / π_rollout, tis_cap), where
    π_rollout is the sampler's log-prob (vLLM's, under rollout.backend=vllm); null (default): off."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std (GRPO); false: only centre them (Dr. GRPO)."""
    kl_coef: float = Field(0.0, ge=0)
    """β of a KL(π‖π_ref) term in the loss; 0 (default) loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    dynamic_sampling: bool | None = None
    """Drop groups that are uniform in `filter_metric` and sample more (DAPO); null: on for dapo only."""
    filter_metric: Literal["accuracy", "reward"] = "accuracy"
    """What dynamic sampling finds uniform in a group to drop it: its accuracy (default, as DAPO and the
    PRISM reference: a group all right or all wrong teaches nothing about correctness) or its total reward
    (format and overlong shaping included, which keeps groups that differ only in format)."""
    max_num_gen_batches: int = Field(4, gt=0)
    """Generation rounds per step under dynamic sampling before giving up."""
    overlong_buffer: int | None = Field(None, ge=0)
    """L_buf of DAPO's overlong shaping; null: max_new_tokens // 4 for dapo, off otherwise; 0: off."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Penalty factor of the overlong shaping."""

    @model_validator(mode="after")
    def _dual_clip_needs_a_token_ratio(self):
        if self.clip_ratio_c is not None and self.name == "gspo":
            raise ValueError("clip_ratio_c: dual-clip applies to grpo and dapo (a per-token ratio), not gspo")
        return self


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


def _onto_defaults(cls: type[BaseModel], defaults: dict, update: dict) -> dict:
    """`update` merged onto a config's dumped defaults: sections recurse, every other value
    (a dict-valued field such as `reward.functions` included) is replaced whole."""
    out = dict(defaults)
    for k, v in update.items():
        field = cls.model_fields.get(k)
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, Section) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _onto_defaults(sub, out[k], v)
        else:
            out[k] = v
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


def one_line_error(err: ValidationError, origin: str) -> str:
    """A pydantic validation error as one line: `origin: dotted.key: what is wrong (got value)`."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden":
        return f"{origin}: unknown config key '{key}'"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else ""
    return f"{origin}: {key}: {e['msg']}{got}{more}"


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, f"{prefix}{k}."))
    return out


def _check_renamed(cls: type[BaseModel], data: dict, origin: str) -> None:
    renamed = getattr(cls, "renamed", {})
    for key in _dotted_keys(data):
        if key in renamed:
            raise ConfigError(f"{origin}: config key '{key}' was renamed to '{renamed[key]}'")


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
    _check_renamed(cls, data, origin)
    # Merge onto the stage's own defaults (not the section classes'), so that overriding one key of
    # a section whose defaults differ per stage (RL's lr 1e-6, say) keeps that stage's other defaults.
    data = _onto_defaults(cls, cls().model_dump(), data)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line_error(e, origin)) from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict, now: dict) -> list[str]:
    """`dotted.key: saved -> now` for every leaf of two nested mappings that differs (a missing one: (none))."""
    a, b = _flat(saved), _flat(now)
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
