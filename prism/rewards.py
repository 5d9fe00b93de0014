"""Verifiable rewards (docs/design.md §5), a registry by name, and plug-in user functions.

A reward function scores a batch: `fn(responses: list[str], examples: list[Example]) -> list[float]`.
Built in:

    accuracy   1 if the extracted answer matches any of the example's ground truths (`Example.answers`:
               the answer and its `equivalent_answers`), else 0
    format     1 if the response is format-valid under the answer format, else 0

Where the answer is read from is `reward.answer_format` (`prism.core.response.extract_answer`):
`answer` (the <answer> tag, PRISM's default), `boxed` (the last `\\boxed{…}`, as verl's math and geo3k
prompts ask for) or `either` (the tag if present, else the last box). The format reward follows it:
PRISM's full caption/think/answer format for `answer`; exactly one complete, non-empty `\\boxed{…}`
for `boxed` (no tags demanded); either of the two for `either`. A function (built in or plug-in) that
has a parameter named `answer_format` gets the setting passed by `RewardModel`; one without it is
called as `fn(responses, examples)`. Held-out evaluation reads answers the same way.

A config combines functions with weights, `{"accuracy": 0.8, "format": 0.2}` being PRISM's default
(r = 0.8·accuracy + 0.2·format). A key of the form `module.path:function` imports a user function,
either with the batch signature above or with verl's per-response one, recognised by its parameter
names:

    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | {"score": float, ...}

called once per response with (example.data_source, the response, example.answer as stored,
example.meta.get("extra_info")). `reward.by_data_source` maps a data source to its own weights (same
syntax); rows of other sources use `reward.functions`, and a batch mixing sources is scored group by
group. Model output is only ever parsed, never evaluated.

Answer matching, cheapest first: normalised string equality (case, whitespace, a trailing period,
surrounding $ or \\boxed{}), multiple-choice letters ("B", "(B)", "B. text"), numbers ("3", "3.0",
"1,000"), then math-verify (LaTeX / symbolic equivalence such as 1/2 = 0.5 = \\frac{1}{2}) under a
timeout.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from typing import Any, Callable, Mapping, Sequence

import torch

from prism.core.config import ConfigError
from prism.core.errors import RunError
from prism.core.example import Example
from prism.core.response import answer_format_valid, check_answer_format, extract_answer

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


def answer_matches(predicted: str | None, truths: str | Sequence[str] | None) -> bool:
    """Any-of matching: does `predicted` match (`answer_correct`) any of the ground truths?"""
    if truths is None or isinstance(truths, str):
        return answer_correct(predicted, truths)
    return any(answer_correct(predicted, str(t)) for t in truths)


# ------------------------------------------------------------------------------ built-in rewards


@register_reward("accuracy")
def accuracy_reward(responses: Sequence[str], examples: Sequence[Example],
                    answer_format: str = "answer") -> list[float]:
    """1 where the response's answer (under `answer_format`) matches any of `example.answers`."""
    return [float(answer_matches(extract_answer(r, answer_format), ex.answers)) for r, ex in zip(responses, examples)]


@register_reward("format")
def format_reward(responses: Sequence[str], examples: Sequence[Example],
                  answer_format: str = "answer") -> list[float]:
    """1 where the response is format-valid under `answer_format` (module doc)."""
    return [float(answer_format_valid(r, answer_format)) for r in responses]


# ------------------------------------------------------------------------------ combination


def resolve_reward(name: str, key: str = "reward.functions") -> RewardFn:
    """A registered name, or `module.path:function` imported from the Python path."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"{key}: unknown reward {name!r}; use one of {', '.join(REWARDS)} "
                         "or module.path:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {name!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {name!r} is not callable")
    return fn


VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the batch convention
        return {}


def is_verl_reward(fn: Callable) -> bool:
    """Does `fn` have verl's per-response signature compute_score(data_source, solution_str, ground_truth, ...)?"""
    return all(p in _parameters(fn) for p in VERL_PARAMS)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0]}" if text else e.__class__.__name__


def _verl_batch(fn: Callable, name: str, key: str) -> RewardFn:
    """A batch reward that calls verl-style `fn` once per response (module doc)."""
    params = _parameters(fn)
    pass_extra = "extra_info" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def batch(responses: Sequence[str], examples: Sequence[Example]) -> list[float]:
        scores = []
        for text, ex in zip(responses, examples):
            kw: dict[str, Any] = {"data_source": ex.data_source, "solution_str": text, "ground_truth": ex.answer}
            if pass_extra:
                kw["extra_info"] = ex.meta.get("extra_info")
            try:
                out = fn(**kw)
            except Exception as e:  # noqa: BLE001 - a user function's failure becomes a one-line error
                raise RunError(f"{key}: {name!r} raised {_one_line(e)} on {ex.source}") from None
            value = out.get("score") if isinstance(out, dict) else out
            try:
                if value is None or isinstance(value, (str, bytes)):
                    raise TypeError
                value = float(value)
            except (TypeError, ValueError):
                got = ("a dict without a numeric 'score'" if isinstance(out, dict)
                       else f"{type(out).__name__} {out!r}"[:60])
                raise RunError(f"{key}: {name!r} returned {got} on {ex.source}; a verl-style reward must return "
                               "a number or a dict with a numeric 'score'") from None
            scores.append(float(value))
        return scores

    return batch


