"""Multi-process paths with 2 CPU processes (gloo), under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2: the
SFT, RL and ALIGN updates give the same losses and weights as one process with the same global batch,
and prism-rl / prism-align run under accelerate without hanging, save once, and resume (DDP and FSDP2:
on a different number of processes; DeepSpeed: from its sharded optimizer states)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism.tasks.grids.generator import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/ddp_cpu.yaml")]
ZERO2 = [*LAUNCH[:-1], str(REPO / "configs/accelerate/zero2_cpu.yaml")]
ZERO3 = [*LAUNCH[:-1], str(REPO / "configs/accelerate/zero3_cpu.yaml")]
FSDP2 = [*LAUNCH[:-1], str(REPO / "configs/accelerate/fsdp2_cpu.yaml")]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-dist")
    generate(SynthConfig(out=str(out), n=16, n_curated=4, n_align=8, n_rl=8, n_test=4, seed=4))
    return out


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    # the repository on the path: tests/dist_check.py runs as a script, also where prism is not installed
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0", "PYTHONPATH": path, **kw.pop("env", {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("launcher", ["ddp", "zero2", "fsdp2"])
def test_rl_and_align_updates_do_not_depend_on_the_number_of_processes(tiny_model_dir, synth_dir, tmp_path, launcher):
    script = str(REPO / "tests/dist_check.py")
    _run([sys.executable, script, str(tiny_model_dir), str(synth_dir), str(tmp_path / "one.pt")])
    launch = {"ddp": LAUNCH, "zero2": ZERO2, "fsdp2": FSDP2}[launcher]
    _run([*launch, script, str(tiny_model_dir), str(synth_dir), str(tmp_path / "two.pt")])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    kind = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "fsdp2": "FSDP"}[launcher]
    assert two["processes"] == 2 and two["distributed_type"].endswith(kind)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    moved = 0
    for part in ("policy", "disc"):
        for k in one[part]:
            torch.testing.assert_close(one[part][k], two[part][k], atol=2e-5, rtol=0, msg=f"{part}: {k}")
        moved += sum(not torch.equal(v, torch.zeros_like(v)) for k, v in one["disc"].items() if "lora_B" in k)
    assert moved > 0  # the discriminator did learn something, so the comparison is not vacuous


def _overrides(model_dir, data_dir, out, **extra) -> list[str]:
    base = {"model.path": model_dir, "data.eval": "null", "train.output_dir": out, "train.prompts_per_step": 2,
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
    _run([sys.executable, "-m", "prism.rl.train", *args, "train.max_steps=3", "train.prompts_per_step=4"])
    assert _steps(out) == [1, 2, 3] and (out / "checkpoint-000003" / "trainer_state.json").is_file()


def test_dynamic_sampling_keeps_processes_in_lockstep(tiny_model_dir, synth_dir, tmp_path):
    """Each process drops a different number of all-equal groups; all train on the same number of groups."""
    (tmp_path / "parity_rewards.py").write_text(
        "def parity(responses, examples):\n    return [float(len(r) % 2) for r in responses]\n")
    out = tmp_path / "rl-dyn"
    args = _overrides(tiny_model_dir, synth_dir, out, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.name": "dapo", "algo.max_num_gen_batches": 4,
        "reward.functions": '{"parity_rewards:parity": 1.0}', "train.max_steps": 3, "algo.filter_metric": "reward"})
    _run([*LAUNCH, "-m", "prism.rl.train", *args], env={"PYTHONPATH": str(tmp_path)})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(1 <= r["rollout/kept_groups"] <= 2 for r in rows)  # per process, at most train.prompts_per_step
    assert any(r["rollout/dropped_groups"] > 0 for r in rows)


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
        "warmup.pairs_per_step": 2, "warmup.eval_pairs": 2, "warmup.negatives": "corrupt"})
    _run([*LAUNCH, "-m", "prism.align.train", *args])
    assert (out / "checkpoint-000002" / "discriminator" / "discriminator.json").is_file()
    assert (out / "warmup" / "metrics.json").is_file()
    assert _steps(out) == [0, 1, 2]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_sft_under_zero2_with_accumulation_matches_one_process(tiny_model_dir, synth_dir, tmp_path):
    """DeepSpeed steps once per 2 micro-batches and does not divide prism's already-normalised loss again."""
    common = [f"model.path={tiny_model_dir}", f"data.train={synth_dir}/curated.jsonl", "data.eval=null",
              "train.max_steps=3", "train.grad_accum=2", "optim.lr=1e-3", "optim.warmup_ratio=0",
              "logging.tensorboard=false", "train.save_every=2", "train.keep_last=5"]
    _run([sys.executable, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'one'}",
          "train.micro_batch_size=4"])
    _run([*ZERO2, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'z2'}", "train.micro_batch_size=2"])
    one, z2 = _losses(tmp_path / "one"), _losses(tmp_path / "z2")
    assert sorted(z2) == [1, 2, 3]
    for step in (1, 2, 3):
        assert z2[step] == pytest.approx(one[step], abs=1e-4), (step, one[step], z2[step])
    assert (tmp_path / "z2/checkpoint-000002/deepspeed").is_dir()  # sharded optimizer states
    # resume the ZeRO-2 run from step 2: step 3 comes out the same
    resumed = tmp_path / "z2-resumed"
    resumed.mkdir()
    os.symlink(tmp_path / "z2/checkpoint-000002", resumed / "checkpoint-000002")
    _run([*ZERO2, "-m", "prism.sft.train", *common, f"train.output_dir={resumed}", "train.micro_batch_size=2"])
    assert _losses(resumed)[3] == pytest.approx(z2[3], abs=1e-6)


def test_prism_rl_and_align_under_zero2(tiny_model_dir, synth_dir, tmp_path):
    rl = tmp_path / "rl"
    _run([*ZERO2, "-m", "prism.rl.train", *_overrides(tiny_model_dir, synth_dir, rl, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.name": "grpo", "algo.mini_batches": 2,
        "reward.functions": '{"format": 0.5, "accuracy": 0.5}'})])
    assert _steps(rl) == [1, 2] and (rl / "checkpoint-000002" / "model.safetensors").is_file()
    align = tmp_path / "align"
    _run([*ZERO2, "-m", "prism.align.train", *_overrides(tiny_model_dir, synth_dir, align, **{
        "data.train": f"{synth_dir}/align.jsonl", "discriminator.path": tiny_model_dir, "warmup.steps": 0})])
    assert _steps(align) == [1, 2] and (align / "checkpoint-000002" / "discriminator").is_dir()


