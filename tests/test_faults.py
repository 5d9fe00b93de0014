"""Reliability under faults and bad input (issue 14): a warm-start is reused only when it matches, a
blown-up update is never saved as good, an output dir holds one run, a damaged checkpoint is skipped,
every fault ends with one line, and a failed start leaves the previous run's files alone."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prism.align import train as align
from prism.align.config import AlignConfig
from prism.align.discriminator import CONFIG_FILE
from prism.align.monitor import CollapseWatch
from prism.align.warmup import (
    FINGERPRINT_FILE,
    reusable_warm_start,
    warmup_fingerprint,
)
from prism.checkpoint.atomic import (
    checkpoint_problem,
    list_checkpoints,
    save_checkpoint,
)
from prism.core.config import config_changes, load_config
from prism.core.errors import ConfigError, DivergenceError, RunError
from prism.rl import train as rl
from prism.rl.config import RLConfig
from prism.tasks.grids.generator import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]
REWARD_MODULE = ("import math\n"
                 "def length(responses, examples):\n    return [min(len(r), 60) / 60 for r in responses]\n"
                 "def broken(responses, examples):\n    return [math.nan] * len(responses)\n")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-faults")
    generate(SynthConfig(out=str(out), n=16, n_curated=4, n_align=6, n_rl=12, n_test=4, seed=3))
    return out


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "fault_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fault_rewards"


def _rl_cfg(model_dir, data_dir, out_dir, rewards, **extra) -> RLConfig:
    base = {"model.path": model_dir, "data.train": f"{data_dir}/rl.jsonl", "data.eval": "null",
            "train.output_dir": out_dir, "train.prompts_per_step": 2, "train.max_steps": 3, "train.save_every": 1,
            "rollout.group_size": 3, "rollout.max_new_tokens": 8, "optim.lr": 1e-3, "logging.tensorboard": False,
            "reward.functions": json.dumps({f"{rewards}:length": 1.0}), "algo.micro_batch_size": 3}
    base.update(extra)
    return load_config(RLConfig, None, [f"{k}={v}" for k, v in base.items()])


def _align_cfg(model_dir, data_dir, out_dir, **extra) -> AlignConfig:
    base = {"model.path": model_dir, "discriminator.path": model_dir, "data.train": f"{data_dir}/align.jsonl",
            "data.eval": "null", "train.output_dir": out_dir, "train.prompts_per_step": 2, "train.max_steps": 2,
            "rollout.group_size": 3, "rollout.max_new_tokens": 8, "optim.lr": 1e-3, "discriminator.lr": 1e-2,
            "logging.tensorboard": False, "warmup.steps": 2, "warmup.negatives": "corrupt",
            "warmup.pairs_per_step": 2, "warmup.eval_pairs": 1, "algo.micro_batch_size": 3, "data.task": "grids"}
    base.update(extra)
    return load_config(AlignConfig, None, [f"{k}={v}" for k, v in base.items()])


def _rows(out_dir) -> list[dict]:
    return [json.loads(x) for x in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    """Every logged value of every step equal (wall-clock times aside)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        keys = {k for k in x if k != "time" and not k.startswith("time/")}
        assert keys == {k for k in y if k != "time" and not k.startswith("time/")}, x["step"]
        for k in keys:
            assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), (x["step"], k, x[k], y[k])


# ------------------------------------------------------------------------ 1. the warm-start


