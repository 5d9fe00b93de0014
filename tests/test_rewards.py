"""Verifiable rewards: answer matching, format, weighting, plug-ins and DAPO's overlong shaping."""

from __future__ import annotations

import sys

import pytest
import torch

from prism.core.config import load_config
from prism.core.errors import ConfigError, RunError
from prism.core.example import Example
from prism.core.response import (
    answer_format_valid,
    boxed_answers,
    extract_answer,
    last_boxed,
)
from prism.rewards import (
    RewardModel,
    accuracy_reward,
    answer_correct,
    answer_matches,
    overlong_penalty,
    resolve_reward,
)
from prism.rl.config import RLConfig

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


# ------------------------------------------------------------------------------ answer formats

GEO3K = "<think>The angles sum to 180, so x = 3.</think> \\boxed{3}"


def _q(answer="3", **meta) -> Example:
    return Example(messages=[{"role": "user", "content": "q"}], answer=answer, meta=meta)


def test_boxed_extraction_balances_braces_and_takes_the_last_box():
    assert last_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not count
    assert last_boxed("first \\boxed{2}, then \\boxed{ 3 }") == "3"
    assert last_boxed("\\boxed{3} and a truncated \\boxed{\\frac{1}{2") == "3"  # an unclosed box is no answer
    assert last_boxed("no box") is None
    assert boxed_answers("\\boxed{a}\\boxed{{b}}") == ["a", "{b}"]


@pytest.mark.parametrize("fmt, answer", [("answer", None), ("boxed", "3"), ("either", "3")])
def test_extraction_of_the_geo3k_response(fmt, answer):
    assert extract_answer(GEO3K, fmt) == answer


def test_either_prefers_the_answer_tag_and_boxed_ignores_it():
    text = GOOD.format("4") + " \\boxed{5}"
    assert extract_answer(text, "answer") == "4" and extract_answer(text, "either") == "4"
    assert extract_answer(text, "boxed") == "5"


@pytest.mark.parametrize("fmt, accuracy, fmt_ok", [("answer", 0, 0), ("boxed", 1, 1), ("either", 1, 1)])
def test_geo3k_response_scores_by_answer_format(fmt, accuracy, fmt_ok):
    total, parts = RewardModel(answer_format=fmt)([GEO3K], [_q("3")])
    assert parts["accuracy"].tolist() == [accuracy] and parts["format"].tolist() == [fmt_ok]
    assert total.item() == pytest.approx(0.8 * accuracy + 0.2 * fmt_ok)


def test_format_validity_per_answer_format():
    prism_valid = GOOD.format("3")
    assert answer_format_valid(prism_valid, "answer") and answer_format_valid(prism_valid, "either")
    assert not answer_format_valid(prism_valid, "boxed")  # no box
    assert answer_format_valid("x = \\boxed{3}", "boxed")
    assert not answer_format_valid("\\boxed{2} or \\boxed{3}", "boxed")  # two final answers
    assert not answer_format_valid("\\boxed{ }", "boxed")  # an empty box
    assert not answer_format_valid("x = \\boxed{3}", "answer")


def test_unknown_answer_format_is_a_config_error():
    with pytest.raises(ConfigError, match="reward.answer_format: unknown answer format 'latex'"):
        RewardModel(answer_format="latex")
    with pytest.raises(ConfigError, match="reward.answer_format"):
        load_config(RLConfig, None, ["reward.answer_format=latex"])


