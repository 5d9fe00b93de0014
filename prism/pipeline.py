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
pipeline resumes where it stopped; what is reused must have been made with this run's settings (a
finished stage: its checkpoint's config; the data and the tiny model: a record beside them), or the
run stops with one line naming the difference. `--full` (`FULL`) runs X in {grpo, dapo, gspo}, 5 seeds, the
`dense`, `text_only`, α = 0 and α = 1 ALIGN ablations and 1,000 test questions, with the layout drift added
to the public pool, and reports mean ± std over seeds and paired differences per seed.
Writes WORKDIR/results.json and WORKDIR/plots/*.png.

Before anything is built or trained, `Pipeline.plan` builds the config of every stage of the run (every
seed, X and ablation) and runs each stage's own checks, so a bad stage config or override stops at once
with one line naming the stage; the run then trains with exactly those configs. Relative paths set in
the pipeline file (stage configs, `data_dir`, `model_path`) are taken against the file's folder, so
`--config` works from any directory; `workdir`, the defaults and command-line overrides stay relative
to the current directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
import yaml
from pydantic import Field

from prism.align.config import AlignConfig
from prism.align.train import check_config as check_align
from prism.align.train import train as train_align
from prism.checkpoint import STATE_FILE, checkpoint_dir
from prism.core.config import (
    ModelSettings,
    Section,
    config_changes,
    load_config,
    parse_overrides,
)
from prism.core.errors import ConfigError, RunError
from prism.core.files import write_atomic
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
from prism.rl.train import check_config as check_rl
from prism.rl.train import train as train_rl
from prism.sft.config import SFTConfig
from prism.sft.train import train as train_sft
from prism.tracking import logged_seconds, read_curves

log = logging.getLogger("prism.pipeline")
FULL = ["algos=[grpo, dapo, gspo]", "seeds=[0, 1, 2, 3, 4]", "ablations=[dense, text_only, alpha0, alpha1]",
        "synth.n_test=1000", "eval.limit=null", "synth.layout_drift=flip_rows", "synth.layout_rate=0.6"]
"""--full: every algorithm and ablation, five seeds (paired comparisons need several), a 1,000-question test
split evaluated whole (at ~60 % accuracy, 200 questions carry ±3.5 points of sampling noise; 1,000, ±1.5), and
a second drift in the public pool beside the colour bias, one only the image reveals: 60 % of its captions list
the rows bottom-up (every colour count kept). The rate is the colour bias's, so that, as for the colour, the
drifted caption is the pool's majority and an SFT model learns it; `flip_rows` rather than `swap_rows`, whose
three random swaps would each be rarer than the true order."""
ABLATION_OVERRIDES = {"dense": ["discriminator.dense=true"], "text_only": ["discriminator.text_only=true"],
                      "alpha0": ["align.alpha=0.0"], "alpha1": ["align.alpha=1.0"]}


class StageRef(Section):
    config: str
    """The stage's own YAML config; the pipeline sets model / data paths, output dir and seed on top.
    Relative: to the pipeline file's folder when set in that file, else to the current directory."""
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
    backend: Literal["native", "hf"] = "native"
    """The rollout backend that samples the evaluations (as rollout.backend)."""
    probe_limit: int = Field(200, gt=0)
    """Test references the ALIGN stages' discriminators are probed on (`Pipeline.probe`)."""


class PipelineConfig(Section):
    """`prism-pipeline`: tiny model + the task's data -> SFT -> {RL with X | ALIGN -> RL with X}, evaluated."""

    renamed = {"eval.batch_size": "eval.chunk_size"}

    workdir: str = "runs/pipeline"
    """Everything the pipeline writes: stage outputs, evaluations, results.json, plots. Relative: to the
    current directory, even when set in a pipeline file (unlike the input paths below)."""
    model_path: str | None = None
    """An existing model to start from; null builds the tiny Qwen3-VL (`tiny`). Relative: to the pipeline
    file's folder when set in that file, else to the current directory."""
    tiny: TinySettings = TinySettings()
    task: str = "grids"
    """The task that makes the data (`Task.make_data`) and whose checks evaluation adds (prism.core.task)."""
    data_dir: str | None = None
    """An existing directory of the task's splits (public, curated, align, rl, test .jsonl); null generates
    one under workdir with `synth`. Relative: as model_path."""
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
    processes: int = Field(1, gt=0)
    """Stages trained at once, each (with its evaluation) in a process of its own: a stage starts as soon
    as the stage it starts from is done, so independent branches (SFT→X beside ALIGN→PRISM+X, the seeds)
    run side by side. The threads are shared out: each process gets max(1, threads // processes). A
    stage's results do not depend on this, only on its own thread count (tested)."""


INPUT_PATHS = ("model_path", "data_dir", "sft.config", "align.config", "rl.config")
"""The pipeline's input paths: relative ones set in a pipeline file are taken against its folder."""


def _sets(tree: dict, dotted: str) -> bool:
    """Whether the nested mapping `tree` has the dotted key."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def load_pipeline_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """`load_config(PipelineConfig, path, overrides)`, with the relative INPUT_PATHS that the file itself
    sets taken against the file's folder (`configs/demo/pipeline.yaml` names `../sft/public.yaml`). The
    defaults, paths given as overrides and `workdir` stay relative to the current directory."""
    cfg = load_config(PipelineConfig, path, overrides)
    if path is None:
        return cfg
    in_file = yaml.safe_load(Path(path).read_text()) or {}  # load_config has read it: a mapping
    overridden = parse_overrides(overrides or [])
    folder = Path(path).parent
    for dotted in INPUT_PATHS:
        *sections, key = dotted.split(".")
        owner: Any = cfg
        for name in sections:
            owner = getattr(owner, name)
        value = getattr(owner, key)
        if value and not Path(value).is_absolute() and _sets(in_file, dotted) and not _sets(overridden, dotted):
            setattr(owner, key, os.path.normpath(folder / value))
    return cfg


EVAL_VERSION = 2
"""Part of a cached evaluation's key: raised when what evaluation measures changes (2: the caption errors
by drift), so that an evaluation an older prism cached is made again rather than read back without them."""

MADE_WITH = "pipeline-made-with.json"
"""Beside the data and the tiny model the pipeline makes: the settings they were made with."""


def _done(cfg) -> Path | None:
    ckpt = checkpoint_dir(cfg.train.output_dir, cfg.train.max_steps)
    return ckpt if (ckpt / STATE_FILE).is_file() else None


@dataclass(frozen=True)
class Stage:
    """One training run of the pipeline, with the config it trains with."""

    name: str
    """What the log and the timings call it: sft/seed0, rl-sft-grpo/seed0, align-dense/seed0, rl-prism-grpo/seed0."""
    after: str | None
    """The name of the stage it starts from (None: it starts from the base model)."""
    row: str
    """Its row of the results: SFT, SFT→X, PRISM, PRISM[variant] or PRISM+X."""
    seed: int
    cfg: SFTConfig | AlignConfig | RLConfig
    train: Callable[[Any], Any]
    curves: tuple[str, ...] = ()
    """The logged metrics kept as curves in results.json."""

    @property
    def checkpoint(self) -> Path:
        """Its final checkpoint, where the stages after it start (it need not exist yet)."""
        return checkpoint_dir(self.cfg.train.output_dir, self.cfg.train.max_steps)


RL_CURVES = ("rollout/reward", "rollout/accuracy")
ALIGN_CURVES = ("disc/perception/gap", "disc/reasoning/gap", "disc/perception/acc", "disc/reasoning/acc",
                "rollout/caption_match", "rollout/accuracy")


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.task: Task = load_task(cfg.task, key="task")
        self.work = Path(cfg.workdir)
        self.model = Path(cfg.model_path) if cfg.model_path else self.work / "tiny-model"
        self.data = Path(cfg.data_dir) if cfg.data_dir else self.work / "data"
        self.timings: dict[str, float] = {}
        self.trained: list[str] = []  # stages trained by this invocation (the others were reused)

    # ------------------------------------------------------------------------------ the plan

    def _stage(self, name: str, row: str, seed: int, cls, ref: StageRef, overrides: list[str], train_fn,
               check=None, curves: tuple[str, ...] = (), after: Stage | None = None) -> Stage:
        """A stage's config as it will train (the stage file < its pipeline overrides < the pipeline's
        own settings), checked; a problem stops in one line naming the stage."""
        try:
            cfg = load_config(cls, ref.config, [*ref.overrides, f"data.task={self.cfg.task}", *overrides])
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        if check is not None:
            try:
                check(cfg)
            except ConfigError as e:
                raise ConfigError(f"{name}: {ref.config} + overrides: {e}") from None
        return Stage(name, after.name if after else None, row, seed, cfg, train_fn, curves)

    def _rl(self, seed: int, algo: str, start: Stage, branch: str, row: str) -> Stage:
        return self._stage(f"rl-{branch}-{algo}/seed{seed}", row, seed, RLConfig, self.cfg.rl, [
            f"model.path={start.checkpoint}", f"data.train={self.data}/rl.jsonl", "data.eval=null",
            f"algo.name={algo}", f"train.output_dir={self.work}/seed{seed}/{branch}-{algo}", f"train.seed={seed}"],
            train_rl, check_rl, RL_CURVES, after=start)

    def _align(self, seed: int, start: Stage, variant: str) -> Stage:
        row = "PRISM" if variant == "default" else f"PRISM[{variant}]"
        return self._stage(f"align-{variant}/seed{seed}", row, seed, AlignConfig, self.cfg.align, [
            # the discriminator's backbone is the starting policy: it already reads the grids
            f"model.path={start.checkpoint}", f"discriminator.path={start.checkpoint}",
            f"data.train={self.data}/align.jsonl", "data.eval=null",
            f"train.output_dir={self.work}/seed{seed}/align-{variant}", f"train.seed={seed}",
            *ABLATION_OVERRIDES.get(variant, [])], train_align, check_align, ALIGN_CURVES, after=start)

    def plan(self) -> list[Stage]:
        """Every stage of the run in the order it runs, each with the config it trains with: built
        (load_config) and checked (the stage's own `check_config`) without building, generating or
        training anything, so that a bad stage config or override stops before the first stage instead
        of after the stages before it. Paths that earlier stages will write are not checked; a given
        `model_path` and the splits of a given `data_dir` are."""
        cfg = self.cfg
        stages: list[Stage] = []
        for seed in cfg.seeds:
            sft = self._stage(f"sft/seed{seed}", "SFT", seed, SFTConfig, cfg.sft, [
                f"model.path={self.model}", f"data.train={self.data}/public.jsonl", "data.eval=null",
                f"train.output_dir={self.work}/seed{seed}/sft", f"train.seed={seed}"], train_sft)
            stages.append(sft)
            stages += [self._rl(seed, algo, sft, "sft", f"SFT→{algo}") for algo in cfg.algos]
            for variant in ["default", *cfg.ablations]:
                aligned = self._align(seed, sft, variant)
                stages.append(aligned)
                if variant == "default":
                    stages += [self._rl(seed, algo, aligned, "prism", f"PRISM+{algo}") for algo in cfg.algos]
        if cfg.model_path and not self.model.is_dir():
            raise ConfigError(f"model_path: {self.model}: not a directory")
        if cfg.data_dir:
            for split in dict.fromkeys([*(Path(s.cfg.data.train) for s in stages), self.data / "test.jsonl"]):
                if not split.is_file():
                    raise ConfigError(f"data_dir: {split}: file not found")
        return stages

    # ------------------------------------------------------------------------------ inputs and stages

    def _made(self) -> list[tuple[str, Path, str, dict, Callable[[], None]]]:
        """What the pipeline makes under workdir unless given: (setting, folder, file that marks it done,
        the settings it is made with, how to make it)."""
        t = self.cfg.tiny
        made = []
        if not self.cfg.data_dir:
            made.append(("synth", self.data, "meta.json", {"task": self.cfg.task, "synth": self.cfg.synth},
                         lambda: self.task.make_data(self.data, self.cfg.synth)))
        if not self.cfg.model_path:
            made.append(("tiny", self.model, "config.json", {"tiny": t.model_dump(mode="json")},
                         lambda: build_tiny(self.model, hidden=t.hidden, layers=t.layers, head_dim=t.head_dim)))
        return made

    def check_reuse(self, stages: list[Stage]) -> None:
        """Stop with one line when something already under workdir was made with other settings than this
        run's: the data (`synth`), the tiny model (`tiny`) or a finished stage (its checkpoint's config.yaml
        against the stage's config now). Reusing it would mix two runs in one results table."""
        for key, folder, _, settings, _ in self._made():
            stamp = folder / MADE_WITH
            if stamp.is_file():
                changes = config_changes(json.loads(stamp.read_text()), settings)
                if changes:
                    raise ConfigError(f"{key}: {folder} was made with other settings ({'; '.join(changes)}); "
                                      "choose another workdir, or delete it to make it again")
        for stage in stages:
            done = _done(stage.cfg)
            if done is None or not (done / "config.yaml").is_file():
                continue
            changes = config_changes(yaml.safe_load((done / "config.yaml").read_text()),
                                     stage.cfg.model_dump(mode="json"))
            if changes:
                raise ConfigError(f"{stage.name}: {done} was trained with other settings ({'; '.join(changes)}); "
                                  f"choose another workdir, or delete {stage.cfg.train.output_dir} to train it again")

    def prepare(self) -> None:
        """The task's data and the tiny model under workdir, unless given (data_dir, model_path) or there,
        each with a record of the settings it was made with (`check_reuse`)."""
        for key, folder, marker, settings, make in self._made():
            if not (folder / marker).is_file():
                make()
            elif not (folder / MADE_WITH).is_file():
                log.warning("%s: %s has no record of the settings it was made with (an older prism); reusing it "
                            "as made with this run's %s settings", key, folder, key)
            (folder / MADE_WITH).write_text(json.dumps(settings, indent=2) + "\n")

    def _train(self, stage: Stage) -> Path:
        """The stage's final checkpoint: trained now, or reused when it is already there."""
        cfg = stage.cfg
        done = _done(cfg)
        if done is None:
            log.info("=== %s -> %s", stage.name, cfg.train.output_dir)
            t0 = time.perf_counter()
            stage.train(cfg)
            self.timings[stage.name] = time.perf_counter() - t0
            self.trained.append(stage.name)
            done = _done(cfg)
            if done is None:
                raise RunError(f"{stage.name}: training ended without its final checkpoint {stage.checkpoint}")
        else:
            log.info("=== %s: reusing %s", stage.name, done)
            seconds = logged_seconds(Path(cfg.train.output_dir))
            if seconds is not None:
                self.timings[stage.name] = seconds
        return done

    # ------------------------------------------------------------------------------ evaluation

    def evaluate(self, ckpt: Path, seed: int) -> dict:
        e = self.cfg.eval
        cache = ckpt / "pipeline-eval.json"
        key = {"task": self.cfg.task, "limit": e.limit, "samples": e.samples, "temperature": e.temperature,
               "max_new_tokens": e.max_new_tokens, "seed": seed, "backend": e.backend, "metrics": EVAL_VERSION}
        if (cached := _cached(cache, key)) is not None:
            return cached
        torch.manual_seed(seed)
        test = load_examples(self.data / "test.jsonl", limit=e.limit)
        model = load_model(ModelSettings(path=str(ckpt)), trainable=False)
        embed = load_model(ModelSettings(path=str(self.model)), trainable=False)  # one fixed embedder
        result = evaluate_model(model, load_processor(ckpt), test, samples=e.samples, temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, chunk_size=e.chunk_size,
                                reference=[ex.response for ex in test], embed_model=embed, task=self.task,
                                backend=e.backend)
        _write_json(cache, {"key": key, "result": result})
        return result

    def probe(self, stage: Stage, ckpt: Path) -> dict | None:
        """An ALIGN stage's trained discriminator against negatives that differ from the test references only
        in the caption, one kind at a time (the task's optional `caption_negatives`; grids: `layout`, the rows
        flipped with every colour count kept, and `colour`, one cell recoloured): per kind and expert, the
        fraction of pairs whose sections differ where the reference scores higher (`pairwise_accuracy`; an
        expert that sees no difference, like the reasoning expert on a caption-only change, has none). It
        tells whether a discriminator can see a drift at all, whatever the policy learned from it. None for
        other stages or a task without negatives."""
        negatives_of = getattr(self.task, "caption_negatives", None)
        if negatives_of is None or not isinstance(stage.cfg, AlignConfig):
            return None
        cache = ckpt / "pipeline-probe.json"
        key = {"task": self.cfg.task, "limit": self.cfg.eval.probe_limit}
        if (cached := _cached(cache, key)) is not None:
            return cached
        from prism.align.game import DISC_DIR, build_discriminator
        from prism.align.warmup import pairwise_accuracy

        disc = build_discriminator(stage.cfg, ckpt / DISC_DIR)
        test = load_examples(self.data / "test.jsonl", limit=self.cfg.eval.probe_limit)
        negatives = [negatives_of(ex.response, ex) if ex.response else {} for ex in test]
        result: dict[str, float] = {}
        for kind in dict.fromkeys(k for n in negatives for k in n):
            pairs = [(ex, n[kind]) for ex, n in zip(test, negatives) if kind in n]
            acc = pairwise_accuracy(disc, [ex for ex, _ in pairs], [ex.response for ex, _ in pairs],
                                    [n for _, n in pairs])
            for name, value in acc.items():
                if not (name.endswith("_pairs") or math.isnan(value)):  # nan: the expert saw no difference
                    result[f"{kind}/{name}"] = value
        _write_json(cache, {"key": key, "result": result})
        return result

    # ------------------------------------------------------------------------------ the run

    def run_stage(self, stage: Stage) -> dict:
        """Train (or reuse) one stage and evaluate it: its evaluation, curves, seconds, whether trained now."""
        ckpt = self._train(stage)
        result = self.evaluate(ckpt, stage.seed)
        probe = self.probe(stage, ckpt)
        return {"eval": {**result, "probe": probe} if probe else result,
                "curves": read_curves(ckpt.parent, stage.curves) if stage.curves else None,
                "seconds": self.timings.get(stage.name), "trained": stage.name in self.trained}

    def _run_stages(self, stages: list[Stage]) -> dict[str, dict]:
        """Every stage's `run_stage` result: here, in plan order, or `processes` at a time in worker
        processes, each stage submitted once the stage it starts from is done."""
        if self.cfg.processes == 1:
            return {stage.name: self.run_stage(stage) for stage in stages}
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        threads = max(1, (self.cfg.threads or torch.get_num_threads()) // self.cfg.processes)
        done: dict[str, dict] = {}
        waiting = list(stages)
        running: dict = {}
        with ProcessPoolExecutor(self.cfg.processes, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(self.cfg, threads)) as pool:
            while waiting or running:
                for stage in [s for s in waiting if s.after is None or s.after in done]:
                    waiting.remove(stage)
                    log.info("=== %s: started in a worker process (%d thread%s)", stage.name, threads,
                             "s" if threads > 1 else "")
                    running[pool.submit(_worker_stage, stage)] = stage
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stage = running.pop(future)
                    done[stage.name] = future.result()  # a stage's error stops the run here, as it would alone
                    log.info("=== %s: done", stage.name)
        return done

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        stages = self.plan()  # every stage config, checked before anything is written, built or trained
        self.check_reuse(stages)  # and nothing already there was made with other settings
        self.work.mkdir(parents=True, exist_ok=True)
        self.prepare()
        done = self._run_stages(stages)
        rows: dict[str, dict[str, dict]] = {}   # row name -> seed -> evaluation
        curves: dict[str, dict[str, list]] = {}  # run name -> metric curves
        for stage in stages:  # in plan order, however the stages were scheduled
            out = done[stage.name]
            rows.setdefault(stage.row, {})[str(stage.seed)] = out["eval"]
            if stage.curves:
                curves[f"seed{stage.seed}/{stage.row}"] = out["curves"]
            if out["seconds"] is not None:
                self.timings[stage.name] = out["seconds"]
        self.trained = [stage.name for stage in stages if done[stage.name]["trained"]]
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
        _write_json(self.work / "results.json", results)
        results["plots"] = make_plots(results, self.work / "plots")
        _write_json(self.work / "results.json", results)
        return results


def _cached(path: Path, key: dict) -> dict | None:
    """The result saved at `path` (by `_write_json` with {"key", "result"}) when it was made with `key`."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    return None


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


_WORKER: dict[str, Pipeline] = {}


def _worker_init(cfg: PipelineConfig, threads: int) -> None:
    """A worker process of `processes`: its share of the threads, the pipeline's log format, its Pipeline."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _WORKER["pipeline"] = Pipeline(cfg)


def _worker_stage(stage: Stage) -> dict:
    return _WORKER["pipeline"].run_stage(stage)


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
    p.add_argument("--full", action="store_true", help="X in {grpo,dapo,gspo}, 5 seeds, dense / text_only / alpha "
                   "ablations, 1,000 test questions, and the layout drift in the public pool")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. workdir=runs/p2 seeds=[0,1]")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_pipeline_config(a.config, (FULL if a.full else []) + a.overrides)
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
