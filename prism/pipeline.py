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
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from pydantic import Field

from prism.align.config import AlignConfig
from prism.align.train import train as train_align
from prism.checkpoint import STATE_FILE, checkpoint_dir
from prism.core.config import ModelSettings, Section, load_config
from prism.core.task import Task, load_task
from prism.data.formats import load_examples
from prism.eval.run import evaluate_model
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.models.tiny import build_tiny
from prism.plots import make_plots
from prism.report import format_table, summarise
from prism.report import main as report_main
from prism.rl.config import RLConfig
from prism.rl.train import train as train_rl
from prism.sft.config import SFTConfig
from prism.sft.train import train as train_sft
from prism.tracking import logged_seconds, read_curves

log = logging.getLogger("prism.pipeline")
FULL = ["algos=[grpo, dapo, gspo]", "seeds=[0, 1, 2]", "ablations=[dense, text_only, alpha0, alpha1]"]
ABLATION_OVERRIDES = {"dense": ["discriminator.dense=true"], "text_only": ["discriminator.text_only=true"],
                      "alpha0": ["align.alpha=0.0"], "alpha1": ["align.alpha=1.0"]}


class StageRef(Section):
    config: str
    """The stage's own YAML config; the pipeline sets model / data paths, output dir and seed on top."""
    overrides: list[str] = []
    """Extra dotted overrides for every run of this stage."""


class TinySettings(Section):
    hidden: int = Field(128, gt=0)
    layers: int = Field(4, gt=0)
    head_dim: int = Field(32, gt=0)


class PipelineEvalSettings(Section):
    limit: int | None = Field(200, gt=0)
    """Test examples evaluated after each stage (null: all)."""
    samples: int = Field(2, ge=0)
    """Sampled responses per prompt for pass@1 and drift (0: greedy only)."""
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    chunk_size: int = Field(64, gt=0)
    """Sequences per generate call."""


class PipelineConfig(Section):
    """`prism-pipeline`: tiny model + the task's data -> SFT -> {RL with X | ALIGN -> RL with X}, evaluated."""

    renamed = {"eval.batch_size": "eval.chunk_size"}

    workdir: str = "runs/pipeline"
    """Everything the pipeline writes: stage outputs, evaluations, results.json, plots."""
    model_path: str | None = None
    """An existing model to start from; null builds the tiny Qwen3-VL (`tiny`)."""
    tiny: TinySettings = TinySettings()
    task: str = "grids"
    """The task that makes the data (`Task.make_data`) and whose checks evaluation adds (prism.core.task)."""
    data_dir: str | None = None
    """An existing directory of the task's splits (public, curated, align, rl, test .jsonl); null generates
    one under workdir with `synth`."""
    synth: dict[str, Any] = {"n": 4000}
    """Settings of the task's data generator (grids: prism-synth's options, e.g. n, grids, bias_rate, seed)."""
    seeds: list[int] = [0]
    algos: list[Literal["grpo", "dapo", "gspo"]] = ["grpo"]
    """The RL algorithm(s) X of the rows SFT->X and PRISM+X."""
    ablations: list[Literal["dense", "text_only", "alpha0", "alpha1"]] = []
    """Extra ALIGN variants, each evaluated as a PRISM row (alphaK: align.alpha=K)."""
    sft: StageRef = StageRef(config="configs/sft/public.yaml")
    align: StageRef = StageRef(config="configs/align/demo.yaml")
    rl: StageRef = StageRef(config="configs/rl/demo.yaml")
    eval: PipelineEvalSettings = PipelineEvalSettings()
    threads: int | None = Field(None, gt=0)
    """torch intra-op threads (null: leave torch's default)."""


def _done(cfg) -> Path | None:
    ckpt = checkpoint_dir(cfg.train.output_dir, cfg.train.max_steps)
    return ckpt if (ckpt / STATE_FILE).is_file() else None


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.task: Task = load_task(cfg.task, key="task")
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
            t = self.cfg.tiny
            build_tiny(out, hidden=t.hidden, layers=t.layers, head_dim=t.head_dim)
        return out

    def data_dir(self) -> Path:
        if self.cfg.data_dir:
            return Path(self.cfg.data_dir)
        out = self.work / "data"
        if not (out / "meta.json").is_file():
            self.task.make_data(out, self.cfg.synth)
        return out

    # ------------------------------------------------------------------------------ stages

    def _stage(self, name: str, cls, ref, overrides: list[str], train_fn) -> Path:
        cfg = load_config(cls, ref.config, [*ref.overrides, f"data.task={self.cfg.task}", *overrides])
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
        data, model = self.data_dir(), self.model_dir()
        return self._stage(f"sft/seed{seed}", SFTConfig, self.cfg.sft, [
            f"model.path={model}", f"data.train={data}/public.jsonl", "data.eval=null",
            f"train.output_dir={self.work}/seed{seed}/sft", f"train.seed={seed}"], train_sft)

    def rl(self, seed: int, algo: str, start: Path, branch: str) -> Path:
        data = self.data_dir()
        return self._stage(f"rl-{branch}-{algo}/seed{seed}", RLConfig, self.cfg.rl, [
            f"model.path={start}", f"data.train={data}/rl.jsonl", "data.eval=null", f"algo.name={algo}",
            f"train.output_dir={self.work}/seed{seed}/{branch}-{algo}", f"train.seed={seed}"], train_rl)

    def align(self, seed: int, start: Path, variant: str) -> Path:
        data = self.data_dir()
        return self._stage(f"align-{variant}/seed{seed}", AlignConfig, self.cfg.align, [
            # the discriminator's backbone is the starting policy: it already reads the grids
            f"model.path={start}", f"discriminator.path={start}", f"data.train={data}/align.jsonl",
            "data.eval=null", f"train.output_dir={self.work}/seed{seed}/align-{variant}", f"train.seed={seed}",
            *ABLATION_OVERRIDES.get(variant, [])], train_align)

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self, ckpt: Path, seed: int) -> dict:
        e = self.cfg.eval
        cache = ckpt / "pipeline-eval.json"
        key = {"task": self.cfg.task, "limit": e.limit, "samples": e.samples, "temperature": e.temperature,
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
                                max_new_tokens=e.max_new_tokens, chunk_size=e.chunk_size,
                                reference=[ex.response for ex in test], embed_model=embed, task=self.task)
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
            "table_groups": list(self.task.table_groups),
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


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
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
    print(format_table(results["summary"], "greedy", groups=results["table_groups"]))
    print()
    print(f"results: {cfg.workdir}/results.json   plots: {', '.join(results['plots'])}")
    print(f"total time: {results['timings_s']['total'] / 60:.1f} min")
    return results
