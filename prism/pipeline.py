"""`prism-pipeline`: the main job — the PRISM comparison end to end on the embedded task.

    prism-pipeline --config configs/demo/pipeline.yaml [--full] [workdir=... seeds=[0,1] ...]
    prism-pipeline report --results runs/pipeline/results.json --out docs/results.md

    tiny Qwen3-VL + synthetic data (drifted public pool, curated references, align / rl / test splits)
      -> SFT on the public pool                                    row "SFT"
           -> branch A: RL with X                                   row "SFT→X"
           -> branch B: ALIGN (curated references as the teacher)   row "PRISM"
                -> RL with X                                        row "PRISM+X"

Every stage is evaluated on the test split (greedy accuracy per question type, sampled pass@1,
perception / reasoning error split, drift from the references). A stage whose final checkpoint
exists is not trained again and an evaluation already on disk is read back, so an interrupted
pipeline resumes where it stopped. `--full` runs X in {grpo, dapo, gspo}, 3 seeds and the
`dense`, `text_only`, α = 0 and α = 1 ALIGN ablations, and reports mean ± std over seeds.
Writes WORKDIR/results.json and WORKDIR/plots/*.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from prism.config import AlignConfig, PipelineConfig, RLConfig, SFTConfig, load_config

log = logging.getLogger("prism.pipeline")
FULL = ["algos=[grpo, dapo, gspo]", "seeds=[0, 1, 2]", "ablations=[dense, text_only, alpha0, alpha1]"]
ABLATION_OVERRIDES = {"dense": ["discriminator.dense=true"], "text_only": ["discriminator.text_only=true"],
                      "alpha0": ["align.alpha=0.0"], "alpha1": ["align.alpha=1.0"]}


def final_checkpoint(output_dir: Path, max_steps: int) -> Path:
    return output_dir / f"checkpoint-{max_steps:06d}"


def _done(cfg) -> Path | None:
    ckpt = final_checkpoint(Path(cfg.train.output_dir), cfg.train.max_steps)
    return ckpt if (ckpt / "trainer_state.json").is_file() else None


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.work = Path(cfg.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.trained: list[str] = []  # stages trained by this invocation (the others were reused)

    # ------------------------------------------------------------------------------ inputs

    def model_dir(self) -> Path:
        if self.cfg.model_path:
            return Path(self.cfg.model_path)
        out = self.work / "tiny-model"
        if not (out / "config.json").is_file():
            from prism.models.tiny import build_tiny

            t = self.cfg.tiny
            build_tiny(out, hidden=t.hidden, layers=t.layers, head_dim=t.head_dim)
        return out

    def data_dir(self) -> Path:
        if self.cfg.data_dir:
            return Path(self.cfg.data_dir)
        out = self.work / "data"
        if not (out / "meta.json").is_file():
            from prism.data.synthetic import SynthConfig, generate

            s = self.cfg.synth
            generate(SynthConfig(out=str(out), n=s.n, seed=s.seed, grids=tuple(s.grids), bias_rate=s.bias_rate,
                                 terse_rate=s.terse_rate, caption_noise=s.caption_noise))
        return out

    # ------------------------------------------------------------------------------ stages

    def _stage(self, name: str, cls, ref, overrides: list[str], train_fn) -> Path:
        cfg = load_config(cls, ref.config, [*ref.overrides, *overrides])
        done = _done(cfg)
        if done is None:
            log.info("=== %s -> %s", name, cfg.train.output_dir)
            t0 = time.perf_counter()
            train_fn(cfg)
            self.timings[name] = time.perf_counter() - t0
            self.trained.append(name)
            done = _done(cfg)
        else:
            log.info("=== %s: reusing %s", name, done)
            seconds = logged_seconds(Path(cfg.train.output_dir))
            if seconds is not None:
                self.timings[name] = seconds
        return done

    def sft(self, seed: int) -> Path:
        from prism.sft.train import train

        data, model = self.data_dir(), self.model_dir()
        return self._stage(f"sft/seed{seed}", SFTConfig, self.cfg.sft, [
            f"model.path={model}", f"data.train={data}/public.jsonl", "data.eval=null",
            f"train.output_dir={self.work}/seed{seed}/sft", f"train.seed={seed}"], train)

    def rl(self, seed: int, algo: str, start: Path, branch: str) -> Path:
        from prism.rl.train import train

        data = self.data_dir()
        return self._stage(f"rl-{branch}-{algo}/seed{seed}", RLConfig, self.cfg.rl, [
            f"model.path={start}", f"data.train={data}/rl.jsonl", "data.eval=null", f"algo.name={algo}",
            f"train.output_dir={self.work}/seed{seed}/{branch}-{algo}", f"train.seed={seed}"], train)

    def align(self, seed: int, start: Path, variant: str) -> Path:
        from prism.align.train import train

        data = self.data_dir()
        return self._stage(f"align-{variant}/seed{seed}", AlignConfig, self.cfg.align, [
            # the discriminator's backbone is the starting policy: it already reads the grids
            f"model.path={start}", f"discriminator.path={start}", f"data.train={data}/align.jsonl",
            "data.eval=null", f"train.output_dir={self.work}/seed{seed}/align-{variant}", f"train.seed={seed}",
            *ABLATION_OVERRIDES.get(variant, [])], train)

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self, ckpt: Path, seed: int) -> dict:
        from prism.config import ModelSettings
        from prism.data.formats import load_examples
        from prism.eval.run import evaluate_model
        from prism.models.loader import load_model
        from prism.models.processor import load_processor

        e = self.cfg.eval
        cache = ckpt / "pipeline-eval.json"
        key = {"limit": e.limit, "samples": e.samples, "temperature": e.temperature,
               "max_new_tokens": e.max_new_tokens, "seed": seed}
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached["result"]
        torch.manual_seed(seed)
        test = load_examples(self.data_dir() / "test.jsonl", limit=e.limit)
        model = load_model(ModelSettings(path=str(ckpt)), trainable=False)
        embed = load_model(ModelSettings(path=str(self.model_dir())), trainable=False)  # one fixed embedder
        result = evaluate_model(model, load_processor(ckpt), test, samples=e.samples, temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                reference=[ex.response for ex in test], embed_model=embed)
        cache.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
        return result

    # ------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rows: dict[str, dict[str, dict]] = {}   # row name -> seed -> evaluation
        curves: dict[str, dict[str, list]] = {}  # run name -> metric curves
        for seed in cfg.seeds:
            sft = self.sft(seed)
            rows.setdefault("SFT", {})[str(seed)] = self.evaluate(sft, seed)
            for algo in cfg.algos:
                a = self.rl(seed, algo, sft, "sft")
                rows.setdefault(f"SFT→{algo}", {})[str(seed)] = self.evaluate(a, seed)
                curves[f"seed{seed}/SFT→{algo}"] = read_curves(a.parent, ("rollout/reward", "rollout/accuracy"))
            for variant in ["default", *cfg.ablations]:
                aligned = self.align(seed, sft, variant)
                row = "PRISM" if variant == "default" else f"PRISM[{variant}]"
                rows.setdefault(row, {})[str(seed)] = self.evaluate(aligned, seed)
                curves[f"seed{seed}/{row}"] = read_curves(aligned.parent, (
                    "disc/perception/gap", "disc/reasoning/gap", "disc/perception/acc", "disc/reasoning/acc",
                    "rollout/caption_match", "rollout/accuracy"))
                if variant != "default":
                    continue
                for algo in cfg.algos:
                    b = self.rl(seed, algo, aligned, "prism")
                    rows.setdefault(f"PRISM+{algo}", {})[str(seed)] = self.evaluate(b, seed)
                    curves[f"seed{seed}/PRISM+{algo}"] = read_curves(b.parent, ("rollout/reward", "rollout/accuracy"))
        results = {
            "config": cfg.model_dump(mode="json"),
            "rows": rows,
            "summary": summarise(rows),
            "curves": curves,
            # per stage: trained now, or read back from its metrics log; total: this invocation only
            "timings_s": {**self.timings, "stages": sum(self.timings.values()), "total": time.perf_counter() - t0},
            "trained": self.trained,
            "machine": machine(),
        }
        (self.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        results["plots"] = make_plots(results, self.work / "plots")
        (self.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results


# ------------------------------------------------------------------------------------ results


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] without one)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def logged_seconds(run_dir: Path) -> float | None:
    """Seconds a finished stage spent in its training steps, from the timestamps of its metrics log
    (first to last row, plus the first step's own duration; loading and ALIGN's warm-start are not
    in it); None without a log."""
    stamped = [r for r in metric_rows(run_dir) if "time" in r]
    if not stamped:
        return None
    first = stamped[0]
    step_seconds = first.get("train/step_seconds", first.get("time/step", 0.0))
    return stamped[-1]["time"] - first["time"] + step_seconds


def read_curves(run_dir: Path, keys: tuple[str, ...]) -> dict[str, list]:
    """{key: [[step, value], ...]} from a run's metrics.jsonl."""
    rows = [r for r in metric_rows(run_dir) if r["step"] > 0]
    return {k: [[r["step"], r[k]] for r in rows if k in r] for k in keys}


