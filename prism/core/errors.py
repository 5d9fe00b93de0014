"""prism's errors. Each message is one line that names the file, config key or step at fault; the
console scripts print it without a traceback (`prism.cli`): input errors exit 2, runs that cannot
go on exit 1."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line naming the file and key."""


class DataError(ValueError):
    """A bad input file or example; the message is one line naming the file (and line)."""


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


class TrainingStopped(RunError):
    """A step that went wrong (a NaN, a blown-up update): the run stops before the step's state is saved.
    The stage's `train` adds which checkpoint is the last good one (`prism.loop.run.names_last_checkpoint`)."""


class NonFiniteLossError(TrainingStopped):
    """A NaN/inf loss, gradient or parameter."""


class DivergenceError(TrainingStopped):
    """A finite update that blew up (`optim.max_param_change`), or a player that collapsed."""


def check_finite(step: int | str, hint: str, **values: float) -> None:
    """Raise NonFiniteLossError naming every non-finite value of `values` (e.g. loss=..., grad_norm=...);
    `hint` is the setting most likely at fault, e.g. "optim.lr (now 0.001)"."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        where = f"step {step}" if isinstance(step, int) else step
        raise NonFiniteLossError(f"non-finite {what} at {where} (check {hint})")