@pytest.mark.slow
def test_a_warm_start_reused_after_a_kill_continues_exactly(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    align.train(_align_cfg(tiny_model_dir, synth_dir, tmp_path / "straight"))
    # killed after the warm-start, before the first checkpoint: what `prism-align warmup` leaves behind
    align.train(_align_cfg(tiny_model_dir, synth_dir, tmp_path / "killed"), warmup_only=True)
    assert (tmp_path / "killed" / "warmup" / FINGERPRINT_FILE).is_file()
    align.train(_align_cfg(tiny_model_dir, synth_dir, tmp_path / "killed"))
    _same_metrics(_rows(tmp_path / "straight"), _rows(tmp_path / "killed"))  # the RNG state came back too


@pytest.mark.slow
def test_a_warm_start_made_with_other_settings_is_done_again(tiny_model_dir, synth_dir, tmp_path, caplog):
    out = tmp_path / "run"
    align.train(_align_cfg(tiny_model_dir, synth_dir, out, **{"discriminator.lora_r": 8}), warmup_only=True)
    changed = _align_cfg(tiny_model_dir, synth_dir, out, **{"discriminator.lora_r": 4, "train.max_steps": 1})
    assert reusable_warm_start(changed, out, 1, 0) is None
    assert any("discriminator.lora_r: 8 -> 4" in r.getMessage() for r in caplog.records)
    align.train(changed)
    fingerprint = json.loads((out / "warmup" / FINGERPRINT_FILE).read_text())
    assert fingerprint["discriminator"]["lora_r"] == 4
    # the checkpoint's discriminator records rank 4 and its adapters have rank 4, as the config says
    from safetensors.torch import load_file

    disc = out / "checkpoint-000001" / "discriminator"
    assert json.loads((disc / CONFIG_FILE).read_text())["lora_r"] == 4
    weights = {}
    for f in (disc / "adapters").rglob("*.safetensors"):
        weights.update(load_file(str(f)))
    lora_a = [v for k, v in weights.items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == 4 for v in lora_a)



@pytest.mark.slow
def test_the_warm_start_alone_can_be_redone_but_not_under_a_game(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    out = tmp_path / "run"
    align.train(_align_cfg(tiny_model_dir, synth_dir, out), warmup_only=True)
    align.train(_align_cfg(tiny_model_dir, synth_dir, out, **{"warmup.steps": 1}), warmup_only=True)  # redone
    assert json.loads((out / "warmup" / FINGERPRINT_FILE).read_text())["warmup"]["steps"] == 1
    assert [r["step"] for r in _rows(out)] == [0]
    align.train(_align_cfg(tiny_model_dir, synth_dir, out, **{"warmup.steps": 1, "train.max_steps": 1}))
    with pytest.raises(ConfigError, match=r"holds a game's checkpoints \(up to checkpoint-000001\)"):
        align.train(_align_cfg(tiny_model_dir, synth_dir, out), warmup_only=True)

def test_the_fingerprint_names_what_changed(tiny_model_dir, synth_dir, tmp_path):
    a = warmup_fingerprint(_align_cfg(tiny_model_dir, synth_dir, tmp_path), 1)
    b = warmup_fingerprint(_align_cfg(tiny_model_dir, synth_dir, tmp_path, **{"discriminator.lr": 1e-4,
                                                                              "train.max_steps": 9}), 2)
    assert config_changes(a, a) == []
    assert config_changes(a, b) == ["discriminator.lr: 0.01 -> 0.0001", "processes: 1 -> 2"]  # not max_steps
    data = synth_dir / "align.jsonl"
    assert str(data) in a["files"] and a["files"][str(data)][0] == data.stat().st_size


@pytest.mark.slow
def test_a_warm_start_that_blows_up_is_not_saved_and_names_the_discriminator_lr(tiny_model_dir, synth_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"discriminator update blew up.*discriminator\.lr \(now 1e\+30\)"
                       r".*no checkpoint was saved"):
        align.train(_align_cfg(tiny_model_dir, synth_dir, out, **{"discriminator.lr": 1e30}), warmup_only=True)
    assert not (out / "warmup").exists()  # nothing for a corrected run to reuse


# ------------------------------------------------------------------------ 2. divergence


@pytest.mark.slow
def test_a_finite_blow_up_of_the_policy_stops_before_it_is_saved(tiny_model_dir, synth_dir, tmp_path, rewards):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError) as err:
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"optim.lr": 1e3}))
    message = str(err.value)
    assert "\n" not in message
    assert "step 1: the policy update blew up" in message and "optim.lr (now 1000)" in message
    assert "no checkpoint was saved yet" in message
    assert list_checkpoints(out) == []  # checkpoint-1 would have held the exploded weights


@pytest.mark.slow
def test_a_blow_up_after_a_good_checkpoint_names_that_checkpoint(tiny_model_dir, synth_dir, tmp_path, rewards):
    out = tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.max_steps": 1}))
    with pytest.raises(DivergenceError, match=r"step 2: .*last good checkpoint is .*checkpoint-000001"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"optim.lr": 1e3}))
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-000001"]
    rows = _rows(out)
    assert rows[-1]["actor/param_change"] < 0.1  # healthy steps move the norm a little


