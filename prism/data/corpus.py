"""`Corpus`: the SFT demonstrations of a data file, parsed, validated and measured once, then reused.

The first launch reads the file the way `load_examples(path, format, require_response=True,
skip_bad=...)` does (same checks, same "file:line" errors), measures every example with
`token_lengths`, drops those longer than `max_length` and writes the rest to a memory-mapped Arrow
cache (Hugging Face `datasets`, `save_to_disk`). Later launches with the same key open that cache in
seconds and hold almost nothing in memory: rows are turned back into `Example`s on demand.

Cache key (a SHA-256 of): the data file's resolved path, size and mtime_ns (for `DIR#NAME`, the
dataset index's and the data file's); the format; require_response; skip_bad; max_length; the
processor's identity (tokenizer name_or_path and size, the chat template text, the image
processor's settings, since pixel limits change lengths); `SCHEMA_VERSION`. Location:
`cache_dir`, else `$PRISM_CACHE/corpus`, else `~/.cache/prism/corpus`, then `/<hash>`. A cache is
built in a temporary folder next to it and renamed into place, so a reader never sees half of one;
a cache that fails its check (missing manifest, truncated or unreadable files) is rebuilt.

Several processes: build in the main process first, then let the others load, e.g.

    with accelerator.main_process_first():
        corpus = Corpus.build_or_load(path, processor, max_length=4096)

(Without it every process would build its own copy at once: still correct, since renames are atomic
and the loser loads the winner's cache, but wasteful.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from prism.core.errors import DataError
from prism.core.example import Example
from prism.core.files import write_atomic
from prism.data.collate import token_lengths
from prism.data.formats import (
    Shard,
    Skipped,
    dataset_reference,
    iter_examples,
    resolve_source,
    shards,
)

log = logging.getLogger("prism.data.corpus")

SCHEMA_VERSION = 1
MANIFEST = "prism_corpus.json"
BYTES_REF = "\0bytes"  # in `images`: "the next entry of `image_bytes`"
CHUNK = 1024  # examples measured at a time (and read back at a time by `__iter__`)


class Corpus:
    """Demonstrations read from a memory-mapped Arrow cache; `corpus[i]` is an `Example`.

    Columns: messages (JSON text), images (paths; BYTES_REF where the image is embedded), image_bytes
    (the embedded images, in order), answer, meta (JSON text), source ("file:line"), length (int32
    tokens, `prism.data.collate.token_lengths`). Pickling sends only the cache folder's path.
    """

    def __init__(self, cache: str | Path):
        self.cache = Path(cache)
        self._open()

    def _open(self) -> None:
        from datasets import load_from_disk

        self.manifest = _read_manifest(self.cache)
        self._ds = load_from_disk(str(self.cache / "data"))
        self._lengths = None

    # ------------------------------------------------------------------------------ building

    @classmethod
    def build_or_load(
        cls, path: str | Path, processor, *, format: str = "auto", max_length: int, skip_bad: bool = False,
        require_response: bool = True, num_proc: int | None = None, cache_dir: str | Path | None = None,
    ) -> Corpus:
        """The corpus of `path` for `processor`: loaded from its cache, or built (and cached) on a miss.

        Warnings of the build (bad examples skipped, examples dropped for length) are given again on
        every load, so each launch says what its data lost.
        """
        key = fingerprint(path, processor, format=format, max_length=max_length, skip_bad=skip_bad,
                          require_response=require_response)
        root = Path(cache_dir) if cache_dir is not None else default_cache_root()
        target = root / key
        corpus = _try_open(target)
        if corpus is None:
            shutil.rmtree(target, ignore_errors=True)  # partial or corrupt: rebuild
            corpus = _build(target, key, path, processor, format, max_length, skip_bad, require_response, num_proc)
        corpus._report(path, max_length)
        return corpus

    def _report(self, path: str | Path, max_length: int) -> None:
        m = self.manifest
        if m["n_bad"]:
            warnings.warn(f"{m['bad_file']}: skipped {m['n_bad']} bad example(s); first: {m['first_bad']}",
                          stacklevel=3)
        if m["n_dropped"]:
            log.warning("%s: dropped %d of %d examples longer than data.max_length=%d",
                        path, m["n_dropped"], m["n_dropped"] + len(self), max_length)

    # ------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._ds.num_rows

    @property
    def lengths(self):
        """Token length of every example (a numpy int32 array, read from the column once)."""
        if self._lengths is None:
            self._lengths = self._ds.data.column("length").to_numpy()
        return self._lengths

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"corpus index {i} out of range ({len(self)} examples)")
        return _example(self._ds[int(i) % len(self)])

    def examples(self, indices: Sequence[int]) -> list[Example]:
        """The examples at `indices`, in that order (one Arrow read)."""
        rows = self._ds[list(map(int, indices))]
        return [_example({k: rows[k][j] for k in rows}) for j in range(len(indices))]

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), CHUNK):
            yield from self.examples(range(start, min(start + CHUNK, len(self))))

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": str(self.cache)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache = Path(state["cache"])
        self._open()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Corpus) and self.cache.resolve() == other.cache.resolve()

    def __hash__(self) -> int:
        return hash(str(self.cache.resolve()))

    def __repr__(self) -> str:
        return f"Corpus({len(self)} examples, {self.cache})"


def default_cache_root() -> Path:
    """`$PRISM_CACHE/corpus`, else `~/.cache/prism/corpus`."""
    base = os.environ.get("PRISM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "prism") / "corpus"


# ---------------------------------------------------------------------------------- the key


def fingerprint(path: str | Path, processor, *, format: str, max_length: int, skip_bad: bool,
                require_response: bool = True) -> str:
    """The cache key (hex SHA-256) of a corpus: see the module docstring."""
    key = {
        "schema": SCHEMA_VERSION,
        "files": _file_identity(path),
        "format": format,
        "require_response": require_response,
        "skip_bad": skip_bad,
        "max_length": max_length,
        "processor": processor_identity(processor),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()


def processor_identity(processor) -> dict[str, Any]:
    """What of a processor decides token lengths: tokenizer, chat template, image settings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image = getattr(processor, "image_processor", None)
    settings = image.to_dict() if image is not None and hasattr(image, "to_dict") else {}
    for name in ("min_pixels", "max_pixels", "patch_size", "merge_size"):
        if image is not None and getattr(image, name, None) is not None:
            settings[name] = getattr(image, name)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    return {"tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab": len(tokenizer),
            "class": type(processor).__name__, "chat_template": template, "image_processor": settings}


