"""What the acceptance scripts share: the subprocess environment, the tiny model + synthetic data +
public-pool SFT they start from, `prism-eval` with its result cached next to the checkpoint, and
mean ± std formatting."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prism.checkpoint import STATE_FILE, checkpoint_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def common_arguments(p: argparse.ArgumentParser, workdir: str) -> None:
    """The options every acceptance script takes: where, which seeds, the SFT start, the evaluation."""
    p.add_argument("--workdir", type=Path, default=Path(workdir))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--samples", type=int, default=4, help="sampled answers per test prompt (temperature 1)")
    p.add_argument("--limit", type=int, default=300, help="test prompts evaluated")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")


def sh(*cmd: str, log: Path | None = None) -> float:
    """Run a command with one thread; its output goes to `log`. Returns the wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        subprocess.run(list(cmd), env=ENV, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def public_sft(w: Path, sft_steps: int, synth: list[str], sft_dir: str, sft_overrides: list[str]) -> tuple[Path, Path]:
    """(data directory, SFT checkpoint): the tiny model, `prism-synth` data and SFT on the drifted
    public pool (`configs/sft/public.yaml`), each made only when missing."""
    model, data = w / "tiny-model", w / "data"
    if not (model / "config.json").is_file():
        sh("prism-tiny", "--out", str(model))
    if not (data / "meta.json").is_file():
        sh("prism-synth", "--out", str(data), "--n", "4000", "--seed", "0", *synth)
    sft = checkpoint_dir(w / sft_dir, sft_steps)
    if not (sft / STATE_FILE).is_file():
        sh(sys.executable, "-m", "prism.sft.train", "--config", "configs/sft/public.yaml", f"model.path={model}",
           f"data.train={data}/public.jsonl", "data.eval=null", f"train.output_dir={w / sft_dir}",
           f"train.max_steps={sft_steps}", f"train.save_every={sft_steps}", *sft_overrides, log=w / f"{sft_dir}.log")
    return data, sft


def prism_eval(model: Path, data: Path, samples: int, limit: int) -> dict:
    """`prism-eval` of a checkpoint on `data` with the grid task's checks (greedy + `samples` at temperature 1),
    cached in the checkpoint."""
    out = model / f"eval-test-grids-{samples}x{limit}.json"
    if not out.is_file():
        sh("prism-eval", "--model", str(model), "--data", str(data), "--samples", str(samples), "--limit", str(limit),
           "--max-new-tokens", "256", "--task", "grids", "--out", str(out))
    return json.loads(out.read_text())


def mean_std(xs: list[float]) -> str:
    """Percentages, mean ± sample std (the mean alone for one value)."""
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{100 * xs[0]:.1f}"