@pytest.mark.slow
def test_a_discriminator_blow_up_stops_the_game_and_names_its_lr(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    with pytest.raises(DivergenceError, match=r"step 1: the discriminator update blew up.*discriminator\.lr \(now 1000\)"):
        align.train(_align_cfg(tiny_model_dir, synth_dir, tmp_path, **{"discriminator.lr": 1e3, "warmup.steps": 0}))
    assert list_checkpoints(tmp_path) == []


@pytest.mark.slow
def test_a_reward_plug_in_returning_nan_is_named(tiny_model_dir, synth_dir, tmp_path, rewards):
    cfg = _rl_cfg(tiny_model_dir, synth_dir, tmp_path, rewards,
                  **{"reward.functions": json.dumps({f"{rewards}:broken": 1.0})})
    with pytest.raises(RunError, match=r"reward.functions: 'fault_rewards:broken' returned nan for 6 of 6 responses"):
        rl.train(cfg)


def _disc_row(pinned=0.0, loss=0.5, acc=0.7) -> dict:
    return {"score/pinned": pinned, "disc/loss": loss, "disc/perception/acc": acc, "disc/reasoning/acc": acc}


def test_the_collapse_watch_sees_pinned_scores_a_frozen_loss_and_an_inverted_expert(caplog):
    healthy = CollapseWatch(3, stop=False, lr=1e-4)
    for step, loss in enumerate([0.7, 0.6, 0.65, 0.5], 1):
        healthy.update(step, _disc_row(loss=loss, acc=1.0))  # winning is not collapsing
    assert healthy.signs() == {}
    watch = CollapseWatch(3, stop=False, lr=1e3)
    with caplog.at_level(logging.WARNING, logger="prism.align"):
        for step in range(1, 6):
            watch.update(step, _disc_row(pinned=0.95, loss=0.6931, acc=0.0))
    assert set(watch.signs()) == {"pinned", "frozen", "inverted/perception", "inverted/reasoning"}
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 3:") and "discriminator.lr, now 1000" in warnings[0]
    stopping = CollapseWatch(2, stop=True, lr=1e-2, history=[_disc_row(loss=0.3)])  # refilled from the log
    with pytest.raises(DivergenceError, match="step 7: .*its loss stayed at 0.3"):
        stopping.update(7, _disc_row(loss=0.3))
    assert CollapseWatch(0, stop=True, lr=1.0).update(1, _disc_row(pinned=1.0)) is None  # off


# ------------------------------------------------------------------------ 3. one run per output dir


@pytest.mark.slow
def test_a_fresh_run_into_a_used_dir_stops_unless_overwrite(tiny_model_dir, synth_dir, tmp_path, rewards):
    out = tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.max_steps": 2}))
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.output_dir: .* already holds checkpoints up to checkpoint-000002.*"
                       r"train.overwrite=true"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.resume": "none", "train.seed": 1}))
    assert (out / "config.yaml").read_text() == config_before
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.resume": "none", "train.seed": 1,
                                                                  "train.overwrite": True, "train.max_steps": 1}))
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-000001"]  # the old run's are gone
    assert [r["step"] for r in _rows(out)] == [1]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 1


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_path_does_not_mix_with_later_ones(tiny_model_dir, synth_dir, tmp_path,
                                                                            rewards):
    out = tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.keep_last": 3}))
    first = out / "checkpoint-000001"
    with pytest.raises(ConfigError, match=r"train.resume: .*checkpoint-000001 is step 1, but .*checkpoint-000002, "
                       r"checkpoint-000003"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.resume": str(first)}))
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.resume": str(first), "train.overwrite": True,
                                                                  "train.max_steps": 2}))
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]
    assert [r["step"] for r in _rows(out)] == [1, 2]


@pytest.mark.slow
def test_steps_logged_after_the_last_checkpoint_appear_once_after_resume(tiny_model_dir, synth_dir, tmp_path, rewards):
    straight, out = tmp_path / "straight", tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, straight, rewards))
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards))
    shutil.rmtree(out / "checkpoint-000003")  # killed after logging step 3, before its checkpoint
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards))
    _same_metrics(_rows(straight), _rows(out))


