"""Held-out metrics of generated responses: answer accuracy, format validity, caption match.

Answer comparison here is the plain normalised one (case, whitespace, trailing period, numeric
value). The RL issue's math-aware `accuracy` reward will replace `answers_match` so that
evaluation and reward agree.
"""

from __future__ import annotations

import re
from typing import Sequence

from prism.data.example import Example
from prism.response import parse_response


def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip().lower())


def answers_match(predicted: str | None, truth: str | None) -> bool:
    if predicted is None or truth is None:
        return False
    a, b = _normalise(predicted), _normalise(truth)
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def score_responses(examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
    """Mean metrics over examples; `caption_match` only over examples with a ground-truth scene."""
    from prism.data.synthetic import caption_matches_scene

    n = len(examples)
    if n == 0:
        return {}
    correct = valid = with_scene = caption_ok = 0
    for ex, text in zip(examples, responses):
        parsed = parse_response(text)
        valid += parsed.valid
        correct += answers_match(parsed.answer, ex.answer)
        if "scene" in ex.meta:
            with_scene += 1
            caption_ok += parsed.caption is not None and caption_matches_scene(parsed.caption, ex.meta["scene"])
    metrics = {"accuracy": correct / n, "format_rate": valid / n, "n": float(n)}
    if with_scene:
        metrics["caption_match"] = caption_ok / with_scene
    return metrics
