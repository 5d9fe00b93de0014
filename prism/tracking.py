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


class Tracker:
    def __init__(self, output_dir: str | Path, settings: LoggingSettings, config: dict[str, Any],
                 enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
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
