"""Held-out metrics of generated responses: answer accuracy, format validity, and — on data with a
ground-truth scene — perception accuracy, reasoning accuracy given correct perception, and the
split of the errors into format / perception / reasoning.

Answers are compared with `prism.rewards.answer_correct`, the same check the `accuracy` reward
uses, so evaluation and RL agree on what counts as correct.

Error split (fractions of all responses; with `accuracy` they sum to 1):
    error/format       wrong answer, response not format-valid
    error/perception   wrong answer, valid, caption disagrees with the scene
    error/reasoning    wrong answer, valid, caption matches the scene
(on examples without a scene, a valid wrong answer counts as reasoning.)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from prism.data.example import Example
from prism.response import parse_response
from prism.rewards import answer_correct


def score_responses(examples: Sequence[Example], responses: Sequence[str]) -> dict[str, float]:
    """Mean metrics over examples (see module doc); `acc/<type>` per `question_type` and `acc/<g>x<g>`
    per grid size when the examples carry them."""
    from prism.data.synthetic import caption_matches_scene

    n = len(examples)
    if n == 0:
        return {}
    counts: dict[str, float] = defaultdict(float)
    per_type: dict[str, list[bool]] = defaultdict(list)
    for ex, text in zip(examples, responses):
        parsed = parse_response(text)
        correct = answer_correct(parsed.answer, ex.answer)
        counts["correct"] += correct
        counts["valid"] += parsed.valid
        seen_right = None
        if "scene" in ex.meta:
            seen_right = parsed.caption is not None and caption_matches_scene(parsed.caption, ex.meta["scene"])
            counts["with_scene"] += 1
            counts["caption_ok"] += seen_right
            counts["correct_given_caption_ok"] += seen_right and correct
        if not correct:
            kind = "format" if not parsed.valid else "perception" if seen_right is False else "reasoning"
            counts[f"error_{kind}"] += 1
        if "question_type" in ex.meta:
            per_type[ex.meta["question_type"]].append(correct)
        if "grid" in ex.meta:
            per_type[f"{ex.meta['grid']}x{ex.meta['grid']}"].append(correct)
    metrics = {"accuracy": counts["correct"] / n, "format_rate": counts["valid"] / n, "n": float(n)}
    for kind in ("format", "perception", "reasoning"):
        metrics[f"error/{kind}"] = counts[f"error_{kind}"] / n
    if counts["with_scene"]:
        metrics["caption_match"] = counts["caption_ok"] / counts["with_scene"]
        if counts["caption_ok"]:
            metrics["reasoning_given_perception"] = counts["correct_given_caption_ok"] / counts["caption_ok"]
    for qtype, hits in sorted(per_type.items()):
        metrics[f"acc/{qtype}"] = sum(hits) / len(hits)
    return metrics
