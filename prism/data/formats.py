"""Loaders that turn data files into `list[Example]`, and one writer back to sharegpt JSONL.

Three on-disk formats are read (docs/design.md §7); each has one small parser below whose docstring
gives its schema:

- LLaMA-Factory "sharegpt" multimodal JSON (a list) or JSONL (`messages` or `conversations`);
  content may be a string or a list of parts (OpenAI-style `{"type": "text", "text"}` /
  `{"type": "image_url", "image_url": {"url"}}`, or LLaMA-Factory's `{"type": ..., "value"}`);
- verl-style RL Parquet (`prompt`, `images`, `reward_model.ground_truth`), prompt-only unless the
  row carries PRISM's `teacher_response` (or `teacher_caption` + `teacher_cot`) columns;
- prism's own JSONL (`image`/`images`, `question`, `response`, `answer`).

LLaMA-Factory datasets by name: `load_examples("DIR#NAME")` or
`load_examples("DIR/dataset_info.json#NAME")` (so `data.train=DIR#NAME` in a config) loads entry
NAME of DIR/dataset_info.json, as does `load_dataset_info(DIR, NAME, media_dir=...)`: its
`file_name` (JSON, JSONL or Parquet, relative to DIR), `formatting` (sharegpt or alpaca),
`columns` and `tags` are honoured, and image paths are relative to `media_dir` (default DIR).
Remote entries (`hf_hub_url`, `ms_hub_url`, `script_url`) and preference data are refused.

Every problem is a `DataError` whose message is one line starting with "file:line" (1-based
line for JSONL, 0-based record index for a JSON list, 0-based row for Parquet). Images are
resolved (paths against the data file's directory) and checked here, but decoded only later.
Videos and audio are refused with one line rather than dropped.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from prism.core.example import IMAGE_PLACEHOLDER, DataError, Example, ImageRef, load_image
from prism.data.images import image_fault, part_pixel_bounds, resolve_images, verified_path

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
ANSWER_KEYS = ("answer", "ground_truth", "solution")  # sharegpt: the first key present wins
UNSUPPORTED_MEDIA = ("videos", "video", "audios", "audio")  # record keys refused when non-empty
TEACHER_KEYS = ("teacher_response", "teacher_caption", "teacher_cot")

DATASET_INFO = "dataset_info.json"
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# LLaMA-Factory's defaults, except that `images` / `videos` default to those keys (LLaMA-Factory
# leaves them unset), so that a record's images are used and its videos refused, never ignored.
DATASET_COLUMNS = {
    "sharegpt": {"messages": "conversations", "images": "images", "videos": "videos", "audios": None,
                 "system": None, "tools": None},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None,
               "images": "images", "videos": "videos", "audios": None, "system": None, "tools": None},
}
DATASET_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}

Parser = Callable[[dict[str, Any], Path, str], Example]


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
    `DIR#NAME` or `DIR/dataset_info.json#NAME` loads LLaMA-Factory dataset NAME (see
    `load_dataset_info`; `format` is then ignored: the entry's `formatting` decides).
    """
    return _load(*resolve_source(path, format), require_response, require_answer, skip_bad, verify_images, limit)


def dataset_reference(path: str | Path) -> tuple[Path, str] | None:
    """(dataset_info.json, NAME) when `path` names a LLaMA-Factory dataset (`DIR#NAME` or
    `DIR/dataset_info.json#NAME`, and is not itself an existing file); else None."""
    text = str(path)
    if "#" not in text or Path(text).exists():
        return None
    index, name = text.rsplit("#", 1)
    index_path = Path(index)
    return (index_path / DATASET_INFO if index_path.is_dir() else index_path), name


def resolve_source(path: str | Path, format: str = "auto") -> tuple[Path, Parser, Path]:
    """(data file, record parser, folder image paths are relative to) of a data path: a file, or a
    LLaMA-Factory dataset by name (`dataset_reference`). Every fault is one line (DataError)."""
    if format not in ("auto", *PARSERS):
        raise ValueError(f"unknown data format {format!r}; expected auto, {', '.join(PARSERS)}")
    reference = dataset_reference(path)
    if reference is not None:
        return _dataset_source(*reference)
    path = Path(path)
    if path.is_dir() and (path / DATASET_INFO).is_file():
        raise DataError(_index_hint(path / DATASET_INFO, path))
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.name == DATASET_INFO:
        raise DataError(_index_hint(path, path))
    return path, PARSERS[_detect_format(path) if format == "auto" else format], path.parent


