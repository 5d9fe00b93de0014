"""Verifiable rewards: answer matching, format, weighting, plug-ins and DAPO's overlong shaping."""

from __future__ import annotations

import sys

import pytest
import torch

from prism.core.example import Example
from prism.rewards import RewardModel, answer_correct, overlong_penalty, resolve_reward

GOOD = "<caption>row 1: red</caption><think>one red</think><answer>{}</answer>"


@pytest.mark.parametrize("pred, truth", [
    ("3", "3"), (" 3. ", "3"), ("3.0", "3"), ("1,000", "1000"), ("Red", "red"), ("$3$", "3"),
    ("\\boxed{3}", "3"), ("B", "B"), ("(B)", "B"), ("B. blue", "B"), ("0.5", "\\frac{1}{2}"), ("1/2", "0.5"),
    ("equal", "Equal"),
])
def test_matching_answers(pred, truth):
    assert answer_correct(pred, truth)


@pytest.mark.parametrize("pred, truth", [
    ("4", "3"), ("blue", "red"), ("C", "B"), ("(C) red", "B"), ("", "3"), (None, "3"), ("3", None),
    ("3 or 4", "3"), ("1/3", "0.5"), ("import os; os._exit(1)", "3"),
])
def test_non_matching_answers(pred, truth):
    assert not answer_correct(pred, truth)


def test_default_reward_is_point_eight_accuracy_plus_point_two_format():
    ex = Example(messages=[{"role": "user", "content": "q"}], answer="3")
    responses = [GOOD.format(3), GOOD.format(4), "<answer>3</answer>", "no tags at all"]
    total, parts = RewardModel()(responses, [ex] * 4)
    assert parts["accuracy"].tolist() == [1, 0, 1, 0]  # the answer counts even when the format is off
    assert parts["format"].tolist() == [1, 1, 0, 0]
    assert total.tolist() == pytest.approx([1.0, 0.2, 0.8, 0.0])


def test_user_reward_function_from_a_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(responses, examples):\n    return [len(r) / 100 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    ex = Example(messages=[{"role": "user", "content": "q"}], answer="3")
    total, parts = RewardModel({"my_rewards:length": 1.0, "format": 0.5})(["x" * 50], [ex])
    assert total.item() == pytest.approx(0.5) and parts["my_rewards:length"].item() == pytest.approx(0.5)


def test_unknown_or_unimportable_rewards_are_named():
    with pytest.raises(ValueError, match="unknown reward 'acc'"):
        resolve_reward("acc")
    with pytest.raises(ValueError, match="cannot import 'no_such_module:f'"):
        resolve_reward("no_such_module:f")
    with pytest.raises(ValueError, match="cannot import 'math:no_such_fn'"):
        resolve_reward("math:no_such_fn")


def test_overlong_penalty_by_hand():
    # L_max 100, L_buf 20: no penalty up to 80 tokens, then linear down to −1 at 100.
    lengths = torch.tensor([50, 80, 90, 100])
    assert overlong_penalty(lengths, 100, 20).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert overlong_penalty(lengths, 100, 20, factor=2.0).tolist() == pytest.approx([0.0, 0.0, -1.0, -2.0])
    assert overlong_penalty(lengths, 100, 0).tolist() == [0.0] * 4
