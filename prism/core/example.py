"""The one example type every loader produces and every stage consumes.

Shape legend used across prism: B prompts, G samples per prompt, N = B*G sequences, T tokens.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

from prism.core.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
"""Label of a token that takes no loss (prompt, padding): the value transformers and torch's cross-entropy ignore."""

# An image as a loader found it: a path (already resolved against the data file), raw bytes, or
# a decoded PIL image. Decoding happens late (at collation) so datasets stay cheap to hold.
ImageRef = Union[str, bytes, Image.Image]


@dataclass
class Example:
    """One multimodal conversation.

    messages: [{"role": "system" | "user" | "assistant", "content": str}], with one
        `<image>` placeholder per image, in order, inside user turns.
    images: one ImageRef per placeholder.
    answer: ground-truth final answer (for verifiable rewards / accuracy), if known.
    meta: anything else the source carried (e.g. the synthetic task's `scene`, `question_type`; verl's
        `data_source`, `extra_info`; `equivalent_answers`: more accepted answers, see `answers`).
    source: "file:line" (or "file:row") for error messages.
    """

    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant turn."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def response(self) -> str | None:
        """The final assistant turn, if the example has one (a demonstration)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    @property
    def answers(self) -> list[str]:
        """Every accepted ground truth: `answer`, then `meta["equivalent_answers"]` (verl / PRISM's
        `reward_model.equivalent_answers`, or the rest of a list ground truth), without repeats."""
        extra = self.meta.get("equivalent_answers") or []
        found = [a for a in [self.answer, *(extra if isinstance(extra, list) else [extra])] if a is not None]
        return list(dict.fromkeys(str(a) for a in found if str(a).strip()))

    @property
    def data_source(self) -> str | None:
        """The dataset a row came from (verl's `data_source`), which picks its reward function when
        `reward.by_data_source` maps it."""
        value = self.meta.get("data_source")
        return str(value) if value is not None else None

    @property
    def question(self) -> str:
        """Text of the last user turn without image placeholders (for logs and tables)."""
        user = [m for m in self.messages if m["role"] == "user"]
        return user[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip() if user else ""


def load_image(ref: ImageRef, source: str = "<memory>") -> Image.Image:
    """Decode an ImageRef to an RGB PIL image, with a one-line error naming the file."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    try:
        if isinstance(ref, (bytes, bytearray)):
            with Image.open(io.BytesIO(ref)) as im:
                return im.convert("RGB")
        path = Path(ref)
        if not path.exists():
            raise DataError(f"{source}: image file not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        what = ref if isinstance(ref, str) else "<bytes>"
        raise DataError(f"{source}: cannot decode image {what}: {e.__class__.__name__}: {e}") from None