def test_rl_config_loads_the_answer_and_routing_keys(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("reward:\n  answer_format: either\n  by_data_source:\n    hiyouga/geometry3k: {accuracy: 0.9, "
                    "format: 0.1}\n")
    cfg = load_config(RLConfig, str(path), ["reward.functions={accuracy: 1.0}"])
    assert cfg.reward.answer_format == "either" and cfg.reward.functions == {"accuracy": 1.0}
    assert cfg.reward.by_data_source == {"hiyouga/geometry3k": {"accuracy": 0.9, "format": 0.1}}
    assert RLConfig().reward.answer_format == "answer" and RLConfig().reward.by_data_source is None


# ------------------------------------------------------------------------------ any-of matching


def test_any_of_matching_with_equivalent_answers_and_list_truths():
    assert answer_matches("0.5", ["1/3", "\\frac{1}{2}"]) and not answer_matches("0.4", ["1/3", "1/2"])
    assert answer_matches("3", "3") and not answer_matches("3", []) and not answer_matches(None, ["3"])
    ex = _q("12", equivalent_answers=["twelve", "1.2e1"])
    assert ex.answers == ["12", "twelve", "1.2e1"]
    responses = [GOOD.format(a) for a in ("12", "Twelve", "12.0", "13")]
    assert accuracy_reward(responses, [ex] * 4) == [1.0, 1.0, 1.0, 0.0]
    assert accuracy_reward(["\\boxed{twelve}"], [ex], answer_format="boxed") == [1.0]


# ------------------------------------------------------------------------------ verl-style plug-ins


def _plugin(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_verl_compute_score_returning_a_float(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "verl_float", (
        "calls = []\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    calls.append((data_source, solution_str, ground_truth, extra_info))\n"
        "    return 1.0 if solution_str.endswith(ground_truth) else 0.25\n"))
    examples = [_q("3", data_source="geo3k", extra_info={"split": "train", "index": 7}), _q("5")]
    total, parts = RewardModel({"verl_float:compute_score": 1.0})(["x = 3", "x = 4"], examples)
    assert parts["verl_float:compute_score"].tolist() == [1.0, 0.25] and total.tolist() == [1.0, 0.25]
    import verl_float

    assert verl_float.calls == [("geo3k", "x = 3", "3", {"split": "train", "index": 7}), (None, "x = 4", "5", None)]


def test_verl_compute_score_returning_a_dict(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "verl_dict", (
        "def compute_score(data_source, solution_str, ground_truth):\n"  # no extra_info: not passed
        "    return {'score': 2.0 if ground_truth in solution_str else -1.0, 'acc': True}\n"))
    total, parts = RewardModel({"verl_dict:compute_score": 0.5, "format": 0.5}, answer_format="boxed")(
        ["\\boxed{3}", "\\boxed{4}"], [_q("3"), _q("3")])
    assert parts["verl_dict:compute_score"].tolist() == [2.0, -1.0]
    assert total.tolist() == pytest.approx([0.5 * 2.0 + 0.5, 0.5 * -1.0 + 0.5])


@pytest.mark.parametrize("body, says", [
    ("raise ValueError('no such\\nkey')",
     "reward.functions: 'bad_verl:compute_score' raised ValueError: no such on q.jsonl:1"),
    ("return 'high'", "reward.functions: 'bad_verl:compute_score' returned str 'high' on q.jsonl:1"),
    ("return {'acc': 1.0}", "returned a dict without a numeric 'score' on q.jsonl:1"),
    ("return None", "returned NoneType None on q.jsonl:1"),
])
def test_verl_reward_errors_are_one_line(tmp_path, monkeypatch, body, says):
    _plugin(tmp_path, monkeypatch, "bad_verl",
            f"def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    {body}\n")
    ex = Example(messages=[{"role": "user", "content": "q"}], answer="3", source="q.jsonl:1")
    with pytest.raises(RunError) as e:
        RewardModel({"bad_verl:compute_score": 1.0})(["3"], [ex])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_batch_plugin_that_raises_is_one_line(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "bad_batch", "def f(responses, examples):\n    return 1 / 0\n")
    with pytest.raises(RunError, match=r"^reward.functions: 'bad_batch:f' raised ZeroDivisionError: division by zero$"):
        RewardModel({"bad_batch:f": 1.0})(["3"], [_q()])


# ------------------------------------------------------------------------------ routing by data_source


def test_rows_are_scored_by_their_data_source(tmp_path, monkeypatch):
    _plugin(tmp_path, monkeypatch, "geo_reward", (
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    assert data_source == 'geo3k'\n"
        "    return 0.5\n"))
    model = RewardModel({"accuracy": 0.8, "format": 0.2}, answer_format="either",
                        by_data_source={"geo3k": {"accuracy": 1.0, "geo_reward:compute_score": 2.0}})
    examples = [_q("3", data_source="geo3k"), _q("3", data_source="grids"), _q("3", data_source="geo3k"), _q("3")]
    responses = [GEO3K, GOOD.format(3), "\\boxed{4}", GOOD.format(4)]
    total, parts = model(responses, examples)
    # geo3k rows: 1.0·accuracy + 2.0·0.5; the others: 0.8·accuracy + 0.2·format
    assert total.tolist() == pytest.approx([1.0 + 1.0, 0.8 + 0.2, 0.0 + 1.0, 0.0 + 0.2])
    assert parts["accuracy"].tolist() == [1, 1, 0, 0]
    assert parts["format"].tolist() == [1, 1, 1, 1]  # monitored on every row, rewarded only on the default ones
    got = parts["geo_reward:compute_score"].tolist()
    assert got[0] == got[2] == 0.5 and torch.isnan(parts["geo_reward:compute_score"][[1, 3]]).all()


def test_routing_errors_name_the_data_source_key():
    with pytest.raises(ConfigError, match="reward.by_data_source.geo3k: unknown reward 'acc'"):
        RewardModel(by_data_source={"geo3k": {"acc": 1.0}})
    with pytest.raises(ConfigError, match="reward.by_data_source.geo3k: at least one reward function is needed"):
        RewardModel(by_data_source={"geo3k": {}})
