"""`prism-align`'s config: the shared sections (`prism.core.config`), the discriminator, the game and
the warm-start."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prism.align.discriminator import DiscriminatorConfig
from prism.core.config import (
    AlgoSettings,
    DataSettings,
    EvalSettings,
    LoggingSettings,
    ModelSettings,
    OnPolicyRunSettings,
    OptimSettings,
    RolloutSettings,
    Section,
)


class DiscriminatorSettings(DiscriminatorConfig):
    """The MoE discriminator: its architecture (`DiscriminatorConfig`, saved with it) and how it trains."""

    path: str | None = None
    """A Qwen-VL directory to build fresh experts on (the SFT policy, the base or a smaller model), or a saved
    discriminator (e.g. OUTPUT_DIR/warmup). null: model.path, the starting policy."""
    chat_template: str = "auto"
    """The discriminator's chat template (as model.chat_template; a saved discriminator keeps the one it
    was trained with)."""
    reg: float = Field(1e-3, ge=0)
    """λ_reg of the score-magnitude term in the discriminator loss."""
    lr: float = Field(1e-4, gt=0)
    """The discriminator's own learning rate (AdamW, constant)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay of the discriminator (torch's AdamW default)."""
    steps_per_policy_step: int = Field(1, gt=0)
    """Discriminator updates on each batch of rollouts."""
    prompts_per_micro_batch: int = Field(8, gt=0)
    """Prompts per discriminator forward/backward (each with its G rollouts and its reference)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    device: str | None = None
    """Where the discriminator computes: unset, each process's own device (the policy's); or a torch
    device such as "cpu", or "cuda:1" in a one-process run, to keep it off the policy's GPU."""
    offload: bool = False
    """Keep the discriminator and its optimizer state in CPU memory outside its own phases (warm-start,
    scoring, update), moving them to `device` for those: frees accelerator memory for generation and
    the policy update, at the cost of two host-device copies per step."""

    collapse_window: int = Field(10, ge=0)
    """Steps over which the collapse watch looks for a discriminator that stopped playing (scores pinned at
    ±score_clip, loss frozen, an expert's accuracy stuck at 0; `prism.align.monitor`). 0: off."""
    stop_on_collapse: bool = False
    """Stop the run (before the step is saved) on a sign of collapse, instead of a warning."""

    def architecture(self) -> DiscriminatorConfig:
        """The fields saved with the discriminator."""
        return DiscriminatorConfig(**self.model_dump(include=set(DiscriminatorConfig.model_fields)))


class AlignSettings(Section):
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the perception expert in the advantage (1: perception only, 0: reasoning only)."""
    format_penalty: float = Field(1.5, ge=0)
    """Subtracted from the advantage of format-invalid rollouts."""
    skip_missing_references: bool = False
    """Skip alignment prompts without a teacher reference (with a count) instead of stopping."""


class WarmupSettings(Section):
    """Discriminator warm-start before the game: each expert on (teacher reference, negative) pairs."""

    steps: int = Field(50, ge=0)
    """Warm-start optimizer steps (0: none)."""
    pairs_per_step: int = Field(16, gt=0)
    """Pairs per process per step."""
    negatives: Literal["policy", "corrupt"] = "policy"
    """policy: a sample of the starting policy for the same prompt; corrupt: the reference with one caption
    error and one reasoning error (the task's, `data.task`, else word-level)."""
    eval_pairs: int = Field(32, ge=0)
    """Prompts held out to report pairwise accuracy per expert."""
    data: str | None = None
    """Prompts with teacher references for the warm-start (e.g. the curated pool); default: data.train."""


class AlignConfig(Section):
    """`prism-align`: the minimax game between the policy and the MoE discriminator (docs/design.md §4)."""

    renamed = {"train.batch_size": "train.prompts_per_step",
               "discriminator.micro_batch_size": "discriminator.prompts_per_micro_batch",
               "warmup.batch_size": "warmup.pairs_per_step", "eval.batch_size": "eval.chunk_size"}

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings(max_length=512, eval_limit=128)
    rollout: RolloutSettings = RolloutSettings()
    algo: AlgoSettings = AlgoSettings()
    discriminator: DiscriminatorSettings = DiscriminatorSettings()
    align: AlignSettings = AlignSettings()
    warmup: WarmupSettings = WarmupSettings()
    optim: OptimSettings = OptimSettings(lr=1e-6, warmup_ratio=0.0, scheduler="constant")
    train: OnPolicyRunSettings = OnPolicyRunSettings(output_dir="runs/align")
    eval: EvalSettings = EvalSettings()
    logging: LoggingSettings = LoggingSettings()