def _file_identity(path: str | Path) -> list[list[Any]]:
    files = [Path(str(path))]
    reference = dataset_reference(path)
    if reference is not None:  # DIR#NAME: the index and the data file it names
        files = [reference[0]]
        try:
            files.append(resolve_source(path)[0])
        except DataError:
            pass  # the build reports it
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(f), None, None])
    return out


# ---------------------------------------------------------------------------------- build / open


def _try_open(target: Path) -> Corpus | None:
    if not (target / MANIFEST).is_file():
        return None
    try:
        corpus = Corpus(target)
        _check_files(target, corpus.manifest["files"])
        if len(corpus) != corpus.manifest["rows"]:
            raise ValueError("row count")
        return corpus
    except Exception as e:  # noqa: BLE001 - any damage means: build again
        log.warning("%s: corpus cache is damaged (%s: %s); rebuilding", target, type(e).__name__, e)
        return None


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_files(target: Path, expected: dict[str, int]) -> None:
    found = _file_sizes(target / "data")
    if found != expected:
        raise ValueError("files differ from the manifest (truncated or partial cache)")


def _read_manifest(cache: Path) -> dict[str, Any]:
    return json.loads((cache / MANIFEST).read_text(encoding="utf-8"))


def _build(target: Path, key: str, path: str | Path, processor, format: str, max_length: int, skip_bad: bool,
           require_response: bool, num_proc: int | None) -> Corpus:
    """Read, check and measure the examples of `path` into `target`: `num_proc` processes each take one
    consecutive part of a JSONL file (`formats.shards`; other files are read by one), and each writes
    what it skipped, dropped or failed on to a small JSON file that is gathered here in file order."""
    import datasets

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=target.parent))
    try:
        parts = shards(path, num_proc or 1)
        features = datasets.Features({
            "messages": datasets.Value("string"), "images": datasets.Sequence(datasets.Value("string")),
            "image_bytes": datasets.Sequence(datasets.Value("binary")), "answer": datasets.Value("string"),
            "meta": datasets.Value("string"), "source": datasets.Value("string"), "length": datasets.Value("int32"),
        })
        was_enabled = datasets.is_caching_enabled()
        datasets.disable_caching()  # nothing of this build may be found again by `datasets` itself
        datasets.disable_progress_bars()
        settings = {"path": path, "format": format, "require_response": require_response, "skip_bad": skip_bad,
                    "processor": processor, "max_length": max_length, "stats_dir": str(tmp)}
        failure = None
        try:
            ds = datasets.Dataset.from_generator(
                _rows, features=features, cache_dir=str(tmp / "hf"), num_proc=len(parts) if len(parts) > 1 else None,
                gen_kwargs={"part": list(enumerate(parts)), "settings": [settings] * len(parts)})
        except Exception as e:  # `datasets` reports a reader that stopped on an error its own way
            ds, failure = None, e
        finally:
            if was_enabled:
                datasets.enable_caching()
        stats = _gather_stats(tmp, len(parts))
        if stats["error"]:
            raise DataError(stats["error"]) from None
        if failure is not None and not stats["complete"]:
            raise failure
        if ds is None or len(ds) == 0:
            if stats["rows"] and not stats["dropped"] < stats["rows"]:
                raise DataError(f"{path}: no examples left after filtering by data.max_length={max_length}")
            bad = f" ({stats['n_bad']} bad ones skipped)" if stats["n_bad"] else ""
            raise DataError(f"{stats['file']}: no examples{bad}")
        kept = len(ds)
        ds.save_to_disk(str(tmp / "data"))
        del ds
        shutil.rmtree(tmp / "hf", ignore_errors=True)
        manifest = {"schema": SCHEMA_VERSION, "key": key, "path": str(path), "rows": kept,
                    "n_dropped": stats["dropped"], "n_bad": stats["n_bad"], "first_bad": stats["first_bad"],
                    "bad_file": stats["file"], "files": _file_sizes(tmp / "data")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: marks it whole
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use its cache
            if _try_open(target) is None:
                raise
        return Corpus(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(part: list[tuple[int, Shard | None]], settings: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows of one part of the file (`datasets` hands each process a list of one): every valid
    example (`formats.iter_examples`, the reader of `load_examples`), measured `CHUNK` at a time with
    `token_lengths`, those over max_length dropped. The part's counts, and its first error (without
    skip_bad, which ends it), go to `stats-<k>.json` so that the error reaches the caller unwrapped."""
    (k, shard), = part
    s = settings[0]
    skipped = Skipped(file=Path(str(s["path"])))
    stats: dict[str, Any] = {"rows": 0, "dropped": 0, "error": None, "complete": False}
    try:
        examples = iter_examples(s["path"], s["format"], require_response=s["require_response"],
                                 skip_bad=s["skip_bad"], skipped=skipped, shard=shard)
        while batch := list(islice(examples, CHUNK)):
            for ex, length in zip(batch, token_lengths(s["processor"], batch)):
                stats["rows"] += 1
                if length > s["max_length"]:
                    stats["dropped"] += 1
                else:
                    yield {**_row(ex), "length": length}
        stats["complete"] = True
    except DataError as e:
        stats["error"] = str(e)
    finally:
        stats.update(n_bad=skipped.n, first_bad=skipped.first, file=str(skipped.file))
        write_atomic(Path(s["stats_dir"]) / f"stats-{k}.json", json.dumps(stats))


def _gather_stats(folder: Path, n: int) -> dict[str, Any]:
    """The parts' counts summed, in file order: the first error and the first bad example are the
    earliest in the file."""
    out: dict[str, Any] = {"rows": 0, "dropped": 0, "n_bad": 0, "first_bad": "", "error": None, "file": "",
                           "complete": True}
    for k in range(n):
        f = folder / f"stats-{k}.json"
        if not f.is_file():  # that reader never finished (killed, or an error `datasets` raised)
            out["complete"] = False
            continue
        part = json.loads(f.read_text(encoding="utf-8"))
        out["rows"] += part["rows"]
        out["dropped"] += part["dropped"]
        out["n_bad"] += part["n_bad"]
        out["first_bad"] = out["first_bad"] or part["first_bad"]
        out["error"] = out["error"] or part["error"]
        out["file"] = out["file"] or part["file"]
        out["complete"] = out["complete"] and part["complete"]
    return out


def _row(example: Example) -> dict[str, Any]:
    images, blobs = [], []
    for ref in example.images:
        if isinstance(ref, str):
            images.append(ref)
            continue
        if isinstance(ref, Image.Image):
            buffer = io.BytesIO()
            ref.save(buffer, format="PNG")  # lossless: the same pixels come back
            ref = buffer.getvalue()
        images.append(BYTES_REF)
        blobs.append(bytes(ref))
    return {"messages": json.dumps(example.messages, ensure_ascii=False), "images": images, "image_bytes": blobs,
            "answer": example.answer, "meta": json.dumps(example.meta, ensure_ascii=False, default=str),
            "source": example.source}


def _example(row: dict[str, Any]) -> Example:
    blobs = iter(row["image_bytes"] or [])
    images = [next(blobs) if ref == BYTES_REF else ref for ref in row["images"] or []]
    return Example(messages=json.loads(row["messages"]), images=images, answer=row["answer"],
                   meta=json.loads(row["meta"]), source=row["source"])
