"""Verifiable rewards (docs/design.md §5), a registry by name, and plug-in user functions.

A reward function scores a batch: `fn(responses: list[str], examples: list[Example]) -> list[float]`.
Built in:

    accuracy   1 if the <answer> text matches the example's ground truth, else 0
    format     1 if the response is format-valid (docs/design.md §2), else 0

A config combines them with weights, `{"accuracy": 0.8, "format": 0.2}` being PRISM's default
(r = 0.8·accuracy + 0.2·format). A key of the form `module.path:function` imports a user function
with the same signature. Model output is only ever parsed, never evaluated.

Answer matching, cheapest first: normalised string equality (case, whitespace, a trailing period,
surrounding $ or \\boxed{}), multiple-choice letters ("B", "(B)", "B. text"), numbers ("3", "3.0",
"1,000"), then math-verify (LaTeX / symbolic equivalence such as 1/2 = 0.5 = \\frac{1}{2}) under a
timeout.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import Callable, Mapping, Sequence

import torch

from prism.core.config import ConfigError
from prism.core.errors import RunError
from prism.core.example import Example
from prism.core.response import is_format_valid, parse_response

log = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[str], Sequence[Example]], Sequence[float]]
REWARDS: dict[str, RewardFn] = {}
DEFAULT_REWARD = {"accuracy": 0.8, "format": 0.2}
MATH_VERIFY_TIMEOUT_S = 3


def register_reward(name: str):
    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return wrap


# ------------------------------------------------------------------------------ answer matching

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_CHOICE = re.compile(r"^\(?([a-z])\)?(?:[.):]\s.*|[.)])?$", re.DOTALL)


def normalize_answer(text: str) -> str:
    s = text.strip()
    s = s.strip("$").strip()
    if m := _BOXED.match(s):
        s = m.group(1)
    s = re.sub(r"\s+", " ", s.strip().rstrip(".").strip().lower())
    return s


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", "")) if re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?", s) else None
    except ValueError:
        return None


def _math_verify(predicted: str, truth: str) -> bool:
    try:
        from math_verify import parse, verify

        gold = parse(f"${truth}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        pred = parse(f"${predicted}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=MATH_VERIFY_TIMEOUT_S))
    except Exception as e:  # a verifier failure (timeout, parser error) is a wrong answer, not a crash
        log.debug("math-verify failed on %r vs %r: %s", predicted, truth, e)
        return False


def answer_correct(predicted: str | None, truth: str | None) -> bool:
    """Does the predicted final answer match the ground truth? (see module doc for the order)"""
    if predicted is None or truth is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(truth)
    if not a:
        return False
    if a == b:
        return True
    mb = _CHOICE.fullmatch(b)
    if mb and len(b) <= 3:  # the truth is a bare choice letter: compare the predicted letter
        ma = _CHOICE.fullmatch(a)
        return bool(ma) and ma.group(1) == mb.group(1)
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return abs(na - nb) <= 1e-6 * max(1.0, abs(nb))
    if re.fullmatch(r"[a-z ]+", a) and re.fullmatch(r"[a-z ]+", b):
        return False  # two different words: nothing symbolic to compare
    return _math_verify(a, b)


# ------------------------------------------------------------------------------ built-in rewards


@register_reward("accuracy")
def accuracy_reward(responses: Sequence[str], examples: Sequence[Example]) -> list[float]:
    return [float(answer_correct(parse_response(r).answer, ex.answer)) for r, ex in zip(responses, examples)]


@register_reward("format")
def format_reward(responses: Sequence[str], examples: Sequence[Example]) -> list[float]:
    return [float(is_format_valid(r)) for r in responses]


# ------------------------------------------------------------------------------ combination


def resolve_reward(name: str) -> RewardFn:
    """A registered name, or `module.path:function` imported from the Python path."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"reward.functions: unknown reward {name!r}; use one of {', '.join(REWARDS)} "
                         "or module.path:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot import {name!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward.functions: {name!r} is not callable")
    return fn


class RewardModel:
    """Weighted sum of named reward functions: r = Σ_k w_k · f_k(responses, examples)."""

    def __init__(self, weights: Mapping[str, float] = DEFAULT_REWARD):
        if not weights:
            raise ConfigError("reward.functions: at least one reward function is needed")
        self.weights = dict(weights)
        self.fns = {name: resolve_reward(name) for name in self.weights}

    def __call__(self, responses: Sequence[str], examples: Sequence[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total [N], {name: [N]} per component before weighting)."""
        parts = {}
        for name, fn in self.fns.items():
            values = list(fn(responses, examples))
            if len(values) != len(responses):
                raise RunError(f"reward.functions: {name!r} returned {len(values)} scores for {len(responses)} "
                               "responses; it must return one per response")
            try:
                parts[name] = torch.tensor(values, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise RunError(f"reward.functions: {name!r} returned scores that are not numbers ({e})") from None
            bad = (~torch.isfinite(parts[name])).nonzero().flatten().tolist()
            if bad:
                raise RunError(f"reward.functions: {name!r} returned {parts[name][bad[0]].item()} for {len(bad)} of "
                               f"{len(values)} responses (first: {examples[bad[0]].source}); rewards must be finite")
        total = sum(self.weights[n] * v for n, v in parts.items())
        return total, parts


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (docs/design.md §5): min(−(len − (L_max − L_buf)) / L_buf · factor, 0).

    lengths: [N] response lengths in tokens. Returns [N] (≤ 0) to add to the rewards; 0 when buffer is 0.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    excess = lengths.float() - (max_len - buffer)
    return (-excess / buffer * factor).clamp(max=0.0)
