"""Layer 6 — metric logs shared by every stage: JSONL always, TensorBoard and wandb when configured,
and the readers of a run's metrics.jsonl.

Only the main process logs. wandb runs offline when no WANDB_API_KEY is set (and WANDB_MODE is
not set), so a configured project never blocks a run on a machine without network access.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prism.core.config import LoggingSettings
from prism.core.files import write_atomic

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Appends one row per logged step to OUTPUT_DIR/metrics.jsonl (and TensorBoard / wandb).

    A run that (re)starts at step `start` first drops the rows of later steps (a resumed run logs
    them again; a fresh run, start 0, keeps none), so every step appears once."""

    def __init__(self, output_dir: str | Path, settings: LoggingSettings, config: dict[str, Any],
                 enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out, start)
        self.jsonl = open(out / METRICS_FILE, "a", buffering=1)
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events of steps > start are purged (all of them for a fresh start)
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else 0)
        if settings.wandb_project:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(project=settings.wandb_project, name=settings.run_name,
                                    dir=str(out), config=config, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] without one; a last line cut short by a kill is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    rows = [json.loads(x) for x in lines[:-1]]
    try:
        rows += [json.loads(x) for x in lines[-1:]]
    except ValueError:  # written when the process was killed
        pass
    return rows


def truncate_metrics(run_dir: Path, start: int) -> None:
    """Keep the metrics.jsonl rows of steps <= `start` (none when `start` is 0), atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [r for r in metric_rows(run_dir) if start and r.get("step", 0) <= start]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


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
