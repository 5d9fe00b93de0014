"""`prism.data.corpus.Corpus`: the parsed, measured demonstrations cached once on disk and reused."""

import base64
import copy
import io
import json
import pickle
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

import prism.data.corpus as corpus_module
from prism.core.errors import DataError
from prism.data.collate import token_lengths
from prism.data.corpus import Corpus
from prism.data.formats import load_examples


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (7, 8, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def record(i: int, images: list) -> dict:
    user = "<image>" * len(images) + f"what is shown in picture {i}? " + "and why " * (i % 5)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}],
            "images": images, "answer": str(i), "topic": f"t{i % 2}"}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    png(tmp_path / "img" / "a.png", (32, 24), (255, 0, 0))
    png(tmp_path / "img" / "b.png", (64, 64), (0, 255, 0))
    records = [record(i, [["img/a.png"], ["img/b.png"], [], ["img/a.png", "img/b.png"]][i % 4]) for i in range(12)]
    return write_jsonl(tmp_path / "train.jsonl", records)


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """How many builds parsed the data file."""
    calls: list[int] = []
    real = corpus_module.iter_examples

    def counted(*args, **kwargs):
        calls.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "iter_examples", counted)
    return calls


def build(path, processor, cache, **kw):
    kw.setdefault("max_length", 10_000)
    return Corpus.build_or_load(path, processor, cache_dir=cache, **kw)


def assert_same(corpus, examples, lengths):
    assert len(corpus) == len(examples)
    assert list(corpus.lengths) == lengths
    for got, want in zip(corpus.examples(range(len(corpus))), examples):
        assert (got.messages, got.images, got.answer, got.meta, got.source) == (
            want.messages, want.images, want.answer, want.meta, want.source)
    assert corpus[3].messages == examples[3].messages and corpus[-1].source == examples[-1].source


def test_corpus_equals_load_examples_and_token_lengths(data, tiny_processor, tmp_path):
    corpus = build(data, tiny_processor, tmp_path / "cache")
    examples = load_examples(data, require_response=True)
    assert_same(corpus, examples, token_lengths(tiny_processor, examples))
    assert corpus[0].images == [str(data.parent / "img" / "a.png")]


def test_embedded_image_bytes_round_trip(tmp_path, tiny_processor):
    blob = png_bytes((16, 16))
    png(tmp_path / "img.png", (8, 8), (1, 1, 1))
    url = "data:image/png;base64," + base64.b64encode(blob).decode()
    path = write_jsonl(tmp_path / "d.jsonl", [record(0, ["img.png"]), record(1, [url])])
    corpus = build(path, tiny_processor, tmp_path / "cache")
    assert corpus[1].images == [blob] and corpus[0].images == [str(tmp_path / "img.png")]
    assert list(corpus.lengths) == token_lengths(tiny_processor, load_examples(path))


def test_second_load_is_a_cache_hit(data, tiny_processor, tmp_path, parses):
    first = build(data, tiny_processor, tmp_path / "cache")
    assert len(parses) == 1
    t0 = time.perf_counter()
    second = build(data, tiny_processor, tmp_path / "cache")
    assert time.perf_counter() - t0 < 2.0
    assert len(parses) == 1 and second == first
    assert_same(second, list(first.examples(range(len(first)))), list(first.lengths))


