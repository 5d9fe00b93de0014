"""`parse_response`: the format of docs/design.md §2, its edge cases, and section spans in characters and tokens."""

from __future__ import annotations

import pytest

from prism.core.response import char_span_to_token_range, is_format_valid, parse_response

BASIC = "<caption>a red cell</caption><think>one red</think><answer>1</answer>"


def test_basic_response_is_valid_with_sections_and_spans():
    r = parse_response(BASIC)
    assert r.valid
    assert (r.caption, r.think, r.answer) == ("a red cell", "one red", "1")
    # "<caption>" is 9 characters, so the caption is [9, 19); "</caption>" (10) and "<think>" (7)
    # put the thought at [36, 43); "</think>" (8) and "<answer>" (8) put the answer at [59, 60).
    assert r.spans == {"caption": (9, 19), "think": (36, 43), "answer": (59, 60)}
    assert r.section("think") == "one red"


def test_spans_index_the_original_text_and_contents_are_stripped():
    text = "  <caption>\n row 1: red \n</caption>\n\n<think> so one </think> <answer>  1\n</answer>\n"
    r = parse_response(text)
    assert r.valid
    assert (r.caption, r.think, r.answer) == ("row 1: red", "so one", "1")
    assert text[slice(*r.spans["caption"])] == "\n row 1: red \n"
    assert text[slice(*r.spans["think"])] == " so one "
    assert text[slice(*r.spans["answer"])] == "  1\n"


def test_multiline_sections_are_valid():
    text = "<caption>row 1: red blue\nrow 2: green</caption>\n<think>Count.\nTotal: 1 + 1 = 2.</think>\n<answer>2</answer>"
    r = parse_response(text)
    assert r.valid
    assert r.caption == "row 1: red blue\nrow 2: green"
    assert r.think == "Count.\nTotal: 1 + 1 = 2."


@pytest.mark.parametrize("text", [
    "Sure! " + BASIC,  # text before
    BASIC + " Hope this helps.",  # text after
    "<caption>c</caption> so <think>t</think><answer>a</answer>",  # text between sections
])
def test_text_outside_sections_is_invalid_but_sections_are_parsed(text):
    r = parse_response(text)
    assert not r.valid
    assert r.caption is not None and r.think is not None and r.answer is not None


@pytest.mark.parametrize("text, empty", [
    ("<caption></caption><think>t</think><answer>a</answer>", "caption"),
    ("<caption>c</caption><think> \n\t </think><answer>a</answer>", "think"),
    ("<caption>c</caption><think>t</think><answer> </answer>", "answer"),
])
def test_empty_or_blank_section_is_invalid(text, empty):
    r = parse_response(text)
    assert not r.valid
    assert r.section(empty) == ""  # present but empty: "" rather than None


def test_missing_section_is_invalid_and_none():
    r = parse_response("<caption>c</caption><think>t</think>")
    assert not r.valid
    assert (r.caption, r.think, r.answer) == ("c", "t", None)
    assert r.spans["answer"] is None


def test_repeated_section_is_invalid_and_first_occurrence_is_kept():
    text = "<caption>first</caption><caption>second</caption><think>t</think><answer>a</answer>"
    r = parse_response(text)
    assert not r.valid
    assert r.caption == "first"
    assert r.spans["caption"] == (9, 14)


def test_wrong_order_is_invalid_but_every_section_is_parsed():
    text = "<think>t</think><caption>c</caption><answer>a</answer>"
    r = parse_response(text)
    assert not r.valid
    assert (r.caption, r.think, r.answer) == ("c", "t", "a")
    assert r.spans["think"] == (7, 8) and r.spans["caption"] == (25, 26)


def test_nested_tags_are_invalid():
    text = "<caption>c<think>t</think></caption><answer>a</answer>"
    r = parse_response(text)
    assert not r.valid
    assert r.caption == "c<think>t</think>"  # first occurrence, taken literally
    assert r.think == "t"


def test_unclosed_tag_is_invalid_and_that_section_is_none():
    r = parse_response("<caption>c</caption><think>t<answer>a</answer>")
    assert not r.valid
    assert r.think is None and r.spans["think"] is None
    assert (r.caption, r.answer) == ("c", "a")


def test_stray_closing_tag_is_invalid():
    assert not parse_response(BASIC + "</answer>").valid


def test_empty_text():
    r = parse_response("")
    assert not r.valid
    assert (r.caption, r.think, r.answer) == (None, None, None)
    assert r.spans == {"caption": None, "think": None, "answer": None}


@pytest.mark.parametrize("text", [
    BASIC, " " + BASIC + "\n", "Sure! " + BASIC, "<caption></caption><think>t</think><answer>a</answer>",
    "<think>t</think><caption>c</caption><answer>a</answer>", "",
])
def test_is_format_valid_agrees_with_parse_response(text):
    assert is_format_valid(text) == parse_response(text).valid


# ---------------------------------------------------------------------------------- token ranges

# A hand-made offset mapping for "<caption>red</caption>" framed by two special tokens, which
# tokenizers report as zero-width: [<|im_start|>, "<caption>", "red", "</caption>", <|im_end|>].
OFFSETS = [(0, 0), (0, 9), (9, 12), (12, 22), (22, 22)]


@pytest.mark.parametrize("span, expected", [
    ((9, 12), (2, 3)),  # exactly the token "red"
    ((10, 11), (2, 3)),  # inside one token: the token that covers it
    ((8, 10), (1, 3)),  # straddles two tokens
    ((0, 22), (1, 4)),  # everything: the zero-width special tokens are never part of a span
    ((12, 12), None),  # empty span
    ((22, 22), None),  # empty span at the end, where only a zero-width token sits
    ((30, 40), None),  # past the text
    (None, None),  # a missing section
])
def test_char_span_to_token_range(span, expected):
    assert char_span_to_token_range(OFFSETS, span) == expected


def test_spans_map_to_the_tokens_of_each_section_with_the_tiny_tokenizer(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    text = "<caption>row 1: red blue</caption><think>Total: 2 + 1 = 3.</think><answer>3</answer>"
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    r = parse_response(text)
    for name in ("caption", "think", "answer"):
        first, last = char_span_to_token_range(enc["offset_mapping"], r.spans[name])
        assert tokenizer.decode(enc["input_ids"][first:last]) == r.section(name)
