"""Paired comparisons of two training branches over seeds, decided by a bootstrap interval.

    diffs = paired_differences({0: 61.0, 1: 58.5, ...}, {0: 64.5, 1: 60.0, ...})   # B − A per seed
    mean, low, high = bootstrap_interval(diffs, level=0.95)
    verdict(low, high)                     # "better" | "worse" | "not distinguishable"

Each seed's two branches share that seed's SFT checkpoint and test questions, so the seed-to-seed
spread (which SFT checkpoint, which data order) cancels in the per-seed difference d_s = B_s − A_s;
the comparison is about mean(d), not about two separate means.

The interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the S
differences with replacement `n_boot` times, take each resample's mean, and report the (1 − level)/2
and (1 + level)/2 quantiles of those means (the "lower" / "higher" order statistics, no
interpolation, so a small S gives values that occur in the resampled means). With few seeds the
interval is narrow-biased; the page reports S next to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """b[s] − a[s] for every seed s that both branches have, in seed order."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed is shared by the two branches: nothing to pair")
    return [float(b[s]) - float(a[s]) for s in seeds]


def bootstrap_interval(diffs: Sequence[float], level: float = 0.95, n_boot: int = 10_000, seed: int = 0
                       ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `diffs` [S] and its percentile-bootstrap `level` interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(diffs, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"diffs must be a non-empty list of numbers, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    low = float(np.quantile(means, (1 - level) / 2, method="lower"))
    high = float(np.quantile(means, (1 + level) / 2, method="higher"))
    return float(values.mean()), low, high


def verdict(low: float, high: float) -> str:
    """"better" when the whole interval is above 0, "worse" when below, else "not distinguishable"."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable"
