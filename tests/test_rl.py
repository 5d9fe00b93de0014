"""`prism-rl` on the tiny model: every algorithm moves the policy, DAPO's dynamic sampling drops exactly
the all-equal groups, resume is exact, bad input stops with one line; and `prism-rl filter`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prism.core.config import ConfigError, load_config
from prism.core.errors import DataError, RunError
from prism.core.example import Example
from prism.rl.config import RLConfig
from prism.data.formats import load_examples
from prism.tasks.grids.generator import SynthConfig, generate
from prism.rewards import RewardModel
from prism.rl import filter as rl_filter
from prism.rl import train as rl
from prism.rollout.engine import Rollouts

REPO = Path(__file__).resolve().parents[1]
# A random model never answers correctly; a reward on response length gives groups unequal rewards.
REWARD_MODULE = "def length(responses, examples):\n    return [min(len(r), 60) / 60 for r in responses]\n"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-rl")
    generate(SynthConfig(out=str(out), n=16, n_curated=4, n_align=4, n_rl=12, n_test=4, seed=2))
    return out


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "rl_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sys.modules.pop("rl_test_rewards", None)
    return "rl_test_rewards:length"


def _overrides(model_dir, data_dir, out_dir, **extra) -> list[str]:
    base = {
        "model.path": model_dir, "data.train": f"{data_dir}/rl.jsonl", "data.eval": f"{data_dir}/test.jsonl",
        "data.eval_limit": 2, "train.output_dir": out_dir, "train.prompts_per_step": 2, "train.max_steps": 2,
        "rollout.group_size": 4, "rollout.max_new_tokens": 12, "optim.lr": 1e-3, "eval.max_new_tokens": 6,
        "logging.tensorboard": False, "algo.micro_batch_size": 3,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, dict) or v is None else v}" for k, v in base.items()]


def _cfg(model_dir, data_dir, out_dir, **extra) -> RLConfig:
    return load_config(RLConfig, None, _overrides(model_dir, data_dir, out_dir, **extra))


def _rows(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, Path(out_dir, "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo"])
def test_two_steps_move_every_trainable_parameter(tiny_model_dir, synth_dir, tmp_path, reward_module, algo):
    extra = {"algo.name": algo, "reward.functions": {reward_module: 1.0}, "model.freeze_vision": False,
             "model.freeze_merger": False, "algo.dynamic_sampling": False}
    if algo == "gspo":  # GSPO's 3e-4 clip would freeze a random model's very first update
        extra.update({"algo.clip_low": 0.2, "algo.clip_high": 0.2})
    metrics = rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **extra))
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(
        str(tmp_path / "checkpoint-000002" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k]) and "norm" not in k]
    # the vision tower only gets gradients through the prompt's image tokens; all of it must move too
    assert not unchanged, unchanged[:5]
    for key in ("rollout/reward", "rollout/accuracy", "rollout/format", "rollout/length", "actor/clip_frac",
                "actor/entropy", "actor/approx_kl", "rollout/dropped_groups", "time/generation", "time/scoring",
                "time/update", "eval/accuracy", "eval_sampled/accuracy"):
        assert key in metrics, key
    state = json.loads((tmp_path / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["cursor"] == 2


class _FakeBackend:
    """Returns pre-made rollouts whose texts are their rewards ('1' / '0'), one round after another."""

    def __init__(self, rounds: list[list[str]], group_size: int):
        self.rounds, self.G = list(rounds), group_size

    def sync_weights(self, model):
        pass

    def rollout(self, examples, params):
        texts = self.rounds.pop(0)
        n = len(texts)
        assert n == len(examples) * params.n
        return Rollouts(
            prompt={"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long)},
            images_per_row=torch.zeros(n, dtype=torch.long), response_ids=torch.arange(n).view(n, 1),
            response_mask=torch.ones(n, 1, dtype=torch.bool), log_probs=torch.zeros(n, 1), texts=texts,
            finish_reasons=["stop"] * n, suppress_ids=torch.zeros(0, dtype=torch.long), pad_token_id=0,
            group_size=self.G)


def _value_reward(responses, examples):
    return [float(r) for r in responses]


class _Acc:
    """One process: reductions over processes are the identity."""
    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor.clone()


def _collector(rounds, batch_size=2, G=2, max_rounds=3):
    cfg = load_config(RLConfig, None, [f"train.prompts_per_step={batch_size}", f"rollout.group_size={G}",
                                       "algo.name=dapo", f"algo.max_num_gen_batches={max_rounds}",
                                       "algo.overlong_buffer=0", "algo.filter_metric=reward"])
    prompts = [Example(messages=[{"role": "user", "content": f"q{i}"}], answer="1") for i in range(8)]
    rewards = RewardModel({f"{__name__}:_value_reward": 1.0})  # this module's reward, imported by name
    return rl.BatchCollector(cfg, _Acc(), _FakeBackend(rounds, G), prompts, rewards)


def test_dynamic_sampling_drops_exactly_the_all_equal_groups():
    # round 1: groups [1,1] (all equal, dropped), [1,0] (kept); round 2: [0,0] dropped, [0,1] kept
    collector = _collector([["1", "1", "1", "0"], ["0", "0", "0", "1"]])
    rollouts, rewards, metrics = collector.collect(step=1)
    assert rollouts.texts == ["1", "0", "0", "1"] and rewards.tolist() == [1, 0, 0, 1]
    assert metrics["rollout/dropped_groups"] == 2 and metrics["rollout/gen_rounds"] == 2
    assert metrics["rollout/kept_groups"] == 2
    assert collector.cursor == 2  # both prompt batches were consumed
    assert metrics["rollout/reward"] == pytest.approx(0.5)  # monitored over everything sampled


def test_dynamic_sampling_trims_to_the_batch_and_gives_up_after_max_rounds():
    collector = _collector([["1", "0", "0", "1"]])
    rollouts, _, _ = collector.collect(step=1)
    assert len(rollouts) == 4  # nothing dropped, one round
    collector = _collector([["1", "1", "0", "0"]] * 3)
    with pytest.raises(RunError, match="dropped every group in 3 generation rounds"):
        collector.collect(step=7)
    # a partly filled batch after the last round trains on what it has
    collector = _collector([["1", "1", "0", "0"], ["1", "1", "1", "0"], ["0", "0", "0", "0"]])
    rollouts, _, metrics = collector.collect(step=1)
    assert rollouts.texts == ["1", "0"] and metrics["rollout/kept_groups"] == 1


@pytest.mark.slow
def test_resume_continues_exactly(tiny_model_dir, synth_dir, tmp_path, reward_module):
    extra = {"reward.functions": {reward_module: 1.0}, "train.max_steps": 3, "data.eval": None,
             "algo.ppo_epochs": 2, "algo.mini_batches": 2}
    rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "full", **extra))
    rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "part", **{**extra, "train.max_steps": 1}))
    # resumed with 2 loader processes decoding the prompts' images ahead: the same batches, in order
    rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "part", **{**extra, "data.num_workers": 2,
                                                                   "data.prefetch": 1}))
    full, part = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    for step in (2, 3):
        for key in ("rollout/reward", "rollout/length", "actor/loss", "actor/approx_kl"):
            assert full[step][key] == pytest.approx(part[step][key], abs=1e-6), (step, key)


@pytest.mark.slow
def test_kl_to_a_reference_is_logged_and_zero_on_the_first_step(tiny_model_dir, synth_dir, tmp_path, reward_module):
    metrics_file = tmp_path / "metrics.jsonl"
    rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **{"reward.functions": {reward_module: 1.0},
                                                          "algo.kl_coef": 0.1, "data.eval": None}))
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    assert rows[0]["actor/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert rows[1]["actor/kl"] > 0


def test_bad_configs_are_refused(tiny_model_dir, synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="rollout.group_size: 1 with grpo.*always zero"):
        rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **{"rollout.group_size": 1}))
    with pytest.raises(ConfigError, match="reward.functions: cannot import 'no.such.module:fn'"):
        rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **{"reward.functions": {"no.such.module:fn": 1.0}}))
    rows = [json.loads(x) for x in (synth_dir / "rl.jsonl").read_text().splitlines()[:3]]
    rows[1]["answer"] = ""
    bad = tmp_path / "no_answer.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        r["images"] = [str(synth_dir / p) for p in r["images"]]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="no_answer.jsonl:2: no answer"):
        rl.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **{"data.train": bad}))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from prism.cli import rl; import sys; sys.argv[0] = 'prism-rl'; rl()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=REPO)


def test_cli_lists_the_algorithms_for_an_unknown_one():
    proc = _cli("--algo", "ppo")
    assert proc.returncode == 2 and "invalid choice: 'ppo'" in proc.stderr and "'dapo', 'grpo', 'gspo'" in proc.stderr


@pytest.mark.slow
def test_filter_keeps_problems_strictly_inside_the_band(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    # pass rates by construction: problem i gets i % 3 of its 2 samples right -> 0, 0.5, 1, 0, 0.5, ...
    def fake_accuracy(texts, examples):
        return [float(j < int(ex.meta["id"][-2:]) % 3) for j, ex in enumerate(examples) for j in [j % 2]]

    monkeypatch.setattr(rl_filter, "accuracy_reward", fake_accuracy)
    out = tmp_path / "matched.jsonl"
    summary = rl_filter.main(["--model", str(tiny_model_dir), "--data", str(synth_dir / "rl.jsonl"), "--k", "2",
                              "--band", "0,1", "--max-n", "3", "--out", str(out), "--max-new-tokens", "4"])
    kept = load_examples(out)
    ids = [int(ex.meta["id"][-2:]) for ex in kept]
    assert ids == [1, 4, 7] and all(ex.meta["pass_rate"] == 0.5 for ex in kept)  # max-n 3 of 4 in band
    assert summary["solved_all"] == 4 and summary["solved_none"] == 4 and summary["kept"] == 3
    with pytest.raises(SystemExit):
        rl_filter.main(["--model", "m", "--data", "d", "--out", "o", "--band", "0.5,0.2"])


def test_policy_update_is_the_same_with_fixed_or_token_budget_micro_batches(tiny_model_dir, synth_dir):
    from prism.core.config import AlgoSettings, ModelSettings
    from prism.dist import ModelUpdate, make_accelerator
    from prism.models.loader import load_model
    from prism.models.processor import load_processor
    from prism.loop.policy_update import policy_update
    from prism.rollout.engine import SamplingParams, sample

    processor = load_processor(tiny_model_dir)
    prompts = load_examples(synth_dir / "rl.jsonl", limit=3)
    acc = make_accelerator()
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    weights = []
    for algo in (AlgoSettings(micro_batch_size=4, ppo_epochs=2), AlgoSettings(micro_token_budget=150, ppo_epochs=2)):
        torch.manual_seed(0)
        model = load_model(ModelSettings(path=str(tiny_model_dir)), trainable=True)
        rollouts = sample(model, processor, prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=10))
        adv = torch.linspace(-1, 1, len(rollouts))
        params = [p for p in model.parameters() if p.requires_grad]
        update = ModelUpdate(acc, model, torch.optim.SGD(params, lr=1.0), params, max_grad_norm=None)
        policy_update(update, rollouts, adv, algo, temperature=1.0, logprob_chunk_size=4, logprob_token_budget=150)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in weights[0]:  # the same update, whichever way the rows were split into forwards
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-5, rtol=0, msg=k)
    assert any(not torch.equal(weights[0][k], initial[k]) for k in initial)  # and there was an update


def test_dynamic_sampling_filters_on_accuracy_by_default():
    # Group 1: rewards differ (format-like part) but every answer is wrong -> uniform accuracy, dropped by
    # default; group 2: one right answer -> kept. With filter_metric=reward both groups are kept.
    texts = ["<answer>0</answer>", "x", "<answer>1</answer>", "y"]  # answer "1" is right
    for metric, kept in (("accuracy", ["<answer>1</answer>", "y"]), ("reward", texts)):
        cfg = load_config(RLConfig, None, ["train.prompts_per_step=2", "rollout.group_size=2", "algo.name=dapo",
                                           "algo.max_num_gen_batches=1", "algo.overlong_buffer=0",
                                           f"algo.filter_metric={metric}"])
        prompts = [Example(messages=[{"role": "user", "content": f"q{i}"}], answer="1") for i in range(2)]
        # the reward (response length) differs inside both groups
        collector = rl.BatchCollector(cfg, _Acc(), _FakeBackend([texts], 2), prompts, _LengthReward())
        rollouts, rewards, metrics = collector.collect(step=1)
        assert rollouts.texts == kept, metric
        assert metrics["rollout/dropped_groups"] == (1 if metric == "accuracy" else 0)


class _LengthReward:
    def __call__(self, responses, examples):
        values = torch.tensor([float(len(r)) for r in responses])
        return values, {"length": values}


def test_sampler_log_prob_mismatch_is_measured_and_truncated_is_corrects_for_it(tiny_model_dir, synth_dir):
    """`logprob_diff_*` compares the sampler's log-probs with the trainer's π_old: ~0 for prism's own
    sampler, exactly the offset when the sampler's log-probs are shifted; with algo.tis_cap the loss is
    weighted by min(π_old / π_rollout, C), so halving the sampler's probabilities doubles the update."""
    from dataclasses import replace

    from prism.core.config import AlgoSettings, ModelSettings
    from prism.dist import ModelUpdate, make_accelerator
    from prism.loop.policy_update import policy_update
    from prism.models.loader import load_model
    from prism.models.processor import load_processor
    from prism.rollout.engine import SamplingParams, sample

    processor = load_processor(tiny_model_dir)
    prompts = load_examples(synth_dir / "rl.jsonl", limit=2)
    acc = make_accelerator()
    torch.manual_seed(0)
    model = load_model(ModelSettings(path=str(tiny_model_dir)), trainable=True)
    rollouts = sample(model, processor, prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=8),
                      backend="native")
    adv = torch.linspace(-1, 1, len(rollouts))
    shifted = replace(rollouts, log_probs=rollouts.log_probs - 0.5 * rollouts.response_mask)

    def run(r, algo):
        m = load_model(ModelSettings(path=str(tiny_model_dir)), trainable=True)
        params = [p for p in m.parameters() if p.requires_grad]
        before = {k: v.detach().clone() for k, v in m.named_parameters()}
        metrics = policy_update(ModelUpdate(acc, m, torch.optim.SGD(params, lr=1.0), params, max_grad_norm=None),
                                r, adv, algo, temperature=1.0, logprob_chunk_size=4)
        return metrics, {k: v.detach() - before[k] for k, v in m.named_parameters()}

    plain, step = run(rollouts, AlgoSettings())
    assert plain["logprob_diff_mean"] < 1e-5 and plain["logprob_diff_max"] < 1e-4
    off, _ = run(shifted, AlgoSettings(ppo_epochs=2))  # π_old recomputed before the first step: same measure
    assert off["logprob_diff_mean"] == pytest.approx(0.5, abs=1e-4) and off["logprob_diff_max"] == pytest.approx(0.5, abs=1e-4)
    # π_old / π_rollout = e^0.5 ≈ 1.65 on every token: capped at 3 it scales the loss (and SGD's step) by e^0.5
    tis, tis_step = run(shifted, AlgoSettings(tis_cap=3.0))
    assert tis["tis_weight_mean"] == pytest.approx(math.exp(0.5), rel=1e-4)
    moved = [k for k in step if step[k].abs().max() > 1e-3]  # SGD at lr 1: the step is the gradient
    assert moved and all((tis_step[k] - math.exp(0.5) * step[k]).norm() <= 1e-3 * tis_step[k].norm() for k in moved)
    capped, _ = run(shifted, AlgoSettings(tis_cap=1.2))
    assert capped["tis_weight_mean"] == pytest.approx(1.2)
