"""Kill RL and ALIGN runs with SIGKILL at random points and check that resuming gives the uninterrupted run.

    python scripts/fault_injection.py --trials 12 --workdir runs/faults      # 12 trials per stage
    python scripts/fault_injection.py --trials 1 --stages rl                 # a quick check

For each stage (`prism-rl --algo grpo`, `prism-align` with a warm-start whose negatives are policy
samples), on the tiny model and the grid task:

1. one uninterrupted reference run, `train.save_every=1`;
2. per trial, a fresh output dir; the run is killed (SIGKILL to its process group) 1–2 times, each at a
   point drawn from: a random time in the run, the moment a checkpoint's temporary directory appears
   (mid-save), during the warm-start (ALIGN), and after the warm-start was saved but before the first
   checkpoint (ALIGN); after each kill the same command is started again (`train.resume=auto`), and
   the last start runs to the end;
3. every logged metric of every step (wall-clock times aside) is compared with the reference: the
   script prints the maximum absolute difference per trial and overall, and exits 1 unless every step
   and metric is there and the maximum is 0 (CPU runs are deterministic).

A random tiny policy never writes a format-valid response; so that the discriminator learns during the
game, the ALIGN runs treat every rollout as valid (as the tests do), and RL rewards response length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REWARD = "def length(responses, examples):\n    return [min(len(r), 60) / 60 for r in responses]\n"
RUNNER = """
import sys
stage = sys.argv[1]
if stage == "align":
    import prism.align.train as T
    T.is_format_valid = lambda text: True
else:
    import prism.rl.train as T
T.main(sys.argv[2:])
"""
MODES = {"rl": ["random", "save"], "align": ["random", "save", "warmup", "after_warmup"]}


def overrides(stage: str, work: Path, out: Path) -> list[str]:
    common = [f"model.path={work / 'tiny'}", "data.eval=null", f"train.output_dir={out}", "train.save_every=1",
              "train.keep_last=2", "train.prompts_per_step=2", "rollout.group_size=3", "rollout.max_new_tokens=10",
              "optim.lr=1e-3", "logging.tensorboard=false", "algo.micro_batch_size=3"]
    if stage == "rl":
        return [*common, f"data.train={work / 'data' / 'rl.jsonl'}", "train.max_steps=5",
                'reward.functions={"fault_reward:length": 1.0}', "algo.name=grpo"]
    return [*common, f"data.train={work / 'data' / 'align.jsonl'}", f"discriminator.path={work / 'tiny'}",
            "train.max_steps=4", "discriminator.lr=1e-2", "warmup.steps=4", "warmup.negatives=policy",
            "warmup.pairs_per_step=2", "warmup.eval_pairs=1", "data.task=grids"]


def start(stage: str, work: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, stage, *overrides(stage, work, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_to_end(stage: str, work: Path, out: Path) -> float:
    t0 = time.perf_counter()
    proc = start(stage, work, out)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} run in {out} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0


def kill_when(proc: subprocess.Popen, out: Path, mode: str, duration: float, rng: random.Random) -> str:
    """Wait for the mode's moment and SIGKILL the run's process group; what happened, in words."""
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    t0 = time.perf_counter()
    at = rng.uniform(0.3, 1.0) * duration
    warm_started = None
    while proc.poll() is None:
        now = time.perf_counter() - t0
        hit = False
        if mode == "random":
            hit = now >= at
        elif mode == "save":
            hit = any(out.glob(".tmp-checkpoint-*"))
        elif mode == "warmup":
            if warm_started is None and any("warm-start" in line for line in list(stderr)):
                warm_started = now
            hit = warm_started is not None and now >= warm_started + rng.uniform(0.0, 1.0)
        elif mode == "after_warmup":
            hit = (out / "warmup" / "fingerprint.json").is_file() and not any(out.glob("checkpoint-*"))
        if hit:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"killed ({mode}) at {now:.1f}s"
        time.sleep(0.002)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"run in {out} failed (exit {proc.returncode}):\n{''.join(stderr)[-3000:]}")
    return f"finished before the {mode} kill"


def rows(out: Path) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["step"] in found:
            raise SystemExit(f"{out}/metrics.jsonl: step {r['step']} logged twice")
        found[r["step"]] = r
    return found


def max_difference(reference: dict[int, dict], run: dict[int, dict]) -> float:
    """Max |difference| over every metric of every step; inf if a step or a metric is missing or extra."""
    if set(reference) != set(run):
        return math.inf
    worst = 0.0
    for step, ref in reference.items():
        keys = {k for k in ref if k != "time" and not k.startswith("time/")}
        if keys != {k for k in run[step] if k != "time" and not k.startswith("time/")}:
            return math.inf
        for k in keys:
            a, b = ref[k], run[step][k]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                worst = max(worst, abs(a - b))
    return worst


def setup(work: Path) -> None:
    from prism.models.tiny import build_tiny
    from prism.tasks.grids.generator import SynthConfig, generate

    if not (work / "tiny" / "config.json").is_file():
        build_tiny(work / "tiny")
    if not (work / "data" / "meta.json").is_file():
        generate(SynthConfig(out=str(work / "data"), n=24, n_curated=4, n_align=8, n_rl=16, n_test=4, seed=5))
    (work / "fault_reward.py").write_text(REWARD)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12, help="trials per stage")
    p.add_argument("--stages", default="rl,align")
    p.add_argument("--workdir", default="runs/faults")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    setup(work)
    rng = random.Random(a.seed)
    overall, trials = 0.0, 0
    kills: dict[str, int] = {}
    for stage in a.stages.split(","):
        ref_dir = work / f"{stage}-reference"
        shutil.rmtree(ref_dir, ignore_errors=True)
        duration = run_to_end(stage, work, ref_dir)
        reference = rows(ref_dir)
        print(f"{stage}: reference run, {len(reference)} logged steps, {duration:.1f}s", flush=True)
        for trial in range(a.trials):
            out = work / f"{stage}-trial{trial:02d}"
            shutil.rmtree(out, ignore_errors=True)
            events = []
            for _ in range(rng.choice([1, 2])):
                mode = MODES[stage][(trial + len(events)) % len(MODES[stage])]
                events.append(kill_when(start(stage, work, out), out, mode, duration, rng))
                if events[-1].startswith("killed"):
                    kills[f"{stage}/{mode}"] = kills.get(f"{stage}/{mode}", 0) + 1
            run_to_end(stage, work, out)
            diff = max_difference(reference, rows(out))
            overall, trials = max(overall, diff), trials + 1
            print(f"{stage} trial {trial:2d}: {'; '.join(events)}; resumed to the end; max |diff| = {diff:g}",
                  flush=True)
    print(f"{trials} trials, {sum(kills.values())} kills ({', '.join(f'{k} {v}' for k, v in sorted(kills.items()))}); "
          f"max |difference| of every logged metric: {overall:g}")
    return 0 if overall == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
