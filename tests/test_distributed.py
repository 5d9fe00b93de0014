"""Multi-process paths with 2 CPU processes (gloo): the RL / ALIGN updates give the same weights as one
process with the same global batch, and prism-rl / prism-align run under accelerate without hanging,
save once, and resume on a different number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism.data.synthetic import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/ddp_cpu.yaml")]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-dist")
    generate(SynthConfig(out=str(out), n=16, n_curated=4, n_align=8, n_rl=8, n_test=4, seed=4))
    return out


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_rl_and_align_updates_do_not_depend_on_the_number_of_processes(tiny_model_dir, synth_dir, tmp_path):
    script = str(REPO / "tests/dist_check.py")
    _run([sys.executable, script, str(tiny_model_dir), str(synth_dir), str(tmp_path / "one.pt")])
    _run([*LAUNCH, script, str(tiny_model_dir), str(synth_dir), str(tmp_path / "two.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    moved = 0
    for part in ("policy", "disc"):
        for k in one[part]:
            torch.testing.assert_close(one[part][k], two[part][k], atol=2e-5, rtol=0, msg=f"{part}: {k}")
        moved += sum(not torch.equal(v, torch.zeros_like(v)) for k, v in one["disc"].items() if "lora_B" in k)
    assert moved > 0  # the discriminator did learn something, so the comparison is not vacuous


def _overrides(model_dir, data_dir, out, **extra) -> list[str]:
    base = {"model.path": model_dir, "data.eval": "null", "train.output_dir": out, "train.batch_size": 2,
            "train.max_steps": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 8, "optim.lr": 1e-3,
            "logging.tensorboard": "false", "algo.micro_batch_size": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_prism_rl_dapo_on_two_processes_then_resume_on_one(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "rl"
    args = _overrides(tiny_model_dir, synth_dir, out, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.name": "dapo", "algo.max_num_gen_batches": 3,
        "reward.functions": '{"format": 0.5, "accuracy": 0.5}', "algo.dynamic_sampling": "false"})
    _run([*LAUNCH, "-m", "prism.rl.train", *args])
    ckpt = out / "checkpoint-000002"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert _steps(out) == [1, 2]  # logged once (main process), not once per process
    # resume the 2-process run on 1 process for one more step
    _run([sys.executable, "-m", "prism.rl.train", *args, "train.max_steps=3", "train.batch_size=4"])
    assert _steps(out) == [1, 2, 3] and (out / "checkpoint-000003" / "trainer_state.json").is_file()


def test_dynamic_sampling_that_finds_nothing_stops_every_process_with_one_message(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "rl-empty"
    # a random model never answers right or in format: every group is all-zero and is dropped
    args = _overrides(tiny_model_dir, synth_dir, out, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.name": "dapo", "algo.max_num_gen_batches": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*LAUNCH, "-m", "prism.rl.train", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode != 0 and "dynamic sampling dropped every group in 2 generation rounds" in proc.stderr


def test_prism_align_on_two_processes(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "align"
    args = _overrides(tiny_model_dir, synth_dir, out, **{
        "data.train": f"{synth_dir}/align.jsonl", "discriminator.path": tiny_model_dir, "warmup.steps": 1,
        "warmup.batch_size": 2, "warmup.eval_pairs": 2, "warmup.negatives": "corrupt"})
    _run([*LAUNCH, "-m", "prism.align.train", *args])
    assert (out / "checkpoint-000002" / "discriminator" / "discriminator.json").is_file()
    assert (out / "warmup" / "metrics.json").is_file()
    assert _steps(out) == [0, 1, 2]
