"""Paired seed differences and their bootstrap interval (prism.eval.stats) against hand-computed values."""

from __future__ import annotations

import pytest

from prism.eval.stats import bootstrap_interval, paired_differences, verdict


def test_paired_differences_pair_by_seed():
    a = {0: 60.0, 1: 58.0, 2: 70.0}
    b = {1: 58.5, 0: 63.0, 3: 99.0}  # seed 2 and 3 have no partner
    assert paired_differences(a, b) == [3.0, 0.5]
    with pytest.raises(ValueError, match="no seed is shared"):
        paired_differences({0: 1.0}, {1: 2.0})


def test_bootstrap_interval_by_hand():
    # Two seeds with differences 1 and 3: a resample's mean is 1 (both draws 1, p = 1/4), 2 (p = 1/2) or
    # 3 (p = 1/4), so the 2.5 % and 97.5 % points are 1 and 3; the mean is 2; the interval excludes 0.
    assert bootstrap_interval([1.0, 3.0]) == (2.0, 1.0, 3.0)
    # −1 and 3: resampled means −1, 1, 3: the interval [−1, 3] contains 0
    assert bootstrap_interval([-1.0, 3.0]) == (1.0, -1.0, 3.0)
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)  # no spread, no width
    mean, low, high = bootstrap_interval([0.5, 1.5, 1.0, 2.0, 1.0], n_boot=20_000)
    assert mean == pytest.approx(1.2) and 0.5 < low < mean < high < 2.0
    assert bootstrap_interval([0.5, 1.5, 1.0], seed=3) == bootstrap_interval([0.5, 1.5, 1.0], seed=3)
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_interval([1.0], level=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_verdict_reads_the_interval():
    assert verdict(*bootstrap_interval([1.0, 3.0])[1:]) == "better"
    assert verdict(*bootstrap_interval([-3.0, -1.0])[1:]) == "worse"
    assert verdict(*bootstrap_interval([-1.0, 3.0])[1:]) == "not distinguishable"
    assert verdict(0.0, 2.0) == "not distinguishable"  # an interval touching 0 does not decide
