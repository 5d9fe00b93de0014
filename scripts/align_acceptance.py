"""Does ALIGN move a drifted SFT policy toward the curated references? Warm-start check + the game, 2 seeds.

    OMP_NUM_THREADS=1 python scripts/align_acceptance.py [--workdir runs/align-acceptance] [--seeds 0 1] \
        [--align-steps 60] [--parallel 2] [--align-overrides discriminator.text_only=true ...]

1. tiny model + `prism-synth` (3x3 grids, yellow captioned as blue in 60 % of its cells and 80 % terse
   traces in the public pool) and SFT on that drifted public pool (`configs/sft/public.yaml`);
2. warm-start check: `prism-align warmup` on the curated pool with corrupted references as
   negatives (one caption cell, one reasoning number changed; a fresh corruption each time a reference
   is drawn); held-out pairwise accuracy per expert on 100 held-out prompts;
3. the game, `prism-align` from the SFT checkpoint (`configs/align/demo.yaml`: the discriminator on
   the SFT checkpoint's backbone, warm-start on SFT samples), once per seed, `--parallel` runs at a time with one thread each;
4. `prism-eval` of the SFT checkpoint and of each ALIGN run on the test split: sampled (temperature 1)
   and greedy answer accuracy, caption exact match, error split, drift from the references.

Prints the before / after table, the per-step curves of each run (discriminator accuracy per expert,
teacher − policy gap, rollout caption match and accuracy) and writes WORKDIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from acceptance_common import common_arguments, mean_std, prism_eval, public_sft, sh

from prism.checkpoint import STATE_FILE, checkpoint_dir

CURVE_KEYS = ("disc/perception/acc", "disc/reasoning/acc", "disc/perception/gap", "disc/reasoning/gap",
              "rollout/caption_match", "rollout/accuracy", "rollout/format_rate")


def evaluate(model: Path, data: Path, samples: int, limit: int) -> dict:
    r = prism_eval(model, data, samples, limit)
    keep = ("accuracy", "caption_match", "format_rate", "error/perception", "error/reasoning")
    return {"greedy": {k: r["greedy"].get(k) for k in keep}, "sampled": {k: r["sampled"].get(k) for k in keep},
            "drift": r.get("drift", {})}


def curves(run: Path) -> dict[str, list]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: [(r["step"], r[k]) for r in rows if k in r and r["step"] > 0] for k in CURVE_KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(p, "runs/align-acceptance")
    p.add_argument("--align-steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=1000, help="of the warm-start check against corruptions")
    p.add_argument("--align-overrides", nargs="*", default=[])
    a = p.parse_args()
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    data, sft = public_sft(w, a.sft_steps, [], "sft", [])
    test = data / "test.jsonl"
    common = [f"model.path={sft}", f"discriminator.path={sft}", f"data.train={data}/align.jsonl", "data.eval=null"]

    # warm-start alone, against corrupted references: can each expert tell one wrong cell / one wrong step?
    warm = w / "warmup-corrupt"
    if not (warm / "warmup" / "metrics.json").is_file():
        sh(sys.executable, "-m", "prism.align.train", "warmup", "--config", "configs/align/demo.yaml", *common,
           f"train.output_dir={warm}", "warmup.negatives=corrupt", f"warmup.data={data}/curated.jsonl",
           f"warmup.steps={a.warmup_steps}", "warmup.eval_pairs=100", "discriminator.lr=3e-4",
           log=w / "warmup-corrupt.log")
    warm_metrics = json.loads((warm / "warmup" / "metrics.json").read_text())

    before = evaluate(sft, test, a.samples, a.limit)

    def run(seed: int):
        out = w / f"align-seed{seed}"
        ckpt = checkpoint_dir(out, a.align_steps)
        if not (ckpt / STATE_FILE).is_file():
            seconds = sh(sys.executable, "-m", "prism.align.train", "--config", "configs/align/demo.yaml", *common,
                         f"train.output_dir={out}", f"train.seed={seed}", f"train.max_steps={a.align_steps}",
                         f"train.save_every={a.align_steps}", *a.align_overrides, log=w / f"align-seed{seed}.log")
            (out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
        seconds = float((out / "wall_seconds.txt").read_text()) if (out / "wall_seconds.txt").is_file() else None
        return seed, evaluate(ckpt, test, a.samples, a.limit), curves(out), seconds

    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(run, a.seeds))
    summary = {"warmup_corrupt": warm_metrics, "sft": before,
               "runs": {f"seed{s}": {"eval": e, "curves": c, "wall_seconds": sec} for s, e, c, sec in results}}
    (w / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("warm-start vs corrupted references, held-out pairwise accuracy: "
          f"perception {warm_metrics.get('warmup/perception_acc')}, reasoning {warm_metrics.get('warmup/reasoning_acc')}")
    keys = ("accuracy", "caption_match", "error/perception", "error/reasoning")
    for mode in ("sampled", "greedy"):
        print(f"\n{mode}: " + " | ".join(f"{k}" for k in keys))
        print("  SFT (public pool)  " + " | ".join(f"{100 * before[mode][k]:.1f}" for k in keys))
        vals = {k: [e[mode][k] for _, e, _, _ in results] for k in keys}
        print("  after ALIGN        " + " | ".join(mean_std(v) for v in vals.values()))
    for seed, _, c, sec in results:
        print(f"\nseed {seed} ({sec / 60:.1f} min)" if sec else f"\nseed {seed}")
        for k, pts in c.items():
            sample = pts[:: max(1, len(pts) // 8)]
            print(f"  {k:24} " + " ".join(f"{v:.2f}" for _, v in sample))


if __name__ == "__main__":
    main()
