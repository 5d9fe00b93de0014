"""Loaders that turn data files into `list[Example]`, and one writer back to sharegpt JSONL.

Three on-disk formats are read (docs/design.md §7); each has one small parser below whose docstring
gives its schema:

- LLaMA-Factory "sharegpt" multimodal JSON (a list) or JSONL (`messages` or `conversations`);
- verl-style RL Parquet (`prompt`, `images`, `reward_model.ground_truth`), prompt-only;
- prism's own JSONL (`image`/`images`, `question`, `response`, `answer`).

Every problem is a `DataError` whose message is one line starting with "file:line" (1-based
line for JSONL, 0-based record index for a JSON list, 0-based row for Parquet). Images are
resolved (paths against the data file's directory) and checked here, but decoded only later.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from prism.core.example import IMAGE_PLACEHOLDER, DataError, Example, ImageRef, load_image

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
ANSWER_KEYS = ("answer", "ground_truth", "solution")  # sharegpt: the first key present wins


def load_examples(
    path: str | Path,
    format: str = "auto",
    *,
    require_response: bool = False,
    require_answer: bool = False,
    skip_bad: bool = False,
    verify_images: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Load and validate a data file; `format` is "auto", "sharegpt", "verl" or "prism".

    auto looks at the first record: `messages`/`conversations` -> sharegpt, `prompt` -> verl,
    `question` -> prism. With skip_bad, bad examples are dropped with one warning at the end
    instead of raising. `limit` keeps the first `limit` valid examples (and stops reading).
    """
    if format not in ("auto", *PARSERS):
        raise ValueError(f"unknown data format {format!r}; expected auto, {', '.join(PARSERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    parse = PARSERS[_detect_format(path) if format == "auto" else format]

    examples: list[Example] = []
    n_bad, first_reason = 0, ""
    for source, record in _read_records(path):
        try:
            if isinstance(record, DataError):  # a line that was not a JSON object
                raise record
            example = parse(record, path.parent, source)
            _validate(example, require_response, require_answer, verify_images)
        except DataError as e:
            if not skip_bad:
                raise
            n_bad, first_reason = n_bad + 1, first_reason or str(e)
            continue
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if n_bad:
        warnings.warn(f"{path}: skipped {n_bad} bad example(s); first: {first_reason}", stacklevel=2)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({n_bad} bad ones skipped)" if n_bad else ""))
    return examples


# ---------------------------------------------------------------------------------- reading


def _read_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield (source, record) pairs; a record that cannot be parsed is yielded as a DataError
    so that skip_bad can drop it. Errors that spoil the whole file are raised."""
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    if text.lstrip().startswith("["):  # a JSON list: one parse error spoils the whole file
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        numbered: Iterator[tuple[str, Any]] = ((f"{path}:{i}", r) for i, r in enumerate(records))
    else:  # JSONL: one object per non-blank line
        lines = enumerate(text.splitlines(), 1)
        numbered = ((f"{path}:{n}", _parse_line(line)) for n, line in lines if line.strip())
    for source, record in numbered:
        if isinstance(record, json.JSONDecodeError):
            yield source, DataError(f"{source}: invalid JSON: {record.msg} (column {record.colno})")
        elif not isinstance(record, dict):
            yield source, DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        else:
            yield source, record


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return e


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # batches, so that `limit` does not read a large file whole
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield f"{path}:{row}", record
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet: {_one_line(e)}") from None


def _detect_format(path: Path) -> str:
    """Pick the format from the first record that parses."""
    first_error = None
    for source, record in _read_records(path):
        if isinstance(record, DataError):
            first_error = first_error or record
            continue
        if "messages" in record or "conversations" in record:
            return "sharegpt"
        if "prompt" in record:
            return "verl"
        if "question" in record:
            return "prism"
        raise DataError(
            f"{source}: cannot tell the data format from keys {sorted(record)}; expected messages/"
            "conversations (sharegpt), prompt (verl) or question (prism), or pass format="
        )
    raise first_error or DataError(f"{path}: no examples (empty file)")


# ---------------------------------------------------------------------------------- parsers


def parse_sharegpt(record: dict[str, Any], root: Path, source: str) -> Example:
    """LLaMA-Factory sharegpt record:

        {"messages": [{"role": "user", "content": "<image>..."}, {"role": "assistant", ...}],
         "images": ["rel/or/abs.png" | bytes | {"bytes": ..., "path": ...}, ...],
         "system": "optional system prompt", "answer": "optional", ...anything else -> meta}

    `conversations` with {"from": "human"|"gpt"|..., "value": ...} items works the same;
    `ground_truth` or `solution` may stand in for `answer`.
    """
    record = dict(record)
    turns = record.pop("messages") if "messages" in record else record.pop("conversations", None)
    messages = _messages(turns, source)
    system = record.pop("system", None)
    if system:
        messages.insert(0, {"role": "system", "content": str(system)})
    images = _images(record.pop("images", None), root, source)
    answer_key = next((k for k in ANSWER_KEYS if k in record), None)
    answer = record.pop(answer_key) if answer_key else None
    return Example(messages, images, _answer_text(answer), record, source)


def parse_verl(record: dict[str, Any], root: Path, source: str) -> Example:
    """verl RL row (prompt-only, no assistant turn):

        prompt: [{"role": "user", "content": "<image>..."}], images: [{"bytes", "path"} | path | bytes],
        reward_model: {"ground_truth": ..., "style": ...}, data_source, extra_info, ... -> meta
    """
    record = dict(record)
    messages = _messages(record.pop("prompt", None), source)
    images = _images(record.pop("images", None), root, source)
    reward_model = dict(record.pop("reward_model", None) or {})
    answer = reward_model.pop("ground_truth", None)
    if reward_model:  # e.g. {"style": "rule"}: keep what is not the answer
        record["reward_model"] = reward_model
    return Example(messages, images, _answer_text(answer), record, source)


def parse_prism(record: dict[str, Any], root: Path, source: str) -> Example:
    """prism JSONL record:

        {"image": "rel.png"} or {"images": [...]}, "question": str, "response": optional reference
        response, "answer": optional, ...anything else -> meta

    One `<image>` per image is prepended to the question unless it already has placeholders.
    """
    record = dict(record)
    refs = record.pop("images") if "images" in record else record.pop("image", None)
    images = _images(refs, root, source)
    question = record.pop("question", None)
    if not isinstance(question, str):
        raise DataError(f"{source}: `question` must be a string, got {type(question).__name__}")
    if IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER * len(images) + question
    messages = [{"role": "user", "content": question}]
    response = record.pop("response", None)
    if response is not None:
        messages.append({"role": "assistant", "content": str(response)})
    return Example(messages, images, _answer_text(record.pop("answer", None)), record, source)


PARSERS: dict[str, Callable[[dict[str, Any], Path, str], Example]] = {
    "sharegpt": parse_sharegpt,
    "verl": parse_verl,
    "prism": parse_prism,
}


def _messages(turns: Any, source: str) -> list[dict[str, str]]:
    """Normalise {role, content} / {from, value} turns; content may also be a list of
    OpenAI-style parts ({"type": "text", "text"} / {"type": "image"})."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: expected a non-empty list of messages, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{source}: message {i} is a {type(turn).__name__}, not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLES:
            expected = ", ".join(ROLES)
            raise DataError(f"{source}: unknown role {role!r} in message {i} (expected one of {expected})")
        if isinstance(content, list):
            content = "".join(
                IMAGE_PLACEHOLDER if p.get("type") == "image" else str(p.get("text") or "") for p in content
            )
        if not isinstance(content, str):
            raise DataError(f"{source}: message {i} has no string content (got {type(content).__name__})")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def _images(refs: Any, root: Path, source: str) -> list[ImageRef]:
    """Resolve image entries: paths (against `root`), bytes, {"bytes", "path"} dicts, PIL images."""
    if refs is None:
        return []
    out: list[ImageRef] = []
    for ref in refs if isinstance(refs, list) else [refs]:
        if isinstance(ref, dict):  # how `datasets` stores an Image feature
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            out.append(bytes(ref))
        elif isinstance(ref, Image.Image):
            out.append(ref)
        elif isinstance(ref, str) and ref:
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise DataError(f"{source}: image file not found: {path}")
            out.append(str(path))
        else:
            raise DataError(f"{source}: unsupported image entry of type {type(ref).__name__}")
    return out


def _answer_text(answer: Any) -> str | None:
    """Ground truth as text: strings unchanged, numbers / lists as JSON (3 -> "3")."""
    return answer if answer is None or isinstance(answer, str) else json.dumps(answer)


# ---------------------------------------------------------------------------------- checks


def _validate(example: Example, require_response: bool, require_answer: bool, verify_images: bool) -> None:
    """The checks LLaMA-Factory makes, plus the ones each prism stage relies on."""
    source, n_placeholders = example.source, 0
    for i, message in enumerate(example.messages):
        count = message["content"].count(IMAGE_PLACEHOLDER)
        if count and message["role"] != "user":
            role = message["role"]
            raise DataError(f"{source}: {IMAGE_PLACEHOLDER} placeholder outside a user turn (message {i}: {role})")
        n_placeholders += count
    if n_placeholders != len(example.images):
        counts = f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(example.images)} image(s)"
        raise DataError(f"{source}: {counts}")
    if require_response and not (example.response or "").strip():
        raise DataError(f"{source}: no final assistant turn with a non-empty response")
    if require_answer and not (example.answer or "").strip():
        raise DataError(f"{source}: no answer")
    if verify_images:
        for ref in example.images:
            if isinstance(ref, Image.Image):
                continue
            try:
                with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types on bad data
                what = ref if isinstance(ref, str) else f"<{len(ref)} bytes>"
                reason = f"{type(e).__name__}: {_one_line(e)}"
                raise DataError(f"{source}: corrupt image {what}: {reason}") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# ---------------------------------------------------------------------------------- writing


