"""The response format of docs/design.md §2, parsed in exactly one place.

    <caption>C</caption><think>T</think><answer>A</answer>

A response is *format-valid* iff the three sections appear exactly once, in this order, each
non-empty (after stripping whitespace), with only whitespace outside them. Invalid responses are
still parsed as far as possible (first occurrence of each section) so that monitoring code can
look at, say, the caption of a response whose answer tag is missing.

Where the final answer is read from is one setting, `answer_format` (ANSWER_FORMATS), shared by the
rewards and by evaluation (`extract_answer`, `answer_format_valid`):

    answer   the <answer>…</answer> section (PRISM's format, the default)
    boxed    the last complete `\\boxed{…}` (balanced braces) anywhere in the response, as verl's math
             and geo3k prompts ask for
    either   the <answer> section if there is one, else the last `\\boxed{…}`
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from prism.core.errors import ConfigError

SECTIONS = ("caption", "think", "answer")
AnswerFormat = Literal["answer", "boxed", "either"]
ANSWER_FORMATS: tuple[str, ...] = ("answer", "boxed", "either")
_TAG = re.compile(r"<(/?)(caption|think|answer)>")
_SECTION = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL) for name in SECTIONS}


@dataclass(frozen=True)
class ParsedResponse:
    caption: str | None
    think: str | None
    answer: str | None
    valid: bool
    # Character span [start, end) of each section's *content* in the original text, or None.
    spans: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def section(self, name: str) -> str | None:
        return getattr(self, name)


_LAYOUT = re.compile(r"\s*<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def _is_valid(text: str) -> bool:
    tags = [(m.group(1) == "/", m.group(2)) for m in _TAG.finditer(text)]
    if tags != [(closing, name) for name in SECTIONS for closing in (False, True)]:
        return False  # a section missing, repeated, nested or out of order
    m = _LAYOUT.fullmatch(text)
    return m is not None and all(g.strip() for g in m.groups())


def parse_response(text: str) -> ParsedResponse:
    """Parse a response into its three sections and decide format validity (docs/design.md §2)."""
    values: dict[str, str | None] = {}
    spans: dict[str, tuple[int, int] | None] = {}
    for name in SECTIONS:
        m = _SECTION[name].search(text)
        values[name] = m.group(1).strip() if m else None
        spans[name] = (m.start(1), m.end(1)) if m else None
    return ParsedResponse(**values, valid=_is_valid(text), spans=spans)


def is_format_valid(text: str) -> bool:
    return _is_valid(text)


_BOXED_OPEN = re.compile(r"\\boxed\s*\{")


def boxed_answers(text: str) -> list[str]:
    """The contents of every complete `\\boxed{…}` in `text`, in order, stripped.

    Braces are matched (so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`); escaped braces `\\{` `\\}`
    do not count. A box whose braces never close (a truncated response) is not an answer.
    """
    found = []
    for m in _BOXED_OPEN.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":
                i += 2  # an escaped character, \{ and \} included
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            found.append(text[m.end():i - 1].strip())
    return found


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{…}` in `text`, or None."""
    found = boxed_answers(text)
    return found[-1] if found else None


def check_answer_format(answer_format: str, key: str = "answer_format") -> str:
    """`answer_format` itself, or a one-line ConfigError naming `key`."""
    if answer_format not in ANSWER_FORMATS:
        raise ConfigError(f"{key}: unknown answer format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
    return answer_format


def extract_answer(text: str, answer_format: str = "answer") -> str | None:
    """The final answer of a response under `answer_format` (module doc), or None when it has none."""
    check_answer_format(answer_format)
    if answer_format != "boxed":
        tagged = parse_response(text).answer
        if tagged is not None or answer_format == "answer":
            return tagged
    return last_boxed(text)


def answer_format_valid(text: str, answer_format: str = "answer") -> bool:
    """Format validity under `answer_format`: for `answer`, PRISM's full format (docs/design.md §2);
    for `boxed`, exactly one complete, non-empty `\\boxed{…}` in the response (no tags demanded);
    for `either`, one or the other."""
    check_answer_format(answer_format)
    if answer_format != "boxed" and _is_valid(text):
        return True
    if answer_format == "answer":
        return False
    boxes = boxed_answers(text)
    return len(boxes) == 1 and bool(boxes[0])


def char_span_to_token_range(
    offsets: Sequence[tuple[int, int]], span: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Map a character span [start, end) to the token range [first, last + 1) that covers it.

    `offsets` is a tokenizer's offset mapping for the same text (one (start, end) per token).
    Returns None for a missing span or one that covers no token.
    """
    if span is None:
        return None
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None