def test_changed_file_max_length_or_image_settings_miss(data, tiny_processor, tmp_path, parses):
    cache = tmp_path / "cache"
    base = build(data, tiny_processor, cache)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines + [lines[0]]) + "\n")  # one more line
    longer = build(data, tiny_processor, cache)
    assert len(parses) == 2 and len(longer) == len(base) + 1 and longer.cache != base.cache

    shorter = build(data, tiny_processor, cache, max_length=int(sorted(longer.lengths)[len(longer) // 2]))
    assert len(parses) == 3 and 0 < len(shorter) < len(longer)

    small = copy.deepcopy(tiny_processor)
    small.image_processor.size.longest_edge = 16 * 16  # max pixels
    other = build(data, small, cache)
    assert len(parses) == 4 and other.cache != longer.cache
    assert list(other.lengths) != list(longer.lengths)  # pixel limits change image token counts
    assert list(other.lengths) == token_lengths(small, load_examples(data))
    assert len({p.name for p in cache.iterdir()}) == 4


def test_examples_over_max_length_are_dropped_with_the_usual_warning(data, tiny_processor, tmp_path, caplog):
    lengths = token_lengths(tiny_processor, load_examples(data))
    limit = sorted(lengths)[len(lengths) // 2]
    for _ in range(2):  # built, then loaded: both launches say so
        caplog.clear()
        corpus = build(data, tiny_processor, tmp_path / "cache", max_length=limit)
        n_kept = sum(n <= limit for n in lengths)
        assert len(corpus) == n_kept and all(n <= limit for n in corpus.lengths)
        assert f"{data}: dropped {len(lengths) - n_kept} of {len(lengths)} examples longer than " \
               f"data.max_length={limit}" in caplog.text


def test_corrupt_image_names_file_line_and_skip_bad_drops_it(data, tiny_processor, tmp_path):
    (data.parent / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines = data.read_text().splitlines()
    lines.insert(2, json.dumps(record(99, ["bad.png"])))
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        build(data, tiny_processor, tmp_path / "cache")
    assert str(error.value).startswith(f"{data}:3: corrupt image")
    with pytest.raises(DataError) as expected:
        load_examples(data, require_response=True)
    assert str(error.value) == str(expected.value)
    assert not any((tmp_path / "cache").glob("*/prism_corpus.json"))

    for _ in range(2):  # built, then loaded
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            corpus = build(data, tiny_processor, tmp_path / "cache", skip_bad=True)
        assert len(corpus) == len(lines) - 1 and all(ex.answer != "99" for ex in corpus)
        message = " ".join(str(w.message) for w in caught)
        assert f"{data}: skipped 1 bad example(s); first: {data}:3: corrupt image" in message


def test_damaged_cache_is_rebuilt(data, tiny_processor, tmp_path, parses):
    corpus = build(data, tiny_processor, tmp_path / "cache")
    arrow = next(corpus.cache.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    again = build(data, tiny_processor, tmp_path / "cache")
    assert len(parses) == 2
    examples = load_examples(data, require_response=True)
    assert_same(again, examples, token_lengths(tiny_processor, examples))

    (again.cache / "prism_corpus.json").unlink()  # a half-written cache has no manifest
    build(data, tiny_processor, tmp_path / "cache")
    assert len(parses) == 3


def test_corpus_pickles_as_its_path(data, tiny_processor, tmp_path):
    corpus = build(data, tiny_processor, tmp_path / "cache")
    blob = pickle.dumps(corpus)
    assert len(blob) < 1000
    back = pickle.loads(blob)
    assert back == corpus and len(back) == len(corpus) and list(back.lengths) == list(corpus.lengths)
    assert [ex.messages for ex in back] == [ex.messages for ex in corpus]


def test_cache_root_from_prism_cache(data, tiny_processor, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "pc"))
    corpus = Corpus.build_or_load(data, tiny_processor, max_length=10_000)
    assert corpus.cache.parent == tmp_path / "pc" / "corpus"
    assert not list(corpus.cache.parent.glob(".*"))  # no temporary folder left behind


def test_shards_split_a_jsonl_file_at_line_starts(tmp_path):
    from prism.data.formats import shards

    lines = ["", *(json.dumps(record(i, [])) for i in range(9)), "", json.dumps(record(9, []))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = path.read_bytes()
    for n in (1, 2, 3, 5, 50):
        parts = shards(path, n)
        if n == 1:
            assert parts == [None]
            continue
        assert 1 < len(parts) <= n and parts[0].start == 0 and parts[-1].end == len(raw)
        for a, b in zip(parts, parts[1:]):
            assert a.end == b.start and raw[b.start - 1:b.start] == b"\n"  # consecutive, at line starts
        for part in parts:  # each part's first line number is that of its first byte
            assert part.line == raw[:part.start].count(b"\n") + 1
    # a JSON list or a Parquet file is read whole by one reader
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps([record(i, []) for i in range(20)], indent=1))
    assert shards(listed, 4) == [None]


def test_parallel_build_equals_serial_and_reports_the_earliest_fault(data, tiny_processor, tmp_path):
    lines = data.read_text().splitlines() * 3  # 36 examples, so each of 3 readers has some
    data.write_text("\n".join(lines) + "\n")
    serial = build(data, tiny_processor, tmp_path / "serial")
    parallel = build(data, tiny_processor, tmp_path / "parallel", num_proc=3)
    assert_same(parallel, list(serial.examples(range(len(serial)))), list(serial.lengths))
    assert [ex.source for ex in parallel] == [f"{data}:{i}" for i in range(1, 37)]  # file order, right lines

    # a corrupt image in the last part and another in the first: the error names the earliest one
    (data.parent / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines[30] = json.dumps(record(98, ["bad.png"]))
    lines[4] = json.dumps(record(99, ["bad.png"]))
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{data}:5: corrupt image"):
        build(data, tiny_processor, tmp_path / "parallel", num_proc=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = build(data, tiny_processor, tmp_path / "parallel", num_proc=3, skip_bad=True)
    assert len(kept) == 34 and {ex.answer for ex in kept}.isdisjoint({"98", "99"})
    assert f"{data}: skipped 2 bad example(s); first: {data}:5: corrupt image" in " ".join(
        str(w.message) for w in caught)

    lengths = list(serial.lengths)
    limit = sorted(lengths)[len(lengths) // 2]  # over max_length: dropped in every part, counted once
    data.write_text("\n".join(lines[:4] + lines[5:30] + lines[31:]) + "\n")
    short = build(data, tiny_processor, tmp_path / "parallel", num_proc=3, max_length=limit)
    assert len(short) == sum(n <= limit for n in token_lengths(tiny_processor, load_examples(data)))
    assert short.manifest["n_dropped"] == 34 - len(short)


def test_image_size_names_each_example_reading_a_bad_file(tmp_path):
    from prism.data.images import image_size

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for source in ("a.jsonl:1", "a.jsonl:7"):  # the header's failure is cached, the example is not
        with pytest.raises(DataError, match=rf"^{source}: cannot read image {bad}"):
            image_size(str(bad), source)
    good = png(tmp_path / "good.png", (40, 30), (1, 2, 3))
    assert image_size(str(good), "x") == (40, 30)
