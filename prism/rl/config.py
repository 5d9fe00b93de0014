"""`prism-rl`'s config: the shared sections (`prism.core.config`) and the reward."""

from __future__ import annotations

from typing import Literal

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


class RewardSettings(Section):
    functions: dict[str, float] = {"accuracy": 0.8, "format": 0.2}
    """Reward = Σ weight · function; names from prism.rewards or `module.path:function` (a batch function
    fn(responses, examples), or verl's compute_score(data_source, solution_str, ground_truth, extra_info))."""
    answer_format: Literal["answer", "boxed", "either"] = "answer"
    """Where the final answer is read from, for the accuracy and format rewards and for the held-out
    evaluation alike: `answer` (the <answer> tag), `boxed` (the last \\boxed{…}; format = exactly one
    box), `either` (the tag if present, else the last box; format = either one)."""
    by_data_source: dict[str, dict[str, float]] | None = None
    """{data_source: weights} (as `functions`) for the rows of that data source; other rows use `functions`."""


class RLConfig(Section):
    """`prism-rl`: RLVR with GRPO, DAPO or GSPO and verifiable rewards (docs/design.md §5)."""

    renamed = {"train.batch_size": "train.prompts_per_step", "eval.batch_size": "eval.chunk_size"}

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings(max_length=512, eval_limit=256)
    rollout: RolloutSettings = RolloutSettings()
    algo: AlgoSettings = AlgoSettings()
    reward: RewardSettings = RewardSettings()
    optim: OptimSettings = OptimSettings(lr=1e-6, warmup_ratio=0.0, scheduler="constant")
    train: OnPolicyRunSettings = OnPolicyRunSettings()
    eval: EvalSettings = EvalSettings()
    logging: LoggingSettings = LoggingSettings()
