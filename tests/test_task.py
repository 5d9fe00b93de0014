"""The task interface: tasks load by name or module:attribute, the library works without one, and a
user's task plugs into evaluation and the warm-start corruptions exactly as the demo task does."""

from __future__ import annotations

import random

import pytest

from prism.align.warmup import corrupt_response
from prism.core.errors import ConfigError
from prism.core.example import Example
from prism.core.response import is_format_valid, parse_response
from prism.core.task import Task, load_task
from prism.eval.metrics import score_responses
from prism.tasks.grids import TASK


class LetterTask:
    """A user's task: the caption must name the example's letter; groups by letter."""

    name = "letters"
    table_groups = ("a", "b")

    def caption_correct(self, caption, example):
        return caption == example.meta["letter"] if "letter" in example.meta else None

    def groups(self, example):
        return [example.meta["letter"]]

    def corrupt_response(self, response, rng):
        return response.replace("<caption>a", "<caption>b")

    def make_data(self, out, settings):
        raise NotImplementedError


LETTERS = LetterTask()


def _ex(answer, **meta):
    return Example(messages=[{"role": "user", "content": "q"}], answer=answer, meta=meta)


def _resp(caption, think, answer):
    return f"<caption>{caption}</caption><think>{think}</think><answer>{answer}</answer>"


def test_tasks_load_by_name_or_module_attribute():
    assert load_task("grids") is TASK and isinstance(TASK, Task)
    assert load_task(None) is None and load_task("") is None
    assert load_task("test_task:LETTERS") is LETTERS  # tests/ is on the path under pytest


@pytest.mark.parametrize("name, message", [
    ("nope", "data.task: unknown task 'nope'; use one of grids or module.path:attribute"),
    ("no.such.module:TASK", "data.task: cannot import task 'no.such.module:TASK'"),
    ("test_task:_resp", "data.task: 'test_task:_resp' is not a prism.core.task.Task"),
])
def test_a_bad_task_is_one_line_naming_the_key(name, message):
    with pytest.raises(ConfigError) as err:
        load_task(name)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_without_a_task_evaluation_reports_answers_and_format_only():
    examples = [_ex("3", letter="a"), _ex("3", letter="b"), _ex("3", letter="a")]
    responses = [_resp("a", "t", "3"), _resp("x", "t", "4"), "<answer>2</answer>"]
    plain = score_responses(examples, responses)
    assert plain["accuracy"] == pytest.approx(1 / 3) and plain["format_rate"] == pytest.approx(2 / 3)
    assert "caption_match" not in plain and not any(k.startswith("acc/") for k in plain)
    # a valid wrong answer is a reasoning error when no task can check the caption
    assert plain["error/reasoning"] == pytest.approx(1 / 3) and plain["error/perception"] == 0.0
    with_task = score_responses(examples, responses, LETTERS)
    assert with_task["caption_match"] == pytest.approx(1 / 3)  # only the first caption names its letter
    assert with_task["error/perception"] == pytest.approx(1 / 3) and with_task["error/reasoning"] == 0.0
    assert with_task["acc/a"] == pytest.approx(1 / 2) and with_task["acc/b"] == 0.0


def test_word_level_corruption_without_a_task_changes_one_caption_word_and_one_digit():
    ref = _resp("a red square left of a blue circle", "there are 3 shapes and 2 colours", "5")
    bad = corrupt_response(ref, random.Random(0))
    a, b = parse_response(ref), parse_response(bad)
    assert is_format_valid(bad) and a.answer == b.answer
    assert sum(x != y for x, y in zip(a.caption.split(), b.caption.split())) == 1
    assert len(a.caption.split()) == len(b.caption.split())
    changed = [(x, y) for x, y in zip(a.think, b.think) if x != y]
    assert len(changed) == 1 and all(c.isdigit() for c in changed[0])  # one digit, nothing else
    assert corrupt_response(ref, random.Random(0)) == bad  # seeded


def test_the_grid_task_checks_captions_against_the_scene():
    scene = [["red", "blue"], ["blue", "blue"]]
    ex = _ex("3", scene=scene, question_type="count", grid=2)
    assert TASK.caption_correct("row 1: red blue; row 2: blue blue", ex) is True
    assert TASK.caption_correct("row 1: red red; row 2: blue blue", ex) is False
    assert TASK.caption_correct(None, ex) is False
    assert TASK.caption_correct("anything", _ex("3")) is None  # no scene: nothing to check
    assert TASK.groups(ex) == ["count", "2x2"]