TABLE_KEYS = ("accuracy", "acc/count", "acc/compare", "acc/row_count", "acc/most", "caption_match",
              "error/format", "error/perception", "error/reasoning")


def summarise(rows: dict[str, dict[str, dict]]) -> dict[str, dict[str, list[float]]]:
    """row -> metric -> [mean, std over seeds, n seeds] for greedy and sampled metrics and drift."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, by_seed in rows.items():
        values: dict[str, list[float]] = {}
        for result in by_seed.values():
            for group in ("greedy", "sampled", "drift"):
                for k, v in result.get(group, {}).items():
                    if k != "n":
                        values.setdefault(f"{group}/{k}", []).append(v)
        out[row] = {k: [statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)]
                    for k, v in values.items()}
    return out


def format_table(summary: dict, group: str = "greedy", markdown: bool = False) -> str:
    """The paper-shaped table: rows per stage, columns per question type, average and error split."""
    cols = [k for k in TABLE_KEYS if any(f"{group}/{k}" in m for m in summary.values())]
    names = {"accuracy": "avg", "caption_match": "perception ok", "error/format": "err fmt",
             "error/perception": "err perc", "error/reasoning": "err reas"}
    header = ["", *[names.get(c, c.split("/")[-1]) for c in cols]]

    def cell(m, c):
        if f"{group}/{c}" not in m:
            return "—"
        mean, std, n = m[f"{group}/{c}"]
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n > 1 else "")

    body = [[row, *[cell(m, c) for c in cols]] for row, m in summary.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [header, *body])


def mean_over_seeds(curves: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
    """{"seed0/PRISM": {key: [[step, v], ...]}, ...} -> {"PRISM": {key: [(step, mean over seeds), ...]}}."""
    grouped: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run, c in curves.items():
        row = run.split("/", 1)[1]
        for key, points in c.items():
            for step, v in points:
                grouped.setdefault(row, {}).setdefault(key, {}).setdefault(step, []).append(v)
    return {row: {key: [(step, statistics.fmean(vs)) for step, vs in sorted(by_step.items())]
                  for key, by_step in keys.items()} for row, keys in grouped.items()}


def make_plots(results: dict, out: Path) -> list[str]:
    """PNG plots: accuracy per stage; ALIGN expert gap and discriminator accuracy; RL reward over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    summary = results["summary"]

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary)), 4))
    names = list(summary)
    for i, (group, label) in enumerate((("greedy", "greedy"), ("sampled", "sampled pass@1 (T=1)"))):
        means = [100 * summary[r].get(f"{group}/accuracy", [0, 0, 0])[0] for r in names]
        stds = [100 * summary[r].get(f"{group}/accuracy", [0, 0, 0])[1] for r in names]
        ax.bar([x + 0.4 * i for x in range(len(names))], means, 0.4, yerr=stds, label=label, capsize=3)
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("test answer accuracy (%)")
    ax.set_xlabel("stage")
    ax.set_title("Accuracy per stage")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "accuracy_per_stage.png"))

    curves = mean_over_seeds(results["curves"])
    legend = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    align_rows = {k: v for k, v in curves.items() if k.startswith("PRISM") and "+" not in k}
    if align_rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for i, (row, c) in enumerate(align_rows.items()):
            colour = f"C{i % 10}"
            for expert, style in (("perception", "-"), ("reasoning", "--")):
                for ax, key in ((a1, f"disc/{expert}/gap"), (a2, f"disc/{expert}/acc")):
                    if c.get(key):
                        s_, v = zip(*c[key])
                        ax.plot(s_, v, style, color=colour, label=f"{row} {expert}")
        a1.set_xlabel("ALIGN step")
        a1.set_ylabel("teacher − policy score")
        a1.set_title("Per-expert score gap (mean over seeds)")
        a2.set_xlabel("ALIGN step")
        a2.set_ylabel("discriminator pairwise accuracy")
        a2.set_title("Discriminator accuracy (mean over seeds)")
        a2.axhline(0.5, color="gray", lw=0.5)
        if a2.get_legend_handles_labels()[0]:  # small test runs may log no curve
            a2.legend(**legend)
        fig.tight_layout()
        paths.append(_save(fig, out / "align_discriminator.png"))

    rl_rows = {k: v for k, v in curves.items() if "→" in k or "+" in k}
    if rl_rows:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for row, c in rl_rows.items():
            if c.get("rollout/reward"):
                s_, v = zip(*c["rollout/reward"])
                ax.plot(s_, v, "--" if row.startswith("PRISM") else "-", label=row)
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean reward of the rollouts")
        ax.set_title("RL reward over steps (mean over seeds)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**legend)
        fig.tight_layout()
        paths.append(_save(fig, out / "rl_reward.png"))
    return paths


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def machine() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "cuda": torch.cuda.is_available(),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from prism.report import main as report_main

        return report_main(argv[1:])
    p = argparse.ArgumentParser(prog="prism-pipeline", description="SFT -> {X | ALIGN -> X} on the embedded task, "
                                "evaluated after every stage. `prism-pipeline report --help` writes the results page.")
    p.add_argument("--config", default="configs/demo/pipeline.yaml")
    p.add_argument("--full", action="store_true", help="X in {grpo,dapo,gspo}, 3 seeds, dense / text_only / alpha "
                   "ablations")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. workdir=runs/p2 seeds=[0,1]")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(PipelineConfig, a.config, (FULL if a.full else []) + a.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = Pipeline(cfg).run()
    print()
    print("greedy test accuracy (%) per stage" + (f", mean ± std over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else ""))
    print(format_table(results["summary"], "greedy"))
    print()
    print(f"results: {cfg.workdir}/results.json   plots: {', '.join(results['plots'])}")
    print(f"total time: {results['timings_s']['total'] / 60:.1f} min")
    return results
