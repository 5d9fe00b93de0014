"""Behaviour fingerprint: short fixed-seed runs of every stage, every logged value kept, so that a change
meant to keep behaviour (a refactor, a faster kernel that should be exact) can be checked to the bit.

    python scripts/fingerprint.py run WORKDIR OUT.json      # ~4 min on 2 CPU cores, one thread
    python scripts/fingerprint.py compare BEFORE.json AFTER.json [--tol 1e-6]

`run` builds the tiny model and a small synthetic task under WORKDIR, trains a 150-step SFT on the
drifted pool as the policy the other runs start from (not compared), then runs, 5 steps each:
SFT (2 accumulated micro-batches), RL with grpo (2 mini-batches, held-out evaluation at the end)
and dapo (dynamic sampling on the total reward, overlong shaping), and ALIGN with corrupted and with policy warm-start
negatives. The reward adds a length term so that every group has non-zero advantages from an
untrained policy. `compare` prints the largest difference over all logged values (timings excluded)
and every value, row or key that differs; it exits 1 on a difference above --tol.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMINGS = ("time/", "train/step_seconds")


def _timing(key: str) -> bool:
    """Wall-clock values, which no two runs share: the log's timestamp and the step timings."""
    return key == "time" or key.startswith(TIMINGS)


def length_reward(responses, examples):
    """Response length (up to 200 characters) / 200: varies inside every group."""
    return [min(len(r), 200) / 200.0 for r in responses]


def _stage_runs(work: Path, model: Path, data: Path, policy: Path) -> dict[str, list[str]]:
    common = ["train.max_steps=5", "train.seed=0", "logging.tensorboard=false", "data.eval=null", "train.resume=none"]
    reward = 'reward.functions={"fingerprint:length_reward": 0.7, "format": 0.3}'
    runs = {"sft": ["prism-sft", f"model.path={model}", f"data.train={data}/public.jsonl", f"train.output_dir={work}/sft",
                    "model.freeze_vision=false", "model.freeze_merger=false", "optim.lr=3e-3", "data.max_length=256",
                    "train.micro_batch_size=4", "train.grad_accum=2", *common]}
    # dapo filters on the total reward: the untrained policy's accuracy is uniform in most groups
    for algo, extra in (("grpo", [f"data.eval={data}/test.jsonl", "data.eval_limit=6", "eval.max_new_tokens=40",
                                  "data.task=grids"]), ("dapo", ["algo.filter_metric=reward"])):
        runs[f"rl-{algo}"] = ["prism-rl", "--algo", algo, f"model.path={policy}", f"data.train={data}/rl.jsonl",
                              f"train.output_dir={work}/rl-{algo}", "rollout.group_size=4", "rollout.max_new_tokens=80",
                              "train.prompts_per_step=2", "algo.mini_batches=2", "algo.micro_batch_size=4",
                              "optim.lr=1e-4", "model.freeze_vision=false", reward, *common, *extra]
    for negatives in ("corrupt", "policy"):
        runs[f"align-{negatives}"] = [
            "prism-align", f"model.path={policy}", f"discriminator.path={policy}", f"data.train={data}/align.jsonl",
            f"train.output_dir={work}/align-{negatives}", "rollout.group_size=4", "rollout.max_new_tokens=80",
            "train.prompts_per_step=2", "algo.micro_batch_size=4", "optim.lr=1e-4", "discriminator.lr=1e-3",
            "discriminator.prompts_per_micro_batch=2", "warmup.steps=2", "warmup.pairs_per_step=4",
            f"warmup.negatives={negatives}", "warmup.eval_pairs=4", "data.task=grids", *common]
    return runs


def run(work: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}

    def sh(*cmd: str) -> None:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(list(cmd), check=True, env=env)

    work.mkdir(parents=True, exist_ok=True)
    model, data, base = work / "tiny", work / "data", work / "sft-base"
    if not (model / "config.json").exists():
        sh("prism-tiny", "--out", str(model))
    if not (data / "meta.json").exists():
        sh("prism-synth", "--out", str(data), "--n", "600", "--seed", "0")
    policy = base / "checkpoint-000150"
    if not (policy / "trainer_state.json").exists():  # a policy that writes the format; not compared
        sh("prism-sft", f"model.path={model}", f"data.train={data}/public.jsonl", f"train.output_dir={base}",
           "model.freeze_vision=false", "model.freeze_merger=false", "optim.lr=3e-3", "data.max_length=256",
           "train.micro_batch_size=16", "train.max_steps=150", "train.seed=0", "logging.tensorboard=false",
           "data.eval=null", "train.resume=none")
    result = {}
    for name, cmd in _stage_runs(work, model, data, policy).items():
        shutil.rmtree(work / name, ignore_errors=True)
        sh(*cmd)
        rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        result[name] = [{k: v for k, v in r.items() if not _timing(k)} for r in rows]
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def compare(before: dict, after: dict, tol: float) -> tuple[float, list[str]]:
    """(largest absolute difference over all numeric values, the differences above `tol` and structural ones)."""
    worst, problems = 0.0, []
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name, []), after.get(name, [])
        if len(b) != len(a):
            problems.append(f"{name}: {len(b)} rows before, {len(a)} after")
        for x, y in zip(b, a):
            for k in sorted(k for k in set(x) | set(y) if not _timing(k)):
                if k not in x or k not in y:
                    problems.append(f"{name} step {x.get('step')}: {k} only {'after' if k in y else 'before'}")
                    continue
                u, v = x[k], y[k]
                if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                    d = 0.0 if (math.isnan(u) and math.isnan(v)) else abs(u - v)
                    worst = max(worst, d)
                    if not d <= tol:
                        problems.append(f"{name} step {x['step']} {k}: {u} before, {v} after")
                elif u != v:
                    problems.append(f"{name} step {x.get('step')} {k}: {u!r} before, {v!r} after")
    return worst, problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("workdir", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--tol", type=float, default=1e-6)
    a = p.parse_args()
    if a.cmd == "run":
        return run(a.workdir, a.out)
    before, after = json.loads(a.before.read_text()), json.loads(a.after.read_text())
    worst, problems = compare(before, after, a.tol)
    n = sum(len(rows) for rows in before.values())
    print("\n".join(problems[:50]))
    print(f"{len(before)} runs, {n} logged rows; largest difference {worst:.3g}; "
          f"{len(problems)} differences above {a.tol:g}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
