"""How long the SFT trainer waits for its data, with batches built in the training process or ahead by loader
workers (`data.num_workers`), on large photos.

    OMP_NUM_THREADS=1 python benchmarks/data_wait.py [--examples 48 --steps 8 --workers 0,2 --size 1024x768]

The tiny Qwen3-VL (built offline) trains on sharegpt demonstrations whose images are distinct random
`--size` JPEGs (decoded, resized and patched by the Qwen-VL image processor at every step). For each
worker count a fresh `prism-sft` run of `--steps` steps logs `train/data_seconds` (time spent waiting
for the step's batches) and `train/step_seconds`; printed: the mean of both over the steps after the
first (worker start-up), and their ratio, the fraction of step time the trainer waits for data. On this
tiny model the step itself is short, so the fraction is an upper bound of what a real model sees.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch


def make_data(workdir: Path, n: int, size: tuple[int, int]) -> Path:
    from PIL import Image

    data = workdir / f"photos-{size[0]}x{size[1]}-{n}.jsonl"
    if data.is_file():
        return data
    rng = np.random.default_rng(0)
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = workdir / "images" / f"{size[0]}x{size[1]}-{i}.jpg"
        if not path.is_file():
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        rows.append({"messages": [{"role": "user", "content": "<image>What is in this photo?"},
                                  {"role": "assistant", "content": f"<caption>noise {i}</caption><think>it is "
                                   f"random</think><answer>{i}</answer>"}], "images": [str(path)]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def run(model: Path, data: Path, out: Path, steps: int, workers: int, batch: int) -> tuple[float, float]:
    from prism.core.config import load_config
    from prism.sft.config import SFTConfig
    from prism.sft.train import train

    shutil.rmtree(out, ignore_errors=True)
    overrides = {"model.path": model, "data.train": data, "data.eval": "null", "data.max_length": 8192,
                 "data.num_workers": workers, "train.output_dir": out, "train.max_steps": steps,
                 "train.micro_batch_size": batch, "train.cpu": "true", "logging.tensorboard": "false",
                 "optim.lr": 1e-5}
    train(load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return (float(np.mean([r["train/data_seconds"] for r in rows])),
            float(np.mean([r["train/step_seconds"] for r in rows])))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="train.micro_batch_size")
    p.add_argument("--workers", default="0,2", help="data.num_workers values to compare")
    p.add_argument("--size", default="1024x768", help="JPEG width x height")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/data-wait-bench"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from prism.models.tiny import build_tiny

    size = tuple(int(x) for x in a.size.split("x"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.workdir / "model"
    if not (model / "config.json").is_file():
        build_tiny(model)
    data = make_data(a.workdir, a.examples, size)
    results = {}
    for w in (int(x) for x in a.workers.split(",")):
        wait, step = run(model, data, a.workdir / f"run-w{w}", a.steps, w, a.batch)
        results[w] = {"data_seconds": wait, "step_seconds": step, "wait_fraction": wait / step}
        print(f"data.num_workers={w}: waits {wait:.3f} s of a {step:.3f} s step = {100 * wait / step:.0f}% "
              f"({a.size} JPEGs, {a.batch} per step)", flush=True)
    return results


if __name__ == "__main__":
    main()
