"""Collapse watch of the discriminator: signs that it stopped playing, over the last
`discriminator.collapse_window` steps of the game.

- **pinned**: at least 90 % of its scores sit at ±`score_clip` (`score/pinned`) at every step: the heads
  saturated, the scores no longer rank rollouts;
- **frozen**: its loss (`disc/loss`) did not move (|Δ| < 1e-7) from step to step: no gradient reaches it;
- **inverted**: an expert's pairwise accuracy (`disc/<expert>/acc`) was 0 at every step: it prefers every
  rollout to the teacher reference.

A healthy game shows none of these for long (the discriminator winning, accuracy near 1, is not a
collapse: that is what an early game looks like). Each sign is logged once as a warning naming the
settings at fault; with `discriminator.stop_on_collapse` the run stops instead, before the step is
saved (`DivergenceError`). The window is refilled from metrics.jsonl on resume, so a resumed run sees
the same signs at the same steps.
"""

from __future__ import annotations

import logging
from collections import deque

from prism.align.losses import COMPONENTS
from prism.core.errors import DivergenceError

log = logging.getLogger("prism.align")

PINNED_FRACTION = 0.9
FROZEN_DELTA = 1e-7


class CollapseWatch:
    def __init__(self, window: int, stop: bool, lr: float, history: list[dict] = ()):
        self.window, self.stop, self.lr = window, stop, lr
        self.rows: deque[dict] = deque(maxlen=max(window, 1))
        self.warned: set[str] = set()
        for row in history:
            self.rows.append(row)

    def signs(self) -> dict[str, str]:
        """{sign: what was seen} over a full window (empty before `window` steps or when off)."""
        rows = list(self.rows)
        if not self.window or len(rows) < self.window:
            return {}
        found = {}
        pinned = [r.get("score/pinned") for r in rows]
        if all(p is not None and p >= PINNED_FRACTION for p in pinned):
            found["pinned"] = f"{min(pinned):.0%}+ of its scores sat at ±score_clip"
        losses = [r.get("disc/loss") for r in rows]
        if all(x is not None for x in losses) and all(abs(a - b) < FROZEN_DELTA for a, b in zip(losses, losses[1:])):
            found["frozen"] = f"its loss stayed at {losses[-1]:.6g}"
        for e in COMPONENTS:
            acc = [r.get(f"disc/{e}/acc") for r in rows]
            if all(a is not None and a == 0 for a in acc):
                found[f"inverted/{e}"] = f"the {e} expert ranked every rollout above the teacher"
        return found

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Add this step's metrics; warn (or stop) on a sign of collapse over the window."""
        if not self.window:
            return
        self.rows.append(metrics)
        found = self.signs()
        if not found:
            return
        what = "; ".join(found.values())
        message = (f"step {step}: the discriminator looks collapsed over the last {self.window} steps: {what} "
                   f"(check discriminator.lr, now {self.lr:g}, and discriminator.reg)")
        if self.stop:
            raise DivergenceError(message)
        new = set(found) - self.warned
        if new:
            self.warned |= new
            log.warning("%s; set discriminator.stop_on_collapse=true to stop such a run", message)
