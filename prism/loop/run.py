"""What every stage's loop does around its own step: set up the run, load the held-out data, open
the logs, and end each step the same way (evaluate, log, save on schedule).

    accelerator, out = setup_run(cfg)
    ...
    tracker, bar = open_logs(cfg, accelerator, out, start, "sft")
    for step in range(start + 1, cfg.train.max_steps + 1):
        metrics = ...                                                   # the stage's own step
        end_step(cfg, step, metrics, tracker, evaluate=..., save=...)   # evaluate / log / save
        bar.update(1)
    close_run(accelerator, tracker, bar)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from prism.core.config import save_config
from prism.core.errors import ConfigError, DataError
from prism.core.example import Example
from prism.data.formats import load_examples
from prism.dist.accelerator import make_accelerator
from prism.tracking import Tracker


def setup_run(cfg) -> tuple[Accelerator, Path]:
    """Accelerator (CPU unless a GPU is visible and not disabled), seeds, output dir + resolved config."""
    for key, value in (("model.path", cfg.model.path), ("data.train", cfg.data.train)):
        if not value:
            raise ConfigError(f"{key}: not set (it has no default); set it in the config or as {key}=...")
    accelerator = make_accelerator(cpu=cfg.train.cpu)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return accelerator, out


def load_eval_data(cfg) -> list[Example]:
    """The held-out examples (`data.eval`, at most `data.eval_limit`), each with an answer; [] without."""
    if not cfg.data.eval:
        return []
    return load_examples(cfg.data.eval, cfg.data.format, require_answer=True, skip_bad=cfg.data.skip_bad,
                         limit=cfg.data.eval_limit)


def check_enough(cfg, n: int, per_process: int, key: str, world: int, what: str = "prompts") -> None:
    """Stop with a one-line error when the data cannot fill one global batch."""
    if n < per_process * world:
        raise DataError(f"{cfg.data.train}: {n} {what}, fewer than one batch ({key}={per_process} x {world} processes)")


def open_logs(cfg, accelerator: Accelerator, out: Path, start: int, desc: str) -> tuple[Tracker, tqdm]:
    """The metric logs (main process only) and the progress bar, continuing at `start`."""
    tracker = Tracker(out, cfg.logging, cfg.model_dump(mode="json"), enabled=accelerator.is_main_process)
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
    accelerator.end_training()