def test_every_stage_under_zero3(tiny_model_dir, synth_dir, tmp_path):
    """ZeRO-3 shards the weights themselves: SFT matches one process and saves a full model; RL (with a
    reference model for the KL term) and ALIGN (discriminator and warm-start) run, sampling from the
    sharded policy."""
    from transformers import AutoModelForImageTextToText

    common = [f"model.path={tiny_model_dir}", f"data.train={synth_dir}/curated.jsonl", "data.eval=null",
              "train.max_steps=2", "optim.lr=1e-3", "optim.warmup_ratio=0", "logging.tensorboard=false"]
    _run([sys.executable, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=4"])
    _run([*ZERO3, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'z3'}", "train.micro_batch_size=2"])
    one, z3 = _losses(tmp_path / "one"), _losses(tmp_path / "z3")
    assert z3[1] == pytest.approx(one[1], abs=1e-4) and z3[2] == pytest.approx(one[2], abs=1e-4)
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "one/checkpoint-000002").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "z3/checkpoint-000002").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the gathered weights, not the shards

    rl = tmp_path / "rl"
    _run([*ZERO3, "-m", "prism.rl.train", *_overrides(tiny_model_dir, synth_dir, rl, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.kl_coef": 0.1, "reward.functions": '{"format": 1.0}'})])
    assert _steps(rl) == [1, 2]
    align = tmp_path / "align"
    _run([*ZERO3, "-m", "prism.align.train", *_overrides(tiny_model_dir, synth_dir, align, **{
        "data.train": f"{synth_dir}/align.jsonl", "discriminator.path": tiny_model_dir, "warmup.steps": 1,
        "warmup.pairs_per_step": 2, "warmup.eval_pairs": 2})])
    assert _steps(align) == [0, 1, 2] and (align / "checkpoint-000002/discriminator/heads.safetensors").is_file()


def test_every_stage_under_fsdp2(tiny_model_dir, synth_dir, tmp_path):
    """FSDP2 (fully_shard, over gloo here) shards weights, gradients and optimizer state: SFT matches one
    process step for step, evaluates with a generate whose shares are uneven (3 examples on 2 processes),
    saves full weights and a full optimizer state that a one-process run without FSDP resumes exactly;
    RL (with a reference model) and ALIGN run, sampling from the sharded policy."""
    from transformers import AutoModelForImageTextToText

    common = [f"model.path={tiny_model_dir}", f"data.train={synth_dir}/curated.jsonl", "data.eval=null",
              "train.max_steps=3", "optim.lr=1e-3", "optim.warmup_ratio=0", "logging.tensorboard=false",
              "train.save_every=2", "train.keep_last=5"]
    _run([sys.executable, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=4"])
    _run([*FSDP2, "-m", "prism.sft.train", *common, f"train.output_dir={tmp_path / 'f2'}", "train.micro_batch_size=2",
          f"data.eval={synth_dir}/test.jsonl", "data.eval_limit=3", "eval.max_new_tokens=8"])
    one, f2 = _losses(tmp_path / "one"), _losses(tmp_path / "f2")
    for step in (1, 2, 3):
        assert f2[step] == pytest.approx(one[step], abs=1e-5), (step, one[step], f2[step])
    metrics = json.loads((tmp_path / "f2/metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/accuracy" in metrics and "eval/format_rate" in metrics
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "one/checkpoint-000002").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "f2/checkpoint-000002").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the gathered weights, not the shards
    optimizer = torch.load(tmp_path / "f2/checkpoint-000002/optimizer.pt", weights_only=False)
    assert all(isinstance(k, str) for k in optimizer["state"])  # keyed by parameter name: any process count
    # resume the FSDP2 checkpoint in one plain process, batch 4: step 3 is the FSDP2 run's step 3
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(tmp_path / "f2/checkpoint-000002", resumed / "checkpoint-000002")
    _run([sys.executable, "-m", "prism.sft.train", *common, f"train.output_dir={resumed}", "train.micro_batch_size=4"])
    assert _losses(resumed)[3] == pytest.approx(f2[3], abs=1e-5)

    rl = tmp_path / "rl"
    _run([*FSDP2, "-m", "prism.rl.train", *_overrides(tiny_model_dir, synth_dir, rl, **{
        "data.train": f"{synth_dir}/rl.jsonl", "algo.kl_coef": 0.1, "reward.functions": '{"format": 1.0}'})])
    assert _steps(rl) == [1, 2] and (rl / "checkpoint-000002" / "model.safetensors").is_file()
    align = tmp_path / "align"
    _run([*FSDP2, "-m", "prism.align.train", *_overrides(tiny_model_dir, synth_dir, align, **{
        "data.train": f"{synth_dir}/align.jsonl", "discriminator.path": tiny_model_dir, "warmup.steps": 0})])
    assert _steps(align) == [1, 2] and (align / "checkpoint-000002" / "discriminator").is_dir()