def test_the_grid_task_names_each_drift_in_a_caption_and_evaluation_counts_captions_by_it():
    scene = [["red", "blue"], ["yellow", "yellow"]]
    ex = _ex("1", scene=scene, question_type="row_count", params={"color": "red", "row": 1}, grid=2)
    errors = TASK.caption_errors
    assert errors("row 1: red blue; row 2: yellow yellow", ex) == []  # right
    assert errors("row 1: yellow yellow; row 2: red blue", ex) == ["layout"]  # rows flipped, every count kept
    assert errors("row 1: blue red; row 2: yellow yellow", ex) == ["layout"]  # moved within a row
    assert errors("row 1: red blue; row 2: blue yellow", ex) == ["colour"]  # a yellow seen as blue
    assert errors("row 1: yellow blue; row 2: yellow yellow", ex) == ["colour"]
    # flipped and miscoloured: swapping the rows back matches 3 cells, as written 0
    assert errors("row 1: yellow yellow; row 2: blue blue", ex) == ["colour", "layout"]
    assert errors("row 1: red blue", ex) == ["unreadable"] and errors(None, ex) == ["unreadable"]
    assert errors("row 1: red; row 2: blue", ex) == ["unreadable"]  # wrong shape
    assert errors("row 1: red blue", _ex("1")) is None  # no scene

    captions = ["row 1: red blue; row 2: yellow yellow", "row 1: yellow yellow; row 2: red blue",
                "row 1: red blue; row 2: blue yellow", "row 1: yellow yellow; row 2: blue blue", "nonsense"]
    m = score_responses([ex] * 5, [_resp(c, "t", "1") for c in captions], TASK)
    assert m["caption_match"] == 0.2
    assert (m["caption_error/layout"], m["caption_error/colour"], m["caption_error/unreadable"]) == (0.4, 0.4, 0.2)
    assert "caption_error/layout" not in score_responses([ex], [_resp(captions[0], "t", "1")], TASK)
    letters = score_responses([_ex("1", letter="a")], [_resp("b", "t", "1")], LETTERS)  # a task without kinds
    assert not any(k.startswith("caption_error/") for k in letters)


def test_aligns_rollout_monitors_count_each_drift_of_the_rollouts_captions():
    from prism.align.game import rollout_monitors

    ex = _ex("1", scene=[["red", "blue"], ["yellow", "yellow"]], question_type="count", params={"color": "red"})
    texts = [_resp("row 1: red blue; row 2: yellow yellow", "t", "1"), _resp("row 1: yellow yellow; row 2: red blue",
             "t", "1"), _resp("row 1: yellow yellow; row 2: blue blue", "t", "2"), "no caption"]
    m = rollout_monitors([ex], texts, 4, TASK)
    assert (m["caption_match"], m["accuracy"]) == (0.25, 0.5)
    assert (m["caption_error/colour"], m["caption_error/layout"], m["caption_error/unreadable"]) == (0.25, 0.5, 0.25)
    assert not any(k.startswith("caption_error/") for k in rollout_monitors([_ex("1", letter="a")], texts, 4, LETTERS))


def test_the_grid_tasks_caption_negatives_change_only_the_caption_each_in_its_one_way():
    scene = [["red", "blue"], ["yellow", "yellow"]]
    ex = _ex("1", scene=scene, question_type="count", params={"color": "red"}, grid=2, id="test-000001")
    ref = _resp("row 1: red blue; row 2: yellow yellow", "Count each colour: red one.", "1")
    neg = TASK.caption_negatives(ref, ex)
    assert neg["layout"] == _resp("row 1: yellow yellow; row 2: red blue", "Count each colour: red one.", "1")
    assert TASK.caption_errors(parse_response(neg["layout"]).caption, ex) == ["layout"]
    colour = parse_response(neg["colour"])
    assert TASK.caption_errors(colour.caption, ex) == ["colour"]
    assert (colour.think, colour.answer) == ("Count each colour: red one.", "1")
    assert TASK.caption_negatives(ref, ex) == neg  # seeded by the example's id
    same = _resp("row 1: red blue; row 2: red blue", "t", "2")  # reads the same bottom-up: no layout negative
    assert set(TASK.caption_negatives(same, ex)) == {"colour"}
    assert TASK.caption_negatives(_resp("a cat", "t", "1"), ex) == {}


def test_the_grid_task_rejects_bad_data_settings_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="synth: .*bias_rate"):
        TASK.make_data(tmp_path / "d", {"n": 8, "bias_rate": 2.0})
    with pytest.raises(ConfigError, match="synth: .*no_such_knob"):
        TASK.make_data(tmp_path / "d", {"no_such_knob": 1})
