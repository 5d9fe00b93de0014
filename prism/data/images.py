"""Images, from a data file's reference to the pixels a processor sees.

- `resolve_images`: the references a record gives (paths against the data file, `file://` and base64 `data:`
  URLs, bytes, `datasets` Image structs, PIL images) as `ImageRef`s; remote URLs are refused (no downloads).
- `image_fault` / `verified_path`: whether PIL can read one (a path checked once per size and mtime).
- `image_size`: an image's (width, height) from its header, without decoding pixels.
- Pixel bounds: every image is resized into the processor's bounds (`data.image_min_pixels` /
  `data.image_max_pixels`, `prism.models.processor.set_image_pixels`) by the processor itself. A content
  part may ask for its own, as qwen-vl-utils' users write them (`{"type": "image", "image": "a.jpg",
  "min_pixels": 3136, "max_pixels": 401408}`): the reader keeps them in `meta["image_pixels"]` (one [min, max]
  or null per image, `part_pixel_bounds`), and `example_images` / `resized_size` resize such an image with the
  same function the processor uses (transformers' `smart_resize`: qwen-vl-utils' rule, the two differing only
  for a side under half a merged patch), its bounds clamped into the processor's so that the processor then
  leaves it as it is. Collation, corpus lengths, every sampler (vLLM is sent the resized pixels) and the
  discriminator all go through these two functions.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from prism.core.errors import DataError
from prism.core.example import IMAGE_PLACEHOLDER, Example, ImageRef, load_image
from prism.models.processor import image_pixels

PIXEL_KEYS = ("min_pixels", "max_pixels")
"""A content part's own pixel bounds (qwen-vl-utils' names)."""


def resolve_images(refs: Any, root: Path, source: str) -> list[ImageRef]:
    """Resolve image entries: paths (against `root`; `file://` and base64 `data:` URLs too), bytes,
    {"bytes", "path"} dicts, PIL images. Remote URLs are refused (no downloads)."""
    if refs is None:
        return []
    out: list[ImageRef] = []
    for ref in refs if isinstance(refs, (list, tuple)) else [refs]:
        if isinstance(ref, dict):  # how `datasets` stores an Image feature
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            out.append(bytes(ref))
        elif isinstance(ref, Image.Image):
            out.append(ref)
        elif isinstance(ref, str) and ref.startswith("data:"):
            try:
                out.append(base64.b64decode(ref.split(",", 1)[1], validate=True))
            except (IndexError, binascii.Error):
                raise DataError(f"{source}: image data URL is not valid base64") from None
        elif isinstance(ref, str) and "://" in ref and not ref.startswith("file://"):
            raise DataError(f"{source}: remote image {ref[:100]!r} is not downloaded (offline); use a local path")
        elif isinstance(ref, str) and ref:
            path = Path(ref.removeprefix("file://")).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DataError(f"{source}: image file not found: {path}")
            out.append(str(path))
        else:
            raise DataError(f"{source}: unsupported image entry of type {type(ref).__name__}")
    return out


def image_fault(ref: str | bytes) -> str | None:
    """Why PIL cannot verify an image (None: it can)."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad data
        return f"{type(e).__name__}: {_one_line(e)}"
    return None


def verified_path(path: str) -> str | None:
    """`image_fault` of a path, checked once per (path, size, mtime): corpora repeat their images."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{type(e).__name__}: {_one_line(e)}"
    return _verified(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=65536)
def _verified(path: str, size: int, mtime_ns: int) -> str | None:
    return image_fault(path)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def image_size(ref, source: str = "<memory>") -> tuple[int, int]:
    """(width, height) of an ImageRef from its header; a path's is read once per (path, size, mtime)."""
    if isinstance(ref, str):
        try:
            st = os.stat(ref)
        except FileNotFoundError:
            raise DataError(f"{source}: image file not found: {ref}") from None
        size = _path_size(ref, st.st_size, st.st_mtime_ns)
        if isinstance(size, str):
            raise DataError(f"{source}: cannot read image {ref}: {size}")
        return size
    if isinstance(ref, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(ref)) as im:
                return im.size
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{source}: cannot read image <bytes>: {e.__class__.__name__}: {e}") from None
    return ref.size


@lru_cache(maxsize=65536)
def _path_size(path: str, size: int, mtime_ns: int) -> tuple[int, int] | str:
    """The header's (width, height), or the reason it cannot be read (cached too: the example naming the
    file is reported by the caller)."""
    try:
        with Image.open(path) as im:  # the header only: PIL decodes pixels lazily
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        return f"{e.__class__.__name__}: {e}"


# ---------------------------------------------------------------------------------------------- pixel bounds

def part_pixel_bounds(part: dict, source: str) -> list[int | None] | None:
    """[min_pixels, max_pixels] of an image content part (either may be None), or None if it sets neither."""
    values = [part.get(k) for k in PIXEL_KEYS]
    if all(v is None for v in values):
        return None
    for key, v in zip(PIXEL_KEYS, values):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise DataError(f"{source}: an image part's {key} must be a positive integer, got {v!r}")
    if None not in values and values[0] > values[1]:
        raise DataError(f"{source}: an image part's min_pixels {values[0]} is above its max_pixels {values[1]}")
    return values


def image_bounds(processor, ex: Example) -> list[tuple[int, int] | None]:
    """Per image of `ex`: the (min, max) pixels its content part asked for, clamped into the processor's bounds;
    None where it asked for nothing (the processor's own apply)."""
    asked = ex.meta.get("image_pixels") or []
    if not any(asked):
        return [None] * len(ex.images)
    lo, hi = image_pixels(processor)
    out: list[tuple[int, int] | None] = []
    for b in asked:
        if not b:
            out.append(None)
            continue
        a = lo if b[0] is None else min(max(b[0], lo), hi)
        z = hi if b[1] is None else min(max(b[1], lo), hi)
        out.append((a, max(a, z)))
    return out


def resized_size(processor, width: int, height: int, bounds: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) an image of that size is resized to for its own `bounds` (None: unchanged, the processor
    resizes it)."""
    if bounds is None:
        return width, height
    ip = processor.image_processor
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=bounds[0],
                        max_pixels=bounds[1])
    return w, h


def example_images(processor, examples: Sequence[Example], prompt_only: bool = False) -> list[Image.Image]:
    """Decoded RGB images of all examples, in order, each resized for its content part's own bounds; after
    checking that each example has one image per placeholder."""
    out = []
    for ex in examples:
        messages = ex.prompt_messages if prompt_only else ex.messages
        n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if n != len(ex.images):
            raise DataError(f"{ex.source}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(ex.images)} image(s)")
        for ref, bounds in zip(ex.images, image_bounds(processor, ex)):
            image = load_image(ref, ex.source)
            size = resized_size(processor, *image.size, bounds)
            out.append(image if size == image.size else image.resize(size, Image.Resampling.BICUBIC))
    return out