@dataclass
class Skipped:
    """The bad examples `skip_bad` dropped while reading `file`: how many, and the first one's error."""

    file: Path | None = None
    n: int = 0
    first: str = ""


def iter_examples(path: str | Path, format: str = "auto", *, require_response: bool = False,
                  require_answer: bool = False, skip_bad: bool = False, verify_images: bool = True,
                  skipped: Skipped | None = None, shard: Shard | None = None) -> Iterator[Example]:
    """`load_examples` one example at a time, without holding the file (what `skip_bad` drops is counted
    in `skipped`; no warning, and no error when nothing is left: the caller decides). `shard`, one of
    `shards(path, n)`, reads only that part of a JSONL file."""
    file, parse, root = resolve_source(path, format)
    yield from _stream(file, parse, root, require_response, require_answer, skip_bad, verify_images,
                       skipped if skipped is not None else Skipped(), shard)


@dataclass(frozen=True)
class Shard:
    """Bytes [start, end) of a JSONL file, starting at a line start; `line` is that line's number."""

    start: int
    end: int
    line: int


def shards(path: str | Path, n: int) -> list[Shard | None]:
    """Up to `n` consecutive parts of the data file of `path`, split at line starts, for `n` readers of
    a JSONL file (in order, they cover it exactly). Other files (a JSON list, Parquet) cannot be split
    this way: one part, `None`, the whole file."""
    file = resolve_source(path)[0]
    if n <= 1 or file.suffix == ".parquet" or _first_char(file) in ("[", ""):
        return [None]
    size = file.stat().st_size
    bounds, line, pos = [], 1, 0
    with open(file, "rb") as f:
        for target in (size * i // n for i in range(1, n)):
            while pos < target:  # count the lines before the target
                chunk = f.read(min(1 << 24, target - pos))
                line, pos = line + chunk.count(b"\n"), pos + len(chunk)
            rest = f.readline()  # then on to the next line start
            line, pos = line + rest.count(b"\n"), pos + len(rest)
            if pos < size and (not bounds or pos > bounds[-1][0]):
                bounds.append((pos, line))
    starts = [(0, 1), *bounds]
    return [Shard(start, end, first) for (start, first), end in zip(starts, [b[0] for b in bounds] + [size])]


def _first_char(path: Path) -> str:
    """The first non-blank character of a text file ("" when blank)."""
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def load_dataset_info(
    dataset_dir: str | Path,
    name: str,
    *,
    media_dir: str | Path | None = None,
    require_response: bool = False,
    require_answer: bool = False,
    skip_bad: bool = False,
    verify_images: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Load dataset `name` of a LLaMA-Factory `dataset_info.json` (`dataset_dir` is its folder or
    the file itself). Honoured keys of the entry:

        file_name: the data file (JSON, JSONL or Parquet), relative to the dataset folder;
        formatting: "sharegpt" or "alpaca" (LLaMA-Factory's default);
        columns: prism field -> the file's column. sharegpt: messages, images, system, videos,
            tools; alpaca: prompt, query, response, history, images, system, videos, tools. `tools`
            is kept in meta but not used. A single `image` string column works via {"images": "image"};
        tags (sharegpt): role_tag, content_tag, user_tag, assistant_tag, system_tag (observation /
            function turns are refused).

    Image paths are resolved against `media_dir` (default: the dataset folder). Remote entries
    (hf_hub_url, ms_hub_url, script_url) and `ranking` (preference) entries are one-line errors.
    """
    index = Path(dataset_dir)
    index = index / DATASET_INFO if index.is_dir() else index
    return _load(*_dataset_source(index, name, media_dir), require_response, require_answer, skip_bad, verify_images,
                 limit)


def _dataset_source(index: Path, name: str, media_dir: str | Path | None = None) -> tuple[Path, Parser, Path]:
    """(data file, record parser, image folder) of entry `name` of the dataset index `index`."""
    if not index.is_file():
        raise DataError(f"{index}: LLaMA-Factory dataset index not found (a dataset is named as DIR#NAME "
                        f"or DIR/{DATASET_INFO}#NAME)")
    entries = _read_index(index)
    if name not in entries:
        raise DataError(f"{index}: no dataset {name!r} (datasets: {_names(entries)})")
    entry, where = entries[name], f"{index}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if entry.get("ranking"):
        raise DataError(f"{where}: `ranking` (preference) datasets are not supported")
    file_name = entry.get("file_name")
    if not file_name:
        remote = next((k for k in REMOTE_KEYS if entry.get(k)), None)
        if remote:
            raise DataError(f"{where}: `{remote}` is a remote dataset, which prism does not download (offline); "
                            "download it and set `file_name`")
        raise DataError(f"{where}: no `file_name`")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in DATASET_COLUMNS:
        raise DataError(f"{where}: unknown `formatting` {formatting!r} (expected sharegpt or alpaca)")
    columns = {**DATASET_COLUMNS[formatting], **_mapping(entry, "columns", DATASET_COLUMNS[formatting], where)}
    tags = {**DATASET_TAGS, **_mapping(entry, "tags", DATASET_TAGS, where)}
    data_file = index.parent / str(file_name)
    if not data_file.is_file():
        raise DataError(f"{where}: `file_name` {file_name!r} not found (prism reads one file): {data_file}")
    if data_file.suffix not in (".json", ".jsonl", ".parquet"):
        raise DataError(f"{where}: `file_name` {file_name!r}: only JSON, JSONL and Parquet files are supported")
    root = Path(media_dir) if media_dir is not None else index.parent

    def parse(record: dict[str, Any], root: Path, source: str) -> Example:
        if formatting == "sharegpt":
            return parse_sharegpt(_from_sharegpt_columns(record, columns, tags, source), root, source)
        return parse_sharegpt(_from_alpaca_columns(record, columns, source), root, source)

    return data_file, parse, root


def _stream(path: Path, parse: Parser, root: Path, require_response: bool, require_answer: bool, skip_bad: bool,
            verify_images: bool, skipped: Skipped, shard: Shard | None = None) -> Iterator[Example]:
    """The valid examples of `path` (or of its `shard`), read and parsed one record at a time."""
    skipped.file = path
    for source, record in _read_records(path, shard):
        try:
            if isinstance(record, DataError):  # a line that was not a JSON object
                raise record
            example = parse(record, root, source)
            _validate(example, require_response, require_answer, verify_images)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.n, skipped.first = skipped.n + 1, skipped.first or str(e)
            continue
        yield example


def _load(
    path: Path, parse: Parser, root: Path, require_response: bool, require_answer: bool, skip_bad: bool,
    verify_images: bool, limit: int | None,
) -> list[Example]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    skipped = Skipped()
    examples = list(islice(_stream(path, parse, root, require_response, require_answer, skip_bad, verify_images,
                                   skipped), limit))  # stops reading at `limit`
    if skipped.n:
        warnings.warn(f"{path}: skipped {skipped.n} bad example(s); first: {skipped.first}", stacklevel=3)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({skipped.n} bad ones skipped)" if skipped.n else ""))
    return examples


# ---------------------------------------------------------------------------------- dataset_info.json


def _read_index(index: Path) -> dict[str, Any]:
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{index}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{index}: not UTF-8 text: {e}") from None
    if not isinstance(entries, dict):
        raise DataError(f"{index}: expected an object of datasets, got {type(entries).__name__}")
    return entries


def _looks_like_index(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and any(k in v for k in ("file_name", *REMOTE_KEYS)) for v in data.values()
    )


def _names(entries: dict[str, Any]) -> str:
    names = sorted(entries)
    return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def _index_hint(index: Path, given: Path) -> str:
    try:
        names = f" (datasets: {_names(_read_index(index))})"
    except DataError:
        names = ""
    return (f"{given}: a LLaMA-Factory dataset index (dataset_info.json), not a data file; name one of "
            f"its datasets as {given}#NAME{names}")


def _mapping(entry: dict[str, Any], key: str, known: dict[str, Any], where: str) -> dict[str, Any]:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: `{key}` must be an object, got {type(value).__name__}")
    for k, v in value.items():
        if k not in known:
            raise DataError(f"{where}: `{key}` key {k!r} is not supported (expected one of {', '.join(known)})")
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: `{key}.{k}` must be a string, got {type(v).__name__}")
    return value


def _take_columns(record: dict[str, Any], columns: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """Rename the mapped columns of `record` to prism's field names (sharegpt record keys)."""
    out = dict(record)
    for field in fields:
        column = columns.get(field)
        if column and column in out:
            out[field] = out.pop(column)
    return out


def _from_sharegpt_columns(record: dict[str, Any], columns: dict[str, Any], tags: dict[str, Any], source: str
                           ) -> dict[str, Any]:
    """A LLaMA-Factory sharegpt record with custom columns / tags -> a plain sharegpt record."""
    out = dict(record)
    turns = out.pop(columns["messages"], None)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: column {columns['messages']!r} is not a non-empty list of messages")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{source}: message {i} is a {type(turn).__name__}, not an object")
        role = turn.get(tags["role_tag"])
        if role not in roles:
            tool = " (observation / function turns are not supported)" if role in (
                tags["observation_tag"], tags["function_tag"]) else ""
            raise DataError(f"{source}: unknown role {role!r} in message {i} under {tags['role_tag']!r} "
                            f"(expected one of {', '.join(map(str, roles))}){tool}")
        messages.append({"role": roles[role], "content": turn.get(tags["content_tag"])})
    out = _take_columns(out, columns, ("images", "videos", "audios", "system", "tools"))
    return {**out, "messages": messages}


def _from_alpaca_columns(record: dict[str, Any], columns: dict[str, Any], source: str) -> dict[str, Any]:
    """A LLaMA-Factory alpaca record -> a sharegpt record: history pairs, then the user turn
    `prompt` + "\\n" + `query`, then `response` (if any) as the assistant turn."""
    out, messages = dict(record), []
    history = out.pop(columns["history"], None) if columns.get("history") else None
    for pair in history or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{source}: column {columns['history']!r} must hold [query, response] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    parts = []
    for field in ("prompt", "query"):
        value = out.pop(columns[field], None) if columns.get(field) else None
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source}: column {columns[field]!r} must be a string, got {type(value).__name__}")
        parts += [value] if value else []
    if not parts:
        raise DataError(f"{source}: no prompt: columns {columns['prompt']!r} / {columns['query']!r} are missing or empty")
    messages.append({"role": "user", "content": "\n".join(parts)})
    response = out.pop(columns["response"], None) if columns.get("response") else None
    if response is not None and not isinstance(response, str):
        raise DataError(f"{source}: column {columns['response']!r} must be a string, got {type(response).__name__}")
    if response:
        messages.append({"role": "assistant", "content": response})
    out = _take_columns(out, columns, ("images", "videos", "audios", "system", "tools"))
    return {**out, "messages": messages}


# ---------------------------------------------------------------------------------- reading


def _read_records(path: Path, shard: Shard | None = None) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield (source, record) pairs; a record that cannot be parsed is yielded as a DataError
    so that skip_bad can drop it. Errors that spoil the whole file are raised. JSONL is read a line
    at a time (only the lines of `shard`, when given); a JSON list is parsed whole."""
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if shard is None and _first_char(path) == "[":  # a JSON list: one parse error spoils the whole file
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        numbered: Iterator[tuple[str, Any]] = ((f"{path}:{i}", r) for i, r in enumerate(records))
    else:  # JSONL: one object per non-blank line
        numbered = ((f"{path}:{n}", _parse_line(line)) for n, line in _jsonl_lines(path, shard) if line.strip())
    for source, record in numbered:
        if isinstance(record, json.JSONDecodeError):
            yield source, DataError(f"{source}: invalid JSON: {record.msg} (column {record.colno})")
        elif not isinstance(record, dict):
            yield source, DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        else:
            yield source, record


def _jsonl_lines(path: Path, shard: Shard | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines of a JSONL file or of one shard of it, streamed. A file whose
    first line is a LLaMA-Factory dataset index is refused (it is named as DIR#NAME, not read)."""
    start, end, number = (shard.start, shard.end, shard.line) if shard else (0, None, 1)
    checked = start != 0  # the index check looks at the file's first non-blank line
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text: {e}") from None
            if not checked and line.strip():
                _refuse_index(path, line)
                checked = True
            yield number, line
            number += 1


def _refuse_index(path: Path, first_line: str) -> None:
    first = _parse_line(first_line)
    if isinstance(first, Exception) and path.stat().st_size < 1 << 26:  # a pretty-printed object: parse it all
        first = _parse_line(path.read_text(encoding="utf-8", errors="replace"))
    if _looks_like_index(first):
        raise DataError(_index_hint(path, path))  # a dataset_info.json under another name


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
    `ground_truth` or `solution` may stand in for `answer` (a list: the first element is the
    answer, the rest go to meta["equivalent_answers"]). Content may be a list of parts (`_messages`).
    """
    record = dict(record)
    _refuse_media(record, source)
    turns = record.pop("messages") if "messages" in record else record.pop("conversations", None)
    bounds: list = []
    messages, carried = _messages(turns, source, bounds)
    if any(bounds):  # the image parts' own pixel bounds, one per image (prism.data.images)
        record["image_pixels"] = bounds
    system = record.pop("system", None)
    if system:
        messages.insert(0, {"role": "system", "content": str(system)})
    images = _merge_images(record.pop("images", None), carried, root, source)
    answer_key = next((k for k in ANSWER_KEYS if k in record), None)
    answer = record.pop(answer_key) if answer_key else None
    answer = _answers(answer, record.pop("equivalent_answers", None), record)
    return Example(messages, images, answer, record, source)


def parse_verl(record: dict[str, Any], root: Path, source: str) -> Example:
    """verl RL row (prompt-only, no assistant turn):

        prompt: [{"role": "user", "content": "<image>..."}], images: [{"bytes", "path"} | path | bytes],
        reward_model: {"ground_truth": str | [str, ...], "equivalent_answers": [...], "style": ...},
        data_source, extra_info, ... -> meta

    A list ground truth gives `answer` = its first element; the rest and `equivalent_answers` go
    to meta["equivalent_answers"]. PRISM's alignment Parquet adds teacher columns: a full
    `teacher_response` becomes the assistant turn; failing that, `teacher_caption` + `teacher_cot`
    make `<caption>…</caption><think>…</think><answer>{ground truth}</answer>`. Unused teacher_*
    columns go to meta.
    """
    record = dict(record)
    _refuse_media(record, source)
    bounds: list = []
    messages, carried = _messages(record.pop("prompt", None), source, bounds)
    if any(bounds):
        record["image_pixels"] = bounds
    images = _merge_images(record.pop("images", None), carried, root, source)
    reward_model = dict(record.pop("reward_model", None) or {})
    answer = _answers(reward_model.pop("ground_truth", None), reward_model.pop("equivalent_answers", None), record)
    if reward_model:  # e.g. {"style": "rule"}: keep what is not the answer
        record["reward_model"] = reward_model
    reference = _teacher_reference(record, answer)
    if reference is not None:
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{source}: prompt already ends with an assistant turn; cannot add the teacher reference")
        messages.append({"role": "assistant", "content": reference})
    return Example(messages, images, answer, record, source)


def _teacher_reference(record: dict[str, Any], answer: str | None) -> str | None:
    """Pop the teacher columns that make the reference response; drop empty ones; keep the rest."""
    teacher = {k: record.pop(k) for k in TEACHER_KEYS if k in record}
    response, caption, cot = (teacher.get(k) for k in TEACHER_KEYS)
    reference = None
    if isinstance(response, str) and response.strip():
        reference = str(teacher.pop("teacher_response"))
    elif isinstance(caption, str) and isinstance(cot, str) and caption.strip() and cot.strip() and answer:
        reference = f"<caption>{teacher.pop('teacher_caption')}</caption><think>{teacher.pop('teacher_cot')}</think>"
        reference += f"<answer>{answer}</answer>"
    record.update({k: v for k, v in teacher.items() if v is not None})
    return reference


def parse_prism(record: dict[str, Any], root: Path, source: str) -> Example:
    """prism JSONL record:

        {"image": "rel.png"} or {"images": [...]}, "question": str, "response": optional reference
        response, "answer": optional, ...anything else -> meta

    One `<image>` per image is prepended to the question unless it already has placeholders.
    """
    record = dict(record)
    _refuse_media(record, source)
    refs = record.pop("images") if "images" in record else record.pop("image", None)
    images = resolve_images(refs, root, source)
    question = record.pop("question", None)
    if not isinstance(question, str):
        raise DataError(f"{source}: `question` must be a string, got {type(question).__name__}")
    if IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER * len(images) + question
    messages = [{"role": "user", "content": question}]
    response = record.pop("response", None)
    if response is not None:
        messages.append({"role": "assistant", "content": str(response)})
    answer = _answers(record.pop("answer", None), record.pop("equivalent_answers", None), record)
    return Example(messages, images, answer, record, source)


PARSERS: dict[str, Parser] = {
    "sharegpt": parse_sharegpt,
    "verl": parse_verl,
    "prism": parse_prism,
}


def _messages(turns: Any, source: str, bounds: list | None = None) -> tuple[list[dict[str, str]], list[Any]]:
    """Normalise {role, content} / {from, value} turns. Content may also be a list of parts:
    text ({"type": "text", "text" | "value": str}) and images ({"type": "image"} or
    {"type": "image" | "image_url", "value" | "image" | "image_url": path | URL | bytes | {"url"}}).
    An image part becomes an `<image>` placeholder; the images parts carry are returned, in order, and
    `bounds` gets each placeholder's own pixel bounds (qwen-vl-utils' min_pixels / max_pixels; None)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: expected a non-empty list of messages, got {type(turns).__name__}")
    messages, carried = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{source}: message {i} is a {type(turn).__name__}, not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLES:
            expected = ", ".join(ROLES)
            raise DataError(f"{source}: unknown role {role!r} in message {i} (expected one of {expected})")
        if isinstance(content, list):
            content = "".join(_part_text(part, i, source, carried, bounds) for part in content)
        elif isinstance(content, str) and bounds is not None:
            bounds.extend([None] * content.count(IMAGE_PLACEHOLDER))
        if not isinstance(content, str):
            raise DataError(f"{source}: message {i} has no string content (got {type(content).__name__})")
        messages.append({"role": ROLES[role], "content": content})
    return messages, carried


