"""What every stage's loop does around its own step: set up the run, load the held-out data, open
the logs, and end each step the same way (evaluate, log, save on schedule).

    accelerator, out = setup_run(cfg)
    ...                                                                 # build: data, model, optimizer
    resume_from = claim_output_dir(cfg, accelerator, out)               # this run's checkpoint, if any
    ...                                                                 # restore it: start = its step
    tracker, bar = open_logs(cfg, accelerator, out, start, "sft")      # the run has started: config.yaml
    for step in range(start + 1, cfg.train.max_steps + 1):
        metrics = ...                                                   # the stage's own step
        end_step(cfg, step, metrics, tracker, evaluate=..., save=...)   # evaluate / log / save
        bar.update(1)
    close_run(accelerator, tracker, bar)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from prism.checkpoint.atomic import (
    STATE_FILE,
    checkpoint_step,
    find_resume,
    list_checkpoints,
    set_aside,
)
from prism.core.config import save_config
from prism.core.errors import ConfigError, DataError, TrainingStopped
from prism.core.example import Example
from prism.data.formats import load_examples
from prism.dist.accelerator import make_accelerator
from prism.eval.metrics import with_ground_truths
from prism.models.processor import load_processor
from prism.tracking import METRICS_FILE, Tracker, metric_rows

RUN_FILES = (METRICS_FILE, "config.yaml", "warmup", "tensorboard")
"""What a run writes into its output dir besides its checkpoints (removed with them by train.overwrite)."""


def stage_processor(cfg):
    """The policy's processor as the stage config sets it up: `model.chat_template` and the image pixel bounds
    (`data.image_min_pixels`, `data.image_max_pixels`)."""
    return load_processor(cfg.model.path, cfg.model.trust_remote_code, chat_template=cfg.model.chat_template,
                          min_pixels=cfg.data.image_min_pixels, max_pixels=cfg.data.image_max_pixels)


def setup_run(cfg) -> tuple[Accelerator, Path]:
    """Accelerator (CPU unless a GPU is visible and not disabled), seeds, and a writable output dir."""
    for key, value in (("model.path", cfg.model.path), ("data.train", cfg.data.train)):
        if not value:
            raise ConfigError(f"{key}: not set (it has no default); set it in the config or as {key}=...")
    accelerator = make_accelerator(cpu=cfg.train.cpu)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        check_writable(out)
    return accelerator, out


def names_last_checkpoint(train):
    """Decorates a stage's `train(cfg, ...)`: a step that stopped the run (`TrainingStopped`: a NaN, a
    blown-up update, a collapsed player) was not saved; its one-line message gains the checkpoint that is
    the last good one, from which the run resumes once the setting is fixed."""

    @functools.wraps(train)
    def wrapper(cfg, *args, **kwargs):
        try:
            return train(cfg, *args, **kwargs)
        except TrainingStopped as e:
            ckpts = list_checkpoints(cfg.train.output_dir)
            last = (f"the last good checkpoint is {ckpts[-1]} (train.resume=auto continues from it)" if ckpts else
                    f"no checkpoint was saved yet (the run started from model.path={cfg.model.path})")
            raise type(e)(f"{e}; the step was not saved, {last}") from None

    return wrapper


def check_writable(out: Path, key: str = "train.output_dir") -> None:
    """Create `out` and write a probe file into it; one line naming `key` when that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"{key}: {out} is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot create or write into {out} ({e.strerror or e})") from None


def _holds_run(out: Path) -> str | None:
    """What in `out` shows that a run already used it (None: nothing)."""
    ckpts = list_checkpoints(out)
    if ckpts:
        return f"checkpoints up to {ckpts[-1].name}"
    if metric_rows(out):
        return f"the {METRICS_FILE} of a run"
    if (out / "warmup").is_dir():
        return "a discriminator warm-start (warmup/)"
    return None


