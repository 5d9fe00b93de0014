"""The response format of docs/design.md §2, parsed in exactly one place.

    <caption>C</caption><think>T</think><answer>A</answer>

A response is *format-valid* iff the three sections appear exactly once, in this order, each
non-empty (after stripping whitespace), with only whitespace outside them. Invalid responses are
still parsed as far as possible (first occurrence of each section) so that monitoring code can
look at, say, the caption of a response whose answer tag is missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

SECTIONS = ("caption", "think", "answer")
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
