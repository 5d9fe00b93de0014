"""The colour-grid task behind the `Task` interface (`prism.core.task`)."""

from __future__ import annotations

import random
import re
from collections import Counter
from itertools import permutations
from pathlib import Path

from prism.align.warmup import corrupt_caption, corrupt_response, corrupt_think, swap_one
from prism.core.errors import ConfigError
from prism.core.example import Example
from prism.core.response import parse_response
from prism.tasks.grids.generator import (
    COLORS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SynthConfig,
    caption_for_scene,
    generate,
    scene_from_caption,
)

_COLOUR = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")


class GridTask:
    name = "grids"
    table_groups = QUESTION_TYPES
    caption_error_kinds = ("colour", "layout", "unreadable")
    """What `caption_errors` can name."""

    def caption_correct(self, caption: str | None, example: Example) -> bool | None:
        errors = self.caption_errors(caption, example)
        return None if errors is None else not errors

    def caption_errors(self, caption: str | None, example: Example) -> list[str] | None:
        """What is wrong with a caption, each drift on its own: `colour` (a grid of the right shape with some
        colour count wrong: the colour bias, or any miscoloured cell), `layout` (cells misplaced: every count
        right but the caption still wrong, or its rows in the wrong order, some reordering of them matching
        the scene in more cells whatever the colours: the drift only the image shows), both, or `unreadable`
        (no caption, not a grid, or the wrong shape). [] when it matches; None when the example has no scene."""
        if "scene" not in example.meta:
            return None
        truth = [list(r) for r in example.meta["scene"]]
        said = scene_from_caption(caption) if caption is not None else None
        if said == truth:
            return []
        if said is None or len(said) != len(truth) or len(said[0]) != len(truth[0]):
            return ["unreadable"]
        errors = []
        if Counter(c for r in said for c in r) != Counter(c for r in truth for c in r):
            errors.append("colour")

        def agree(rows) -> int:
            return sum(a == b for row, true_row in zip(rows, truth) for a, b in zip(row, true_row))

        if not errors or max(agree(order) for order in permutations(said)) > agree(said):
            errors.append("layout")  # every count right yet wrong: cells moved; or the rows out of order
        return errors

    def caption_negatives(self, response: str, example: Example) -> dict[str, str]:
        """`response` with only its caption made wrong, one way per drift of `caption_errors`: `layout`
        (its rows listed bottom-up: every colour count kept, so only the image shows it; absent when the
        rows read the same both ways) and `colour` (one cell's colour changed, seeded by the example's id
        or source). Think and answer are left as they are, so only the perception expert has anything to
        see. {} when the caption is not a grid."""
        parsed = parse_response(response)
        said = scene_from_caption(parsed.caption) if parsed.caption is not None else None
        if said is None:
            return {}
        out = {}

        def with_caption(caption: str) -> str:
            return response.replace(f"<caption>{parsed.caption}</caption>", f"<caption>{caption}</caption>", 1)

        if said[::-1] != said:
            out["layout"] = with_caption(caption_for_scene(said[::-1]))
        rng = random.Random(str(example.meta.get("id", example.source)))
        out["colour"] = with_caption(self._corrupt_caption(parsed.caption, rng))
        return out

    def groups(self, example: Example) -> list[str]:
        """Its question type and its grid size ("3x3")."""
        out = [example.meta["question_type"]] if "question_type" in example.meta else []
        if "grid" in example.meta:
            out.append(f"{example.meta['grid']}x{example.meta['grid']}")
        return out

    def corrupt_response(self, response: str, rng: random.Random) -> str:
        """One perception error (a colour of the caption replaced by another) and one reasoning error (a
        count word changed); without such words, the library's word-level corruption."""
        return corrupt_response(response, rng, caption=self._corrupt_caption, think=self._corrupt_think)

    @staticmethod
    def _corrupt_caption(caption: str, rng: random.Random) -> str:
        if _COLOUR.search(caption):
            return swap_one(caption, _COLOUR, list(COLORS), rng)
        return corrupt_caption(caption, rng)

    @staticmethod
    def _corrupt_think(think: str, rng: random.Random) -> str:
        if _NUMBER_WORD.search(think):
            return swap_one(think, _NUMBER_WORD, NUMBER_WORDS[:13], rng)
        return corrupt_think(think, rng)

    def make_data(self, out: Path, settings: dict) -> None:
        try:
            cfg = SynthConfig(out=str(out), **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        except TypeError as e:  # an unknown key
            raise ConfigError(f"synth: {e}") from None
        except ValueError as e:
            raise ConfigError(f"synth: {e}") from None
        generate(cfg)


TASK = GridTask()