def bind_reward(name: str, answer_format: str = "answer", key: str = "reward.functions") -> RewardFn:
    """`resolve_reward(name)` as a batch function fn(responses, examples): verl-style functions wrapped,
    and `answer_format` passed to functions that take it."""
    fn = resolve_reward(name, key)
    if is_verl_reward(fn):
        return _verl_batch(fn, name, key)
    if "answer_format" in _parameters(fn):
        return lambda responses, examples: fn(responses, examples, answer_format=answer_format)
    return fn


class _Weighted:
    """One weights dict (`key` names it in errors), resolved: r = Σ_k w_k · f_k(responses, examples)."""

    def __init__(self, weights: Mapping[str, float], answer_format: str, key: str):
        if not weights:
            raise ConfigError(f"{key}: at least one reward function is needed")
        self.key, self.weights = key, dict(weights)
        self.fns = {name: bind_reward(name, answer_format, key) for name in self.weights}

    def __call__(self, responses: Sequence[str],
                 examples: Sequence[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [N], {name: [N]} per function before weighting); a function's fault is one line."""
        key, parts = self.key, {}
        for name, fn in self.fns.items():
            try:
                values = list(fn(responses, examples))
            except (RunError, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001 - a user function's failure becomes a one-line error
                raise RunError(f"{key}: {name!r} raised {_one_line(e)}") from None
            if len(values) != len(responses):
                raise RunError(f"{key}: {name!r} returned {len(values)} scores for {len(responses)} "
                               "responses; it must return one per response")
            try:
                parts[name] = torch.tensor(values, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as e:
                raise RunError(f"{key}: {name!r} returned scores that are not numbers ({_one_line(e)})") from None
            bad = (~torch.isfinite(parts[name])).nonzero().flatten().tolist()
            if bad:
                raise RunError(f"{key}: {name!r} returned {parts[name][bad[0]].item()} for {len(bad)} of "
                               f"{len(values)} responses (first: {examples[bad[0]].source}); rewards must be finite")
        return sum(self.weights[n] * v for n, v in parts.items()), parts


class RewardModel:
    """Weighted sum of named reward functions: r = Σ_k w_k · f_k(responses, examples).

    weights: `reward.functions`; answer_format: `reward.answer_format` (passed to the built-in
    accuracy and format rewards); by_data_source: `reward.by_data_source`, {data_source: weights} for
    the rows of that source (others use `weights`).
    """

    def __init__(self, weights: Mapping[str, float] = DEFAULT_REWARD, answer_format: str = "answer",
                 by_data_source: Mapping[str, Mapping[str, float]] | None = None):
        self.answer_format = check_answer_format(answer_format, "reward.answer_format")
        self.default = _Weighted(weights, answer_format, "reward.functions")
        self.routes = {str(src): _Weighted(w, answer_format, f"reward.by_data_source.{src}")
                       for src, w in (by_data_source or {}).items()}

    def __call__(self, responses: Sequence[str],
                 examples: Sequence[Example]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total [N], {name: [N]} per component before weighting).

        `accuracy` and `format` are always among the components, for monitoring, whether or not they
        are rewarded (computed with the answer format where the weights lack them). With
        `by_data_source`, a component that only some sources use is NaN on the other rows.
        """
        n = len(responses)
        groups: dict[str | None, list[int]] = {}  # rows per route (None: reward.functions)
        for i, ex in enumerate(examples):
            groups.setdefault(ex.data_source if ex.data_source in self.routes else None, []).append(i)
        total = torch.zeros(n)
        parts: dict[str, torch.Tensor] = {}
        for src, rows in groups.items():
            scorer = self.default if src is None else self.routes[src]
            sub_total, sub_parts = scorer([responses[i] for i in rows], [examples[i] for i in rows])
            idx = torch.tensor(rows, dtype=torch.long)
            total[idx] = sub_total
            for name, v in sub_parts.items():
                parts.setdefault(name, torch.full((n,), float("nan")))[idx] = v
        monitors = {"accuracy": accuracy_reward, "format": format_reward}
        for name, fn in monitors.items():
            missing = torch.isnan(parts[name]).nonzero().flatten().tolist() if name in parts else list(range(n))
            if missing:
                values = fn([responses[i] for i in missing], [examples[i] for i in missing], self.answer_format)
                parts.setdefault(name, torch.full((n,), float("nan")))[torch.tensor(missing, dtype=torch.long)] = \
                    torch.tensor(values, dtype=torch.float32)
        return total, parts


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (docs/design.md §5): min(−(len − (L_max − L_buf)) / L_buf · factor, 0).

    lengths: [N] response lengths in tokens. Returns [N] (≤ 0) to add to the rewards; 0 when buffer is 0.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    excess = lengths.float() - (max_len - buffer)
    return (-excess / buffer * factor).clamp(max=0.0)