def claim_output_dir(cfg, accelerator: Accelerator, out: Path, resume: str | None = None) -> Path | None:
    """The checkpoint this run resumes from (None: it starts fresh), making sure the output dir then
    holds one run only. `resume` defaults to `train.resume`.

    - `auto`: the newest checkpoint that loads; newer ones that do not are moved aside (`set_aside`),
      with a warning.
    - `none` into a dir that holds a run (checkpoints, logged metrics, a warm-start) stops with one line,
      unless `train.overwrite`, which deletes that run first.
    - a checkpoint path: checkpoints of `out` that are not its past (later steps, or any when it lies
      elsewhere) stop the run the same way, or are deleted with `train.overwrite`.

    Every process decides the same way; only the main process changes files, then all wait for it."""
    resume = cfg.train.resume if resume is None else resume
    overwrite = cfg.train.overwrite
    ckpt, broken = find_resume(resume, out)
    others: list[Path] = []  # checkpoints of another run (or of an abandoned future of this one)
    wipe = False
    if resume == "none":
        found = _holds_run(out)
        if found and not overwrite:
            raise ConfigError(f"train.output_dir: {out} already holds {found}; resume it with train.resume=auto, "
                              "choose another train.output_dir, or set train.overwrite=true to replace it")
        wipe = bool(found)
    elif ckpt is not None and resume != "auto":
        step = json.loads((ckpt / STATE_FILE).read_text())["step"]
        inside = ckpt.resolve().parent == out.resolve()
        others = [c for c in list_checkpoints(out)
                  if c.resolve() != ckpt.resolve() and (not inside or checkpoint_step(c) > step)]
        if others and not overwrite:
            raise ConfigError(f"train.resume: {ckpt} is step {step}, but train.output_dir {out} holds "
                              f"{', '.join(c.name for c in others)} of another run (or a later point of this "
                              "one); choose another train.output_dir or set train.overwrite=true to delete them")
    if accelerator.is_main_process:
        for bad, reason in broken:
            set_aside(bad, reason)
        for c in others:
            shutil.rmtree(c)
        if wipe:
            for c in list_checkpoints(out):
                shutil.rmtree(c)
            for name in RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    accelerator.wait_for_everyone()
    return ckpt


def eval_answer_format(cfg) -> str:
    """Where held-out evaluation reads answers from: RL's `reward.answer_format` (so evaluation and the
    rewards agree), `answer` (PRISM's <answer> tag) for the stages without a reward section."""
    return getattr(getattr(cfg, "reward", None), "answer_format", "answer")


def load_eval_data(cfg) -> list[Example]:
    """The held-out examples (`data.eval`, at most `data.eval_limit`), each with a ground truth: an answer
    key or, failing that, a reference response whose answer can be read (prism.eval.metrics.ground_truths,
    as prism-eval does); [] without `data.eval`."""
    if not cfg.data.eval:
        return []
    examples = load_examples(cfg.data.eval, cfg.data.format, skip_bad=cfg.data.skip_bad, limit=cfg.data.eval_limit)
    return with_ground_truths(examples, eval_answer_format(cfg), skip_bad=cfg.data.skip_bad, origin=cfg.data.eval)


def check_enough(cfg, n: int, per_process: int, key: str, world: int, what: str = "prompts") -> None:
    """Stop with a one-line error when the data cannot fill one global batch."""
    if n < per_process * world:
        raise DataError(f"{cfg.data.train}: {n} {what}, fewer than one batch ({key}={per_process} x {world} processes)")


def open_logs(cfg, accelerator: Accelerator, out: Path, start: int, desc: str) -> tuple[Tracker, tqdm]:
    """Called once the run has started (data, models and any checkpoint loaded): the resolved config is
    written (a run that fails to start leaves the previous config.yaml as it was), the metric logs are
    opened (main process only) without the rows of steps after `start`, which this run will log again,
    and the progress bar continues at `start`."""
    if accelerator.is_main_process:
        tmp = out / ".config.yaml.tmp"
        save_config(cfg, tmp)
        os.replace(tmp, out / "config.yaml")
    tracker = Tracker(out, cfg.logging, cfg.model_dump(mode="json"), enabled=accelerator.is_main_process,
                      start=start)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not accelerator.is_main_process, desc=desc,
               dynamic_ncols=True)
    return tracker, bar


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def end_step(cfg, step: int, metrics: dict[str, float], tracker: Tracker, *,
             evaluate: Callable[[], dict[str, float]] | None, save: Callable[[], object]) -> None:
    """The tail of every stage's step: held-out evaluation (`eval.every` and the last step; `evaluate`
    None: no held-out data), logging (`train.log_every`, the last step and every evaluation), and a
    checkpoint (`train.save_every` and the last step). `metrics` gains the evaluation's keys."""
    last = step == cfg.train.max_steps
    if evaluate is not None and (last or _due(cfg.eval.every, step)):
        metrics.update(evaluate())
    if step % cfg.train.log_every == 0 or last or any(k.startswith("eval") for k in metrics):
        tracker.log(metrics, step)
    if last or _due(cfg.train.save_every, step):
        save()


def close_run(accelerator: Accelerator, tracker: Tracker, bar: tqdm) -> None:
    bar.close()
    tracker.close()
    if accelerator.num_processes > 1:
        # the process group accelerate set up; one process has none of its own, and a group found there
        # belongs to someone else (a colocated vLLM engine's), which must outlive the run
        accelerator.end_training()