def save_sharegpt_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Write examples as sharegpt JSONL ({"messages", "images", "answer", **meta} per line).

    Image paths are written relative to the output file's directory; bytes and PIL images are
    saved as PNG under `images/` next to it. Loading the result gives back equal messages,
    answer, meta and decoded pixels.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reserved = {"messages", "conversations", "images", "system", "answer"}
    with open(path, "w", encoding="utf-8") as f:
        for i, example in enumerate(examples):
            clash = reserved & set(example.meta)
            if clash:
                raise DataError(f"{example.source}: meta keys {sorted(clash)} clash with sharegpt fields")
            images = [_write_image(ref, path, f"{path.stem}_{i}_{j}") for j, ref in enumerate(example.images)]
            record = {
                "messages": [{"role": m["role"], "content": m["content"]} for m in example.messages],
                "images": images,
                "answer": example.answer,  # always written, so a meta `solution` is never read as the answer
                **example.meta,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_image(ref: ImageRef, out_file: Path, name: str) -> str:
    if isinstance(ref, str):
        try:
            return os.path.relpath(Path(ref).resolve(), out_file.parent.resolve())
        except ValueError:  # another drive on Windows: keep it absolute
            return str(Path(ref).resolve())
    image_dir = out_file.parent / "images"
    image_dir.mkdir(exist_ok=True)
    load_image(ref).save(image_dir / f"{name}.png")  # PNG is lossless: pixels round-trip
    return f"images/{name}.png"
