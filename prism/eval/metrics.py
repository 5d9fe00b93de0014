"""Held-out metrics of generated responses: answer accuracy, format validity, and — with a task that
can check captions (`prism.core.task.Task`) — perception accuracy, reasoning accuracy given correct
perception, and the split of the errors into format / perception / reasoning.

Answers are read and compared as the `accuracy` reward does, so evaluation and RL agree on what counts
as correct: the response's answer under `answer_format` (`prism.core.response.extract_answer`: the
<answer> tag, the last \\boxed{…}, or either; RL's held-out evaluation uses `reward.answer_format`,
SFT's and ALIGN's `answer`, prism-eval `--answer-format`) must match (`prism.rewards.answer_matches`)
any of the example's ground truths (`ground_truths`): its answer and equivalent answers or, for an
example without an answer, the answer of its reference (assistant) turn. Format validity follows the
answer format too (`prism.core.response.answer_format_valid`).

Error split (fractions of all responses; with `accuracy` they sum to 1):
    error/format       wrong answer, response not format-valid
    error/perception   wrong answer, valid, caption disagrees with the scene
    error/reasoning    wrong answer, valid, caption matches the scene
(without a task, or on examples it has no ground truth for, a valid wrong answer counts as reasoning.)

With a task that names what is wrong with a caption (optional `caption_errors`, `prism.core.task`),
`caption_error/<kind>` is the fraction of checked captions with that kind of error, whatever the answer
(a caption can have several: the grids task's `colour` and `layout` are measured each on its own).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Sequence

from prism.core.errors import DataError
from prism.core.example import Example
from prism.core.response import (
    answer_format_valid,
    check_answer_format,
    extract_answer,
    parse_response,
)
from prism.core.task import Task
from prism.rewards import answer_matches


def ground_truths(example: Example, answer_format: str = "answer") -> list[str]:
    """The accepted answers of an example: `example.answers` (answer + equivalent answers) or, when it
    has none, the answer of its reference response (final assistant turn) under `answer_format`; []
    when neither gives one."""
    if example.answers:
        return example.answers
    reference = extract_answer(example.response, answer_format) if example.response else None
    return [reference] if reference else []


def with_ground_truths(examples: Sequence[Example], answer_format: str = "answer", skip_bad: bool = False,
                       origin: str = "data.eval") -> list[Example]:
    """The examples that have a ground truth (`ground_truths`) for evaluation. One without is a one-line
    DataError naming it, or with skip_bad is dropped (one warning)."""
    check_answer_format(answer_format)
    kept = [ex for ex in examples if ground_truths(ex, answer_format)]
    if len(kept) < len(examples):
        bad = next(ex for ex in examples if not ground_truths(ex, answer_format))
        reason = (f"{bad.source}: no answer (no answer key, and no reference response with an "
                  f"{'<answer>' if answer_format == 'answer' else answer_format} answer)")
        if not skip_bad:
            raise DataError(reason)
        warnings.warn(f"{origin}: skipped {len(examples) - len(kept)} example(s) without an answer; first: {reason}",
                      stacklevel=2)
    if not kept:
        raise DataError(f"{origin}: no examples with an answer to evaluate against")
    return kept


def score_responses(examples: Sequence[Example], responses: Sequence[str], task: Task | None = None,
                    answer_format: str = "answer") -> dict[str, float]:
    """Mean metrics over examples (see module doc); with a task, `acc/<group>` for each of its groups."""
    check_answer_format(answer_format)
    n = len(examples)
    if n == 0:
        return {}
    counts: dict[str, float] = defaultdict(float)
    per_type: dict[str, list[bool]] = defaultdict(list)
    caption_errors = getattr(task, "caption_errors", None)
    for ex, text in zip(examples, responses):
        parsed = parse_response(text)
        valid = answer_format_valid(text, answer_format)
        correct = answer_matches(extract_answer(text, answer_format), ground_truths(ex, answer_format))
        counts["correct"] += correct
        counts["valid"] += valid
        seen_right = task.caption_correct(parsed.caption, ex) if task is not None else None
        if seen_right is not None:
            counts["caption_checked"] += 1
            counts["caption_ok"] += seen_right
            counts["correct_given_caption_ok"] += seen_right and correct
            for kind in (caption_errors(parsed.caption, ex) or []) if caption_errors and not seen_right else ():
                counts[f"caption_kind/{kind}"] += 1
        if not correct:
            kind = "format" if not valid else "perception" if seen_right is False else "reasoning"
            counts[f"error_{kind}"] += 1
        for group in task.groups(ex) if task is not None else ():
            per_type[group].append(correct)
    metrics = {"accuracy": counts["correct"] / n, "format_rate": counts["valid"] / n, "n": float(n)}
    for kind in ("format", "perception", "reasoning"):
        metrics[f"error/{kind}"] = counts[f"error_{kind}"] / n
    if counts["caption_checked"]:
        metrics["caption_match"] = counts["caption_ok"] / counts["caption_checked"]
        for key in sorted(k for k in counts if k.startswith("caption_kind/")):
            metrics["caption_error/" + key.partition("/")[2]] = counts[key] / counts["caption_checked"]
        if counts["caption_ok"]:
            metrics["reasoning_given_perception"] = counts["correct_given_caption_ok"] / counts["caption_ok"]
    for qtype, hits in sorted(per_type.items()):
        metrics[f"acc/{qtype}"] = sum(hits) / len(hits)
    return metrics
