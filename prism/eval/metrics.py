"""Held-out metrics of generated responses: answer accuracy, format validity, and — with a task that
can check captions (`prism.core.task.Task`) — perception accuracy, reasoning accuracy given correct
perception, and the split of the errors into format / perception / reasoning.

Answers are compared with `prism.rewards.answer_correct`, the same check the `accuracy` reward
uses, so evaluation and RL agree on what counts as correct.

Error split (fractions of all responses; with `accuracy` they sum to 1):
    error/format       wrong answer, response not format-valid
    error/perception   wrong answer, valid, caption disagrees with the scene
    error/reasoning    wrong answer, valid, caption matches the scene
(without a task, or on examples it has no ground truth for, a valid wrong answer counts as reasoning.)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from prism.core.example import Example
from prism.core.response import parse_response
from prism.core.task import Task
from prism.rewards import answer_correct


def score_responses(examples: Sequence[Example], responses: Sequence[str], task: Task | None = None) -> dict[str, float]:
    """Mean metrics over examples (see module doc); with a task, `acc/<group>` for each of its groups."""
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
        seen_right = task.caption_correct(parsed.caption, ex) if task is not None else None
        if seen_right is not None:
            counts["caption_checked"] += 1
            counts["caption_ok"] += seen_right
            counts["correct_given_caption_ok"] += seen_right and correct
        if not correct:
            kind = "format" if not parsed.valid else "perception" if seen_right is False else "reasoning"
            counts[f"error_{kind}"] += 1
        for group in task.groups(ex) if task is not None else ():
            per_type[group].append(correct)
    metrics = {"accuracy": counts["correct"] / n, "format_rate": counts["valid"] / n, "n": float(n)}
    for kind in ("format", "perception", "reasoning"):
        metrics[f"error/{kind}"] = counts[f"error_{kind}"] / n
    if counts["caption_checked"]:
        metrics["caption_match"] = counts["caption_ok"] / counts["caption_checked"]
        if counts["caption_ok"]:
            metrics["reasoning_given_perception"] = counts["correct_given_caption_ok"] / counts["caption_ok"]
    for qtype, hits in sorted(per_type.items()):
        metrics[f"acc/{qtype}"] = sum(hits) / len(hits)
    return metrics