def _part_text(part: Any, i: int, source: str, carried: list[Any], bounds: list | None = None) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise DataError(f"{source}: message {i} has a text part without a string `text`/`value`")
        if bounds is not None:
            bounds.extend([None] * text.count(IMAGE_PLACEHOLDER))
        return text
    if kind in ("image", "image_url"):
        ref = part.get("value", part.get(kind))
        ref = ref.get("url") if isinstance(ref, dict) and "url" in ref else ref
        if ref is not None:
            carried.append(ref)
        if bounds is not None:
            bounds.append(part_pixel_bounds(part, source))
        return IMAGE_PLACEHOLDER
    if isinstance(kind, str) and kind.startswith("video"):
        raise DataError(f"{source}: videos are not supported yet (content part of type {kind!r} in message {i})")
    what = f"of type {kind!r}" if isinstance(part, dict) else f"that is a {type(part).__name__}"
    raise DataError(f"{source}: message {i} has a content part {what}, which prism cannot use "
                    "(expected text, image or image_url)")


def _merge_images(listed: Any, carried: list[Any], root: Path, source: str) -> list[ImageRef]:
    """The record's `images`, or else the images its content parts carry; if both, counts must agree."""
    images = resolve_images(listed, root, source)
    if carried and images and len(carried) != len(images):
        raise DataError(f"{source}: {len(carried)} image part(s) carry an image but `images` lists {len(images)}")
    return images or resolve_images(carried, root, source)


