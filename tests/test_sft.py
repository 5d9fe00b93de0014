"""End-to-end behaviour of `prism-sft` on the tiny model: parameters move, frozen parts don't,
resume is exact, a kill mid-save loses nothing, a NaN stops the run, bad input is one line."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prism.core.config import ConfigError, load_config
from prism.core.errors import NonFiniteLossError
from prism.data.order import batch_indices
from prism.sft.config import SFTConfig
from prism.tasks.grids.generator import SynthConfig, generate
from prism.models.loader import is_projector, is_vision_tower
from prism.sft import train as sft

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=str(out), n=64, n_curated=48, n_align=4, n_rl=4, n_test=8, seed=1))
    return out


def _overrides(model_dir, data_dir, out_dir, **extra) -> list[str]:
    base = {
        "model.path": model_dir, "data.train": f"{data_dir}/curated.jsonl", "data.eval": f"{data_dir}/test.jsonl",
        "data.eval_limit": 4, "train.output_dir": out_dir, "train.micro_batch_size": 4, "train.max_steps": 2,
        "optim.lr": 1e-3, "optim.warmup_ratio": 0.0, "eval.max_new_tokens": 8, "logging.tensorboard": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _run(model_dir, data_dir, out_dir, **extra) -> dict:
    return sft.train(load_config(SFTConfig, None, _overrides(model_dir, data_dir, out_dir, **extra)))


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [True, False])
def test_two_steps_move_trainable_params_and_keep_frozen_ones(tiny_model_dir, synth_dir, tmp_path, frozen):
    _run(tiny_model_dir, synth_dir, tmp_path, **{"model.freeze_vision": frozen, "model.freeze_merger": frozen})
    before, after = _weights(tiny_model_dir), _weights(tmp_path / "checkpoint-000002")
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        if is_vision_tower(name) or is_projector(name):
            if frozen:
                assert same, f"{name} changed although frozen"
            elif name.endswith("weight") and "norm" not in name:
                assert not same, f"{name} did not change although trainable"
        elif "norm" not in name:  # norms may legitimately see tiny/zero grads in 2 steps
            assert not same, f"{name} did not change"
    ckpt = tmp_path / "checkpoint-000002"
    for f in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json", "config.yaml",
              "tokenizer.json", "processor_config.json"):
        assert (ckpt / f).is_file(), f
    # the resolved config saved next to the checkpoint loads back to the one that ran
    assert load_config(SFTConfig, ckpt / "config.yaml").train.max_steps == 2


@pytest.mark.slow
def test_resume_gives_the_same_loss_sequence(tiny_model_dir, synth_dir, tmp_path):
    full = tmp_path / "full"
    _run(tiny_model_dir, synth_dir, full, **{"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 5,
                                             "train.grad_accum": 2, "data.eval": "null"})
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(full / "checkpoint-000002", resumed / "checkpoint-000002")
    _run(tiny_model_dir, synth_dir, resumed, **{"train.max_steps": 4, "train.grad_accum": 2, "data.eval": "null"})
    a, b = _losses(full), _losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


KILLER = textwrap.dedent("""
    import os, signal, sys
    import prism.checkpoint.policy as L
    import prism.sft.train as T
    original = L.save_checkpoint
    def save_checkpoint(output_dir, step, write, state, **kw):
        if step == 4:  # die in the middle of writing the second checkpoint
            def write_then_die(tmp):
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(output_dir, step, write_then_die, state, **kw)
        return original(output_dir, step, write, state, **kw)
    L.save_checkpoint = save_checkpoint
    T.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_loader_workers_give_the_same_steps_and_resume_exactly_mid_epoch(tiny_model_dir, synth_dir, tmp_path):
    """Batches built ahead by 2 loader processes equal the in-process ones, and a run resumed mid-epoch
    with workers continues exactly (each step's batch is a pure function of the step)."""
    extra = {"train.max_steps": 4, "train.grad_accum": 2, "data.eval": "null", "train.save_every": 2}
    _run(tiny_model_dir, synth_dir, tmp_path / "here", **extra)
    _run(tiny_model_dir, synth_dir, tmp_path / "workers", **extra, **{"data.num_workers": 2})
    # killed after its step-2 checkpoint, mid-epoch (4 steps x 2 micro-batches of 4 = 32 of the 48 examples)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "workers" / "checkpoint-000002", tmp_path / "resumed" / "checkpoint-000002")
    _run(tiny_model_dir, synth_dir, tmp_path / "resumed", **extra, **{"data.num_workers": 2, "data.prefetch": 1})
    here, workers, resumed = _losses(tmp_path / "here"), _losses(tmp_path / "workers"), _losses(tmp_path / "resumed")
    assert workers == here and resumed == {3: here[3], 4: here[4]}, (here, workers, resumed)
    rows = [json.loads(x) for x in (tmp_path / "workers" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["train/data_seconds"] <= r["train/step_seconds"] for r in rows)


@pytest.mark.slow
def test_sigkill_mid_save_keeps_previous_checkpoint_and_resume_completes(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, synth_dir, out, **{"train.max_steps": 4, "train.save_every": 2,
                                                          "data.eval": "null"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoint-000002" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-000004").exists()
    assert (out / ".tmp-checkpoint-000004").exists()  # the interrupted write, never renamed into place
    # resume=auto picks checkpoint 2, finishes, and cleans the stale temp dir
    _run(tiny_model_dir, synth_dir, out, **{"train.max_steps": 4, "train.save_every": 2, "data.eval": "null"})
    assert (out / "checkpoint-000004" / "trainer_state.json").is_file()
    assert not (out / ".tmp-checkpoint-000004").exists()
    straight = tmp_path / "straight"
    _run(tiny_model_dir, synth_dir, straight, **{"train.max_steps": 4, "data.eval": "null"})
    assert abs(_losses(out)[4] - _losses(straight)[4]) < 1e-6


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    real = sft.head_token_nll
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        nll, n = real(*args)
        return (nll * float("nan") if calls["n"] >= 3 else nll), n

    monkeypatch.setattr(sft, "head_token_nll", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3.*last good checkpoint"):
        _run(tiny_model_dir, synth_dir, tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "data.eval": "null"})
    assert (tmp_path / "checkpoint-000002" / "trainer_state.json").is_file()
    assert not (tmp_path / "checkpoint-000003").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from prism.cli import sft; import sys; sys.argv[0] = 'prism-sft'; sft()"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=REPO)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_bad_inputs_end_with_one_line_naming_the_file_or_key(tiny_model_dir, synth_dir, tmp_path):
    good = json.loads((synth_dir / "curated.jsonl").read_text().splitlines()[0])
    image = str(synth_dir / good["images"][0])
    no_assistant = _write_jsonl(tmp_path / "no_assistant.jsonl",
                                [{"messages": good["messages"][:1], "images": [image]}])
    extra_placeholder = _write_jsonl(tmp_path / "extra.jsonl", [{
        "messages": [{"role": "user", "content": "<image><image>Q?"}, good["messages"][1]], "images": [image]}])
    missing_image = _write_jsonl(tmp_path / "missing.jsonl", [{**good, "images": ["nope.png"]}])
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    corrupt = _write_jsonl(tmp_path / "corrupt.jsonl", [{**good, "images": ["corrupt.png"]}])
    cases = {
        "data.train=/does/not/exist.jsonl": "exist.jsonl",
        f"data.train={no_assistant}": "no_assistant.jsonl:1",
        f"data.train={extra_placeholder}": "extra.jsonl:1",
        f"data.train={missing_image}": "missing.jsonl:1",
        f"data.train={corrupt}": "corrupt.jsonl:1",
        "optim.lrr=1": "optim.lrr",
        "train.max_steps=-3": "train.max_steps",
    }
    for override, needle in cases.items():
        args = _overrides(tiny_model_dir, synth_dir, tmp_path / "bad")
        proc = _cli(*args, override)
        assert proc.returncode == 2, (override, proc.stderr[-1500:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, (override, last)
        assert "Traceback" not in proc.stderr


def test_batch_indices_cover_each_epoch_once_and_shard_by_rank():
    n, bs = 10, 2
    one = [batch_indices(n, k, bs * 2, 1, 0, seed=3) for k in range(2)]
    two = [[*batch_indices(n, k, bs, 2, 0, 3), *batch_indices(n, k, bs, 2, 1, 3)] for k in range(2)]
    assert one == two  # 2 processes x 2 see exactly what 1 process x 4 sees
    epoch = [i for k in range(5) for i in batch_indices(n, k, bs, 1, 0, 3)]
    assert sorted(epoch) == list(range(n))
    assert batch_indices(n, 5, bs, 1, 0, 3) != batch_indices(n, 0, bs, 1, 0, 3)  # reshuffled


def test_batch_indices_are_slices_of_one_cached_permutation_per_epoch():
    from prism.data.order import epoch_permutation

    epoch_permutation.cache_clear()
    n, bs = 100, 8
    by_hand = torch.randperm(n, generator=torch.Generator().manual_seed(7 + 1))  # epoch 1 of seed 7
    for k in range(12, 24):  # batches 12..23 are epoch 1 (12 batches of 8 per epoch)
        j = k - 12
        assert batch_indices(n, k, bs, 1, 0, seed=7) == by_hand[j * bs: (j + 1) * bs].tolist()
    assert epoch_permutation.cache_info().misses == 1  # built once for the 12 batches



def test_config_errors_are_raised_at_load(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.max_stepz'"):
        load_config(SFTConfig, None, ["train.max_stepz=3"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_model_dir, synth_dir, tmp_path):
    """2 CPU processes x batch 2 == 1 process x batch 4 (same global batch, same data order)."""
    one = tmp_path / "one"
    _run(tiny_model_dir, synth_dir, one, **{"data.eval": "null"})
    two = tmp_path / "two"
    args = _overrides(tiny_model_dir, synth_dir, two, **{"train.micro_batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs/accelerate/ddp_cpu.yaml"), "-m", "prism.sft.train", *args],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2]
    for step in (1, 2):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert (two / "checkpoint-000002" / "rng_state_1.pt").is_file()  # every rank saved its RNG state


@pytest.mark.slow
def test_lora_trains_only_adapters_saves_merged_and_resumes(tiny_model_dir, synth_dir, tmp_path):
    extra = {"model.lora.enabled": True, "model.lora.r": 4, "model.lora.merge_on_save": True,
             "train.save_every": 2, "train.max_steps": 2, "data.eval": "null", "logging.tensorboard": True}
    _run(tiny_model_dir, synth_dir, tmp_path, **extra)
    ckpt = tmp_path / "checkpoint-000002"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "language_model" in k for k in adapter)
    base, merged = _weights(tiny_model_dir), _weights(ckpt / "merged")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") and "language_model" in k for k in changed)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # resume=auto from the adapter checkpoint continues the run
    _run(tiny_model_dir, synth_dir, tmp_path, **{**extra, "train.max_steps": 3})
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "checkpoint-000003" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_token_budget_splits_forwards_but_not_the_update(tiny_model_dir, synth_dir, tmp_path):
    extra = {"train.max_steps": 3, "data.eval": "null", "train.grad_accum": 2}
    _run(tiny_model_dir, synth_dir, tmp_path / "whole", **extra)
    _run(tiny_model_dir, synth_dir, tmp_path / "budget", **{**extra, "train.micro_token_budget": 200})
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "budget")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_padding_free_training_follows_the_padded_run(tiny_model_dir, synth_dir, tmp_path):
    extra = {"train.max_steps": 3, "data.eval": "null", "model.freeze_vision": False, "model.freeze_merger": False}
    _run(tiny_model_dir, synth_dir, tmp_path / "padded", **extra)
    _run(tiny_model_dir, synth_dir, tmp_path / "packed", **{**extra, "train.padding_free": True})
    a, b = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    wa, wb = _weights(tmp_path / "padded/checkpoint-000003"), _weights(tmp_path / "packed/checkpoint-000003")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_compiled_layers_and_full_logits_give_the_default_losses(tiny_model_dir, synth_dir, tmp_path):
    """model.compile (compiled decoder layers; eager generation for the evaluation) and
    train.logits_chunk=0 (the model's own [B, T, V] logits) train exactly as the default run."""
    steps = {"train.max_steps": 3}
    default = _run(tiny_model_dir, synth_dir, tmp_path / "default", **steps)
    compiled = _run(tiny_model_dir, synth_dir, tmp_path / "compiled", **steps, **{"model.compile": True})
    full = _run(tiny_model_dir, synth_dir, tmp_path / "full", **steps, **{"train.logits_chunk": 0})
    ref = _losses(tmp_path / "default")
    for out in ("compiled", "full"):
        assert _losses(tmp_path / out) == pytest.approx(ref, abs=1e-5), out
    assert ref[3] < ref[1]  # it trains
    assert compiled["eval/format_rate"] == default["eval/format_rate"] == full["eval/format_rate"]
