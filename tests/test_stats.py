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


def test_the_results_page_compares_rows_seed_by_seed():
    from prism.report import paired

    def row(greedy: dict[int, float], sampled: dict[int, float]) -> dict:
        return {str(s): {"greedy": {"accuracy": greedy[s]}, "sampled": {"accuracy": sampled[s]}} for s in greedy}

    results = {"config": {"algos": ["grpo"]}, "rows": {
        "SFT": row({0: 0.50, 1: 0.50, 2: 0.50}, {0: 0.4, 1: 0.4, 2: 0.4}),
        "SFT→grpo": row({0: 0.50, 1: 0.60, 2: 0.55}, {0: 0.50, 1: 0.50, 2: 0.50}),
        "PRISM+grpo": row({0: 0.55, 1: 0.62, 2: 0.60}, {0: 0.49, 1: 0.52, 2: 0.50}),
        "PRISM": row({0: 0.50, 1: 0.50, 2: 0.50}, {0: 0.4, 1: 0.4, 2: 0.4}),
        "PRISM[text_only]": row({0: 0.48, 1: 0.47, 2: 0.49}, {0: 0.4, 1: 0.4, 2: 0.4}),
    }}
    table = "\n".join(paired(results))
    # PRISM+grpo − SFT→grpo, greedy: 5, 2, 5 points, mean 4; the 3^3 resamples have means from 2 (all 2s,
    # p = 1/27 > 2.5 %) to 5 (p = 8/27): [2, 5], above 0. Sampled: −1, +2, 0: mean 0.3, interval spans 0.
    assert "| PRISM+grpo − SFT→grpo | 3 | +4.0 [+2.0, +5.0] | better | +0.3 [-1.0, +2.0] | not distinguishable |" \
        in table
    assert "| PRISM − SFT | 3 | +0.0 [+0.0, +0.0] | not distinguishable |" in table
    assert "| PRISM[text_only] − PRISM | 3 | -2.0 [-3.0, -1.0] | worse |" in table


def test_error_rates_are_better_when_lower_and_the_reading_says_so():
    from prism.report import DRIFTS, PROBE, paired, reading, summarise

    def row(layout: dict[int, float], probe: dict[int, float] | None = None) -> dict:
        return {str(s): {"greedy": {"accuracy": 0.5, "caption_error/layout": layout[s]},
                         **({"probe": {"layout/perception": probe[s]}} if probe else {})} for s in layout}

    results = {"config": {"algos": []}, "rows": {
        "SFT": row({0: 0.60, 1: 0.50, 2: 0.70}),
        "PRISM": row({0: 0.40, 1: 0.40, 2: 0.50}, {0: 0.9, 1: 0.8, 2: 0.85}),
        "PRISM[text_only]": row({0: 0.60, 1: 0.50, 2: 0.70}, {0: 0.5, 1: 0.5, 2: 0.55}),
    }}
    results["summary"] = summarise(results["rows"])
    table = "\n".join(paired(results, DRIFTS[1:2]))
    # PRISM − SFT: −20, −10, −20 points of layout errors: interval [−20, −10], below 0: fewer errors, better
    assert "| PRISM − SFT | 3 | -16.7 [-20.0, -10.0] | better |" in table
    assert "| PRISM[text_only] − PRISM | 3 | +16.7 [+10.0, +20.0] | worse |" in table
    probe = "\n".join(paired(results, PROBE, pairs=[("PRISM[text_only]", "PRISM")]))
    assert "| PRISM[text_only] − PRISM | 3 | -33.3 [-40.0, -30.0] | worse |" in probe
    from prism.report import probe_section

    probes = "\n".join(probe_section(results))
    # PRISM: 90, 80, 85 -> +40, +30, +35 above 50; text_only: 50, 50, 55 -> 0, 0, +5: the interval [0, +5] touches 0
    assert "- PRISM: layout perception +35.0 [+30.0, +40.0] above chance." in probes
    assert "- PRISM[text_only]: layout perception +1.7 [+0.0, +5.0] at chance." in probes
    text = "\n".join(reading(results))
    assert "PRISM vs SFT (paired difference in points, 95% interval): greedy 50.0% vs 50.0%, +0.0 [+0.0, +0.0] " \
           "**not distinguishable**; layout-caption errors 43.3% vs 60.0%, -16.7 [-20.0, -10.0] **better**." in text
    assert "Discriminators, PRISM[text_only] vs PRISM, pairwise accuracy on caption-only negatives: perception " \
           "expert, layout negatives 51.7% vs 85.0%, -33.3 [-40.0, -30.0] **worse**." in text