# ------------------------------------------------------------------------ 4. one line per fault


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tiny_model_dir, synth_dir, tmp_path, rewards,
                                                              monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^train.output_dir: .*file is a file, not a directory$"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, tmp_path / "file", rewards))
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot create or write into .*sub"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, tmp_path / "file" / "sub", rewards))

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot create or write into .*ro \(Read-only file system\)$"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, tmp_path / "ro", rewards))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint_before(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"x")

    save_checkpoint(tmp_path, 1, write, {})

    def full(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(RunError) as err:
        save_checkpoint(tmp_path, 2, full, {})
    assert "\n" not in str(err.value)
    assert "step 2: could not write checkpoint" in str(err.value) and "No space left on device" in str(err.value)
    assert "checkpoint-000001 is intact" in str(err.value)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-000001"]
    assert not list(tmp_path.glob(".tmp-*"))  # the unfinished one is removed

    def torch_full(tmp: Path) -> None:  # torch.save reports a full disk as a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    with pytest.raises(RunError, match="file write failed"):
        save_checkpoint(tmp_path, 2, torch_full, {})


# ------------------------------------------------------------------------ 5. a damaged checkpoint


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_skips_a_damaged_latest_checkpoint(tiny_model_dir, synth_dir, tmp_path, rewards, damaged, caplog):
    straight, out = tmp_path / "straight", tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, straight, rewards))
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards))
    _truncate(out / "checkpoint-000003" / damaged)
    assert checkpoint_problem(out / "checkpoint-000003") is not None
    assert checkpoint_problem(out / "checkpoint-000002") is None
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards))  # resumes from step 2, not a traceback
    assert any("checkpoint-000003 cannot be resumed from" in r.getMessage() for r in caplog.records)
    assert (out / "broken-checkpoint-000003").is_dir()  # set aside, not deleted
    _same_metrics(_rows(straight), _rows(out))
    with pytest.raises(ConfigError, match=r"train.resume: .*broken-checkpoint-000003 cannot be resumed from"):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, tmp_path / "other", rewards,
                         **{"train.resume": str(out / "broken-checkpoint-000003")}))


def test_checkpoint_problem_reads_sizes_and_headers(tmp_path):
    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(64)}, str(tmp / "model.safetensors"))
        torch.save({"a": torch.ones(64)}, tmp / "optimizer.pt")

    ckpt = save_checkpoint(tmp_path, 1, write, {"metrics": {}})
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "rng_state_0.pt"}
    assert checkpoint_problem(ckpt) is None
    (ckpt / "optimizer.pt").write_bytes((ckpt / "optimizer.pt").read_bytes() + b"\0")
    assert "optimizer.pt has" in checkpoint_problem(ckpt)
    del state["files"]  # a checkpoint from before sizes were recorded: the structural checks remain
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert checkpoint_problem(ckpt) is None
    _truncate(ckpt / "model.safetensors")
    assert "model.safetensors" in checkpoint_problem(ckpt)


# ------------------------------------------------------------------------ 7. a failed start


@pytest.mark.slow
def test_a_failed_start_leaves_the_config_of_the_run_alone(tiny_model_dir, synth_dir, tmp_path, rewards):
    out = tmp_path / "run"
    rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"train.max_steps": 1}))
    before = (out / "config.yaml").read_text()
    with pytest.raises(Exception):
        rl.train(_rl_cfg(tiny_model_dir, synth_dir, out, rewards, **{"data.train": tmp_path / "missing.jsonl",
                                                                      "train.max_steps": 2}))
    assert (out / "config.yaml").read_text() == before
    assert not list(out.glob(".config.yaml*"))



# ------------------------------------------------------------------------ kill -9 at random points


@pytest.mark.slow
def test_the_fault_injection_script_finds_every_resumed_run_equal_to_the_uninterrupted_one(tmp_path):
    """One trial per stage here (scripts/fault_injection.py --trials 12 for the full check)."""
    proc = subprocess.run([sys.executable, "scripts/fault_injection.py", "--trials", "1", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 trials" in proc.stdout and "max |difference| of every logged metric: 0" in proc.stdout
