"""prism's errors. Each message is one line that names the file, config key or step at fault; the
console scripts print it without a traceback (`prism.cli`): input errors exit 2, runs that cannot
go on exit 1."""

from __future__ import annotations

import math
from pathlib import Path


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line naming the file and key."""


class DataError(ValueError):
    """A bad input file or example; the message is one line naming the file (and line)."""


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


class NonFiniteLossError(RunError):
    """A NaN/inf loss or gradient: the run stops without saving, keeping the last good checkpoint."""


def check_finite(step: int, out: str | Path, **values: float) -> None:
    """Raise NonFiniteLossError naming every non-finite value of `values` (e.g. loss=..., grad_norm=...)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteLossError(f"non-finite {what} at step {step}; stopping without saving — the last good "
                                 f"checkpoint in {out} is kept (try a lower optim.lr)")
