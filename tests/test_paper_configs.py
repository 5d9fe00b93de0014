"""configs/paper/: the paper's recipe loads with the paper's settings, and each config runs 2 steps with
its model and data paths pointed at the tiny model and the synthetic task."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.align.config import AlignConfig
from prism.core.config import load_config
from prism.rl.config import RLConfig
from prism.sft.config import SFTConfig
from prism.tasks.grids.generator import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))
STAGES = {"sft": SFTConfig, "align": AlignConfig, "rl": RLConfig}


def _stage(path: Path) -> str:
    return path.name.split("_")[0]


def test_there_is_a_recipe_per_stage_and_size():
    assert sorted(p.name for p in PAPER) == sorted(f"{s}_{n}.yaml" for s in STAGES for n in ("4b", "8b"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_loads_with_the_paper_settings(path):
    cfg = load_config(STAGES[_stage(path)], path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file configs/accelerate/") and f"--config {path.relative_to(REPO)}" in first
    assert cfg.model.freeze_vision and cfg.model.freeze_merger and cfg.model.dtype == "bfloat16"
    assert cfg.model.chat_template == "auto" and "Thinking checkpoint" in path.read_text()  # the Instruct template
    if _stage(path) == "sft":
        o = cfg.optim
        assert (o.lr, o.scheduler, o.warmup_ratio) == (1e-5, "cosine", 0.1)
        return
    assert cfg.rollout.group_size == 16 and cfg.rollout.temperature == 1.0 and cfg.optim.lr == 1e-6
    assert cfg.algo.kl_coef == 0 and cfg.algo.clip_ratio_c == 3.0
    if _stage(path) == "align":
        d = cfg.discriminator
        assert cfg.train.max_steps == 500 and cfg.align.alpha == 0.5 and d.lr == 1e-6
        assert (d.experts, d.reasoning_span, cfg.algo.loss_agg) == ("upcycled", "think_answer", "token-mean")
        assert "--num_processes 4" in first and cfg.train.prompts_per_step == 1  # 4 prompts x 16 rollouts
    else:
        assert cfg.train.max_steps == 1500 and cfg.reward.functions == {"accuracy": 0.8, "format": 0.2}
        assert cfg.algo.filter_metric == "accuracy"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-paper")
    generate(SynthConfig(out=str(out), n=32, n_curated=8, n_align=8, n_rl=8, n_test=4, seed=7))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_runs_two_steps_on_the_tiny_model(path, tiny_model_dir, tiny_moe_dir, synth_dir, tmp_path):
    stage = _stage(path)
    overrides = [f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path}", "train.max_steps=2",
                 "logging.tensorboard=false", "data.max_length=512"]
    if stage == "sft":
        from prism.sft.train import train

        overrides += [f"data.train={synth_dir}/public.jsonl", "train.micro_batch_size=2", "train.grad_accum=2"]
    else:
        overrides += ["rollout.max_new_tokens=8", "rollout.group_size=4"]
    if stage == "align":
        from prism.align.train import train

        overrides += [f"data.train={synth_dir}/align.jsonl", f"discriminator.path={tiny_moe_dir}", "warmup.steps=1",
                      "warmup.pairs_per_step=2", "warmup.eval_pairs=2"]
    if stage == "rl":
        from prism.rl.train import train

        overrides += [f"data.train={synth_dir}/rl.jsonl", "train.prompts_per_step=2"]
    metrics = train(load_config(STAGES[stage], path, overrides))
    assert (tmp_path / "checkpoint-000002" / "trainer_state.json").is_file()
    loss = metrics["train/loss"] if stage == "sft" else metrics["actor/loss"]
    assert loss == loss  # finite, not NaN