def _refuse_media(record: dict[str, Any], source: str) -> None:
    """Videos / audio are refused, never dropped: prism trains on images only (so far)."""
    for key in UNSUPPORTED_MEDIA:
        if record.pop(key, None) not in (None, [], ""):
            kind = "videos" if key.startswith("video") else "audio"
            raise DataError(f"{source}: {kind} are not supported yet (record key `{key}`); use image data")


def _answers(answer: Any, alternatives: Any, meta: dict[str, Any]) -> str | None:
    """The answer as text; a list answer gives its first element, and the rest plus
    `alternatives` go to meta["equivalent_answers"] (a list of strings)."""
    extra: list[Any] = []
    if isinstance(answer, (list, tuple)):
        answer, extra = (answer[0] if answer else None), list(answer[1:])
    if alternatives is not None:
        extra += list(alternatives) if isinstance(alternatives, (list, tuple)) else [alternatives]
    texts = [_answer_text(a) for a in extra if a is not None]
    if texts:
        meta["equivalent_answers"] = texts
    return _answer_text(answer)


def _answer_text(answer: Any) -> str | None:
    """Ground truth as text: strings unchanged, numbers / dicts as JSON (3 -> "3")."""
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
        for tag in ("<video>", "<audio>"):
            if tag in message["content"]:
                kind = "videos" if tag == "<video>" else "audio"
                raise DataError(f"{source}: {kind} are not supported yet ({tag} placeholder in message {i}); use image data")
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
            reason = verified_path(ref) if isinstance(ref, str) else image_fault(ref)
            if reason:
                what = ref if isinstance(ref, str) else f"<{len(ref)} bytes>"
                raise DataError(f"{source}: corrupt image {what}: {reason}")


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
