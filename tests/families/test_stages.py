"""Every stage on every family (the suite's models, `conftest.py`): prism-sft, prism-rl (GRPO) and prism-align
run their loops end to end, and each moves the policy (and ALIGN the discriminator's experts)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from prism.align import train as align
from prism.align.config import AlignConfig
from prism.core.config import load_config
from prism.rl import train as rl
from prism.rl.config import RLConfig
from prism.sft import train as sft
from prism.sft.config import SFTConfig
from prism.tasks.grids.generator import SynthConfig, generate

pytestmark = [pytest.mark.families, pytest.mark.slow]

LENGTH_REWARD = "def length(responses, examples):\n    return [min(len(r), 60) / 60 for r in responses]\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("family-stages")
    generate(SynthConfig(out=str(out / "data"), n=16, n_curated=4, n_align=4, n_rl=4, n_test=2, seed=4))
    (out / "family_stage_rewards.py").write_text(LENGTH_REWARD)  # a random policy's groups get unequal rewards
    sys.path.insert(0, str(out))
    yield out / "data"
    sys.path.remove(str(out))


def moved(before_dir, after_dir) -> bool:
    """Whether a language-model weight changed (Qwen2-VL and Qwen2.5-VL save theirs as model.layers.*, the others
    as model.language_model.layers.*; the vision tower is frozen here)."""
    before, after = load_file(str(before_dir / "model.safetensors")), load_file(str(after_dir / "model.safetensors"))
    return any(not torch.equal(before[k], after[k]) for k in before if "visual" not in k)


def common(case, out) -> list[str]:
    return [f"model.path={case.path}", f"model.chat_template={case.chat_template}", f"train.output_dir={out}",
            "logging.tensorboard=false", "data.eval=null", "optim.warmup_ratio=0"]


def test_prism_sft_trains_every_family(case, data, tmp_path):
    cfg = load_config(SFTConfig, None, common(case, tmp_path) + [
        f"data.train={data}/curated.jsonl", "train.max_steps=2", "train.micro_batch_size=2", "optim.lr=1e-3"])
    metrics = sft.train(cfg)
    assert math.isfinite(metrics["train/loss"]) and moved(case.path, tmp_path / "checkpoint-000002")


def test_prism_rl_trains_every_family(case, data, tmp_path):
    cfg = load_config(RLConfig, None, common(case, tmp_path) + [
        f"data.train={data}/rl.jsonl", "train.max_steps=2", "train.prompts_per_step=2", "rollout.group_size=3",
        "rollout.max_new_tokens=10", "optim.lr=1e-3", "algo.micro_batch_size=3",
        'reward.functions={"family_stage_rewards:length": 1.0}'])
    metrics = rl.train(cfg)
    assert metrics["rollout/logprob_diff_max"] < 1e-4  # the sampler's log-probs are the trainer's π_old
    assert moved(case.path, tmp_path / "checkpoint-000002")


def test_prism_align_trains_every_family(case, data, tmp_path, monkeypatch):
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)  # a random policy writes no valid response
    cfg = load_config(AlignConfig, None, common(case, tmp_path) + [
        f"data.train={data}/align.jsonl", f"discriminator.path={case.path}",
        f"discriminator.chat_template={case.chat_template}", "train.max_steps=2", "train.prompts_per_step=2",
        "rollout.group_size=3", "rollout.max_new_tokens=10", "optim.lr=1e-3", "discriminator.lr=1e-2",
        "warmup.steps=1", "warmup.pairs_per_step=2", "warmup.eval_pairs=2", "algo.micro_batch_size=3"])
    metrics = align.train(cfg)
    assert math.isfinite(metrics["disc/loss"]) and metrics["rollout/logprob_diff_max"] < 1e-4
    ckpt = tmp_path / "checkpoint-000002"
    assert moved(case.path, ckpt)
    saved = json.loads((ckpt / "discriminator" / "discriminator.json").read_text())
    assert saved["experts"] == "adapters"
