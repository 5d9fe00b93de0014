"""Loaders for sharegpt JSON/JSONL, verl Parquet, prism JSONL and LLaMA-Factory dataset_info.json; the sharegpt writer."""

import base64
import io
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism.core.errors import DataError
from prism.core.example import load_image
from prism.data.formats import load_dataset_info, load_examples, save_sharegpt_jsonl


def make_png(path: Path, color: tuple[int, int, int]) -> Path:
    """A 4x3 image with one odd pixel, so that orientation mistakes would show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (4, 3), color)
    image.putpixel((0, 0), (1, 2, 3))
    image.save(path)
    return path


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (4, 3), color)
    image.putpixel((3, 2), (9, 8, 7))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(ref) -> bytes:
    return load_image(ref).tobytes()


def write_jsonl(path: Path, records: list) -> Path:
    # A str record is written as is (for invalid JSON lines).
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


RED, BLUE = (200, 0, 0), (0, 0, 200)


# ----------------------------------------------------------------------------- sharegpt


def sharegpt_record(style: str, image: str) -> dict:
    if style == "messages":
        turns = [
            {"role": "user", "content": "<image>How many stars?"},
            {"role": "assistant", "content": "<answer>3</answer>"},
        ]
    else:
        turns = [{"from": "human", "value": "<image>How many stars?"}, {"from": "gpt", "value": "<answer>3</answer>"}]
    return {style: turns, "images": [image], "system": "Be brief.", "answer": "3",
            "scene": {"stars": 3}, "question_type": "count", "id": 7}


@pytest.mark.parametrize("container", ["json", "jsonl"])
@pytest.mark.parametrize("style", ["messages", "conversations"])
def test_sharegpt_loads_messages_images_answer_meta(tmp_path, container, style):
    image = make_png(tmp_path / "imgs" / "a.png", RED)
    record = sharegpt_record(style, "imgs/a.png")  # relative to the data file's directory
    path = tmp_path / f"data.{container}"
    if container == "json":
        path.write_text(json.dumps([record, record], indent=2))
    else:
        write_jsonl(path, [record, record])

    examples = load_examples(path)

    assert len(examples) == 2
    ex = examples[1]
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>How many stars?"},
        {"role": "assistant", "content": "<answer>3</answer>"},
    ]
    assert ex.images == [str(image)]
    assert pixels(ex.images[0]) == pixels(image)
    assert ex.answer == "3"
    assert ex.meta == {"scene": {"stars": 3}, "question_type": "count", "id": 7}
    # JSONL sources are 1-based lines; JSON-list sources are 0-based record indices.
    assert ex.source == f"{path}:{2 if container == 'jsonl' else 1}"


def test_sharegpt_absolute_paths_dict_images_and_alternative_answer_keys(tmp_path):
    image = make_png(tmp_path / "elsewhere" / "b.png", BLUE)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = write_jsonl(data_dir / "d.jsonl", [
        {"messages": [{"role": "user", "content": "<image>q"}], "images": [str(image)], "ground_truth": "x"},
        {"messages": [{"role": "user", "content": "<image>q"}], "images": [{"bytes": None, "path": str(image)}],
         "solution": 4},
    ])
    first, second = load_examples(path)
    assert first.images == second.images == [str(image)]
    assert (first.answer, first.meta) == ("x", {})
    assert (second.answer, second.meta) == ("4", {})  # non-string ground truth becomes JSON text


# ----------------------------------------------------------------------------- verl


def write_verl_parquet(path: Path, rows: list[dict]) -> Path:
    """Parquet as verl writes it: images are {bytes, path} structs, as `datasets` stores them."""
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def verl_row(index: int, image: bytes, n_placeholders: int = 1) -> dict:
    return {
        "data_source": "geo3k",
        "prompt": [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "<image>" * n_placeholders + f"Find x ({index})."},
        ],
        "images": [{"bytes": image, "path": None}],
        "ability": "math",
        "reward_model": {"ground_truth": str(index + 1), "style": "rule"},
        "extra_info": {"index": index, "split": "train"},
    }


def test_verl_parquet_with_image_bytes(tmp_path):
    image = png_bytes(RED)
    path = write_verl_parquet(tmp_path / "train.parquet", [verl_row(0, image), verl_row(1, png_bytes(BLUE))])

    examples = load_examples(path)

    assert len(examples) == 2
    ex = examples[1]
    assert ex.messages == [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "<image>Find x (1)."},
    ]
    assert ex.response is None  # prompt-only RL data
    assert pixels(examples[0].images[0]) == pixels(image)
    assert pixels(ex.images[0]) == pixels(png_bytes(BLUE))
    assert ex.answer == "2"
    assert ex.meta == {
        "data_source": "geo3k",
        "ability": "math",
        "reward_model": {"style": "rule"},
        "extra_info": {"index": 1, "split": "train"},
    }
    assert ex.source == f"{path}:1"


def test_verl_parquet_with_relative_image_paths(tmp_path):
    image = make_png(tmp_path / "imgs" / "c.png", BLUE)
    table = pa.Table.from_pylist([{
        "prompt": [{"role": "user", "content": "<image>what?"}],
        "images": ["imgs/c.png"],
        "reward_model": {"ground_truth": "blue"},
    }])
    pq.write_table(table, tmp_path / "d.parquet")
    (ex,) = load_examples(tmp_path / "d.parquet")
    assert ex.images == [str(image)] and ex.answer == "blue" and ex.meta == {}


# ----------------------------------------------------------------------------- prism


def test_prism_jsonl(tmp_path):
    a = make_png(tmp_path / "imgs" / "a.png", RED)
    b = make_png(tmp_path / "imgs" / "b.png", BLUE)
    path = write_jsonl(tmp_path / "prism.jsonl", [
        {"image": "imgs/a.png", "question": "Count.", "response": "<answer>3</answer>", "answer": "3", "grid": 3},
        {"images": ["imgs/a.png", "imgs/b.png"], "question": "Same?", "answer": "no"},
    ])

    first, second = load_examples(path)

    assert first.messages == [
        {"role": "user", "content": "<image>Count."},
        {"role": "assistant", "content": "<answer>3</answer>"},
    ]
    assert first.images == [str(a)] and first.answer == "3" and first.meta == {"grid": 3}
    assert second.messages == [{"role": "user", "content": "<image><image>Same?"}]  # no reference response
    assert [pixels(r) for r in second.images] == [pixels(a), pixels(b)]
    assert second.source == f"{path}:2"


# ----------------------------------------------------------------------------- round trip


def build_file(kind: str, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    make_png(src / "imgs" / "a.png", RED)
    if kind == "sharegpt":
        return write_jsonl(src / "d.jsonl", [sharegpt_record("conversations", "imgs/a.png")])
    if kind == "verl":
        return write_verl_parquet(src / "d.parquet", [verl_row(0, png_bytes(RED)), verl_row(1, png_bytes(BLUE))])
    return write_jsonl(src / "d.jsonl", [{"image": "imgs/a.png", "question": "q", "response": "r", "id": 1}])


@pytest.mark.parametrize("kind", ["sharegpt", "verl", "prism"])
def test_round_trip_through_sharegpt_jsonl(tmp_path, kind):
    original = load_examples(build_file(kind, tmp_path))
    out = save_sharegpt_jsonl(original, tmp_path / "out" / "data.jsonl")

    reloaded = load_examples(out, "sharegpt")

    assert len(reloaded) == len(original)
    for before, after in zip(original, reloaded):
        assert after.messages == before.messages
        assert after.answer == before.answer
        assert after.meta == before.meta
        assert [pixels(r) for r in after.images] == [pixels(r) for r in before.images]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for image in (i for record in written for i in record["images"]):
        assert not Path(image).is_absolute()  # paths relative to the output; bytes saved as PNG
        if kind == "verl":
            assert image.startswith("images/") and image.endswith(".png")


def test_save_writes_pil_images_as_png(tmp_path):
    from prism.core.example import Example

    ex = Example([{"role": "user", "content": "<image>hi"}], [Image.new("RGB", (2, 2), RED)])
    out = save_sharegpt_jsonl([ex], tmp_path / "x.jsonl")
    (back,) = load_examples(out)
    assert pixels(back.images[0]) == pixels(ex.images[0])
    assert back.answer is None and back.meta == {}


# ----------------------------------------------------------------------------- auto-detection


@pytest.mark.parametrize("kind, expected_user", [
    ("sharegpt", "<image>How many stars?"), ("verl", "<image>Find x (0)."), ("prism", "<image>q"),
])
def test_auto_detection_matches_explicit_format(tmp_path, kind, expected_user):
    path = build_file(kind, tmp_path)
    auto = load_examples(path)
    explicit = load_examples(path, kind)
    assert [e.messages for e in auto] == [e.messages for e in explicit]
    assert [m["content"] for m in auto[0].messages if m["role"] == "user"] == [expected_user]


def test_auto_detection_fails_on_unknown_keys(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the data format"):
        load_examples(path)


# ----------------------------------------------------------------------------- bad inputs

GOOD = {"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "r"}],
        "images": ["ok.png"], "answer": "a"}


def with_changes(**changes) -> dict:
    return {**GOOD, **changes}


BAD_LINES = {
    "invalid json": ('{"messages": [', {}, "invalid JSON"),
    "unknown role": (with_changes(messages=[{"role": "robot", "content": "<image>q"}]), {}, "unknown role 'robot'"),
    "missing image": (with_changes(images=["nope.png"]), {}, "image file not found"),
    "corrupt image": (with_changes(images=["corrupt.png"]), {}, "corrupt image"),
    "more placeholders": (
        with_changes(messages=[{"role": "user", "content": "<image><image>q"}]), {}, "2 <image> placeholder(s) but 1 image(s)"
    ),
    "fewer placeholders": (
        with_changes(messages=[{"role": "user", "content": "q"}]), {}, "0 <image> placeholder(s) but 1 image(s)"
    ),
    "placeholder outside user": (
        with_changes(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}]),
        {}, "placeholder outside a user turn (message 1: assistant)",
    ),
    "no assistant turn": (
        with_changes(messages=[{"role": "user", "content": "<image>q"}]), {"require_response": True}, "no final assistant"
    ),
    "empty response": (
        with_changes(messages=[{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": " "}]),
        {"require_response": True}, "no final assistant",
    ),
    "last turn not assistant": (
        with_changes(messages=[{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "r"},
                               {"role": "user", "content": "and?"}]),
        {"require_response": True}, "no final assistant",
    ),
    "missing answer": ({k: v for k, v in GOOD.items() if k != "answer"}, {"require_answer": True}, "no answer"),
}


@pytest.fixture
def image_dir(tmp_path):
    make_png(tmp_path / "ok.png", RED)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return tmp_path


def assert_one_line_error(error: pytest.ExceptionInfo, where: str, problem: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(where), message
    assert problem in message, message


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_example_raises_one_line_error_naming_file_and_line(image_dir, case):
    bad, kwargs, problem = BAD_LINES[case]
    path = write_jsonl(image_dir / "bad.jsonl", [GOOD, bad, GOOD])  # the bad one is line 2
    with pytest.raises(DataError) as error:
        load_examples(path, "sharegpt", **kwargs)
    assert_one_line_error(error, f"{path}:2: ", problem)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_skip_bad_drops_bad_examples_with_one_warning(image_dir, case):
    bad, kwargs, problem = BAD_LINES[case]
    path = write_jsonl(image_dir / "bad.jsonl", [GOOD, bad, GOOD, bad, GOOD])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = load_examples(path, "sharegpt", skip_bad=True, **kwargs)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 2 bad example(s)" in message and f"{path}:2: " in message and problem in message


def test_corrupt_image_passes_without_verification(image_dir):
    path = write_jsonl(image_dir / "d.jsonl", [with_changes(images=["corrupt.png"])])
    (ex,) = load_examples(path, verify_images=False)
    assert ex.images == [str(image_dir / "corrupt.png")]


def test_corrupt_image_bytes_in_parquet_names_row(tmp_path):
    path = write_verl_parquet(tmp_path / "bad.parquet", [verl_row(0, png_bytes(RED)), verl_row(1, b"not an image")])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert_one_line_error(error, f"{path}:1: ", "corrupt image <12 bytes>")


def test_placeholder_mismatch_in_parquet_names_row(tmp_path):
    path = write_verl_parquet(tmp_path / "bad.parquet", [verl_row(0, png_bytes(RED), n_placeholders=0)])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert_one_line_error(error, f"{path}:0: ", "0 <image> placeholder(s) but 1 image(s)")


def test_invalid_json_list_names_file_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": \n]\n')
    with pytest.raises(DataError) as error:
        load_examples(path, "sharegpt", skip_bad=True)  # cannot skip: the whole list is unreadable
    assert_one_line_error(error, f"{path}:4: ", "invalid JSON")


def test_missing_file_is_always_an_error(tmp_path):
    with pytest.raises(DataError, match="data file not found") as error:
        load_examples(tmp_path / "missing.jsonl", skip_bad=True)
    assert "missing.jsonl" in str(error.value)


def test_empty_dataset_is_an_error(image_dir):
    empty = image_dir / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(empty)
    all_bad = write_jsonl(image_dir / "all_bad.jsonl", [with_changes(images=["nope.png"])] * 2)
    with pytest.warns(UserWarning, match="skipped 2"), pytest.raises(DataError) as error:
        load_examples(all_bad, skip_bad=True)
    assert_one_line_error(error, f"{all_bad}: ", "no examples (2 bad ones skipped)")


def test_limit_keeps_first_valid_examples_and_stops_reading(image_dir):
    path = write_jsonl(image_dir / "d.jsonl", [GOOD, with_changes(images=["nope.png"]), GOOD, GOOD, "{broken"])
    with pytest.warns(UserWarning, match="skipped 1"):
        examples = load_examples(path, skip_bad=True, limit=2)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert len(load_examples(path, limit=1)) == 1  # the bad line 2 is never reached


# ----------------------------------------------------------------------------- content parts


def test_content_parts_in_both_styles_carry_images_in_order(tmp_path):
    make_png(tmp_path / "imgs" / "a.png", RED)
    make_png(tmp_path / "imgs" / "b.png", BLUE)
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(BLUE)).decode()
    path = write_jsonl(tmp_path / "parts.jsonl", [
        {"messages": [  # LLaMA-Factory's newer {"type", "value"} parts
            {"role": "user", "content": [{"type": "text", "value": "Left "}, {"type": "image", "value": "imgs/a.png"},
                                         {"type": "text", "value": " right "},
                                         {"type": "image_url", "value": "imgs/b.png"}, {"type": "text", "value": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "<answer>no</answer>"}]},
        ]},
        {"messages": [  # OpenAI-style parts: image_url {url}, a data URL, and a bare image with `images`
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/b.png"}},
                                         {"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": "Same?"}]},
        ]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Red?"}]}],
         "images": ["imgs/a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "value": "imgs/b.png"}, {"type": "text", "text": "q"}]}],
         "images": ["imgs/a.png"]},  # the record's own images win when the counts agree
    ])

    first, second, third, fourth = load_examples(path)

    assert first.messages == [
        {"role": "user", "content": "Left <image> right <image>?"},
        {"role": "assistant", "content": "<answer>no</answer>"},
    ]
    assert first.images == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]
    assert second.messages == [{"role": "user", "content": "<image><image>Same?"}]
    assert [pixels(r) for r in second.images] == [pixels(tmp_path / "imgs" / "b.png"), pixels(png_bytes(BLUE))]
    assert third.messages[0]["content"] == "<image>Red?" and third.images == [str(tmp_path / "imgs" / "a.png")]
    assert fourth.images == [str(tmp_path / "imgs" / "a.png")] and fourth.meta == {}


def test_image_parts_keep_their_own_pixel_bounds_per_image(tmp_path):
    """qwen-vl-utils' per-image min_pixels / max_pixels: one [min, max] (or null) per image, in placeholder order,
    across string and part content; none asked: no meta."""
    make_png(tmp_path / "a.png", RED)
    path = write_jsonl(tmp_path / "bounds.jsonl", [
        {"messages": [{"role": "user", "content": "<image>first"},
                      {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": [{"type": "image", "max_pixels": 50176},
                                                   {"type": "text", "text": "and <image>"},
                                                   {"type": "image", "min_pixels": 3136, "max_pixels": 12845056}]}],
         "images": ["a.png", "a.png", "a.png", "a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]}]},
    ])
    asked, plain = load_examples(path)
    assert asked.meta["image_pixels"] == [None, [None, 50176], None, [3136, 12845056]]
    assert "image_pixels" not in plain.meta


@pytest.mark.parametrize("part, problem", [
    ({"max_pixels": 0}, "max_pixels must be a positive integer, got 0"),
    ({"min_pixels": "big"}, "min_pixels must be a positive integer, got 'big'"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels 5000 is above its max_pixels 4000"),
])
def test_bad_image_part_pixel_bounds_are_one_line(image_dir, part, problem):
    bad = {"messages": [{"role": "user", "content": [{"type": "image", "value": "ok.png", **part}]}]}
    path = write_jsonl(image_dir / "bounds.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert_one_line_error(error, f"{path}:2: ", problem)


@pytest.mark.parametrize("content, problem", [
    ([{"type": "text", "value": "q"}, {"type": "video", "value": "v.mp4"}], "videos are not supported yet (content part of type 'video'"),
    ([{"type": "audio", "value": "a.wav"}], "content part of type 'audio'"),
    ([{"type": "hologram"}], "content part of type 'hologram'"),
    (["plain string part"], "content part that is a str"),
    ([{"type": "image", "value": "https://example.com/a.png"}], "remote image 'https://example.com/a.png'"),
    ([{"type": "image", "value": "ok.png"}, {"type": "image", "value": "ok.png"}], "2 image part(s) carry an image but `images` lists 1"),
])
def test_unusable_content_parts_are_one_line_errors(image_dir, content, problem):
    bad = {"messages": [{"role": "user", "content": content}], "images": ["ok.png"]}
    if "carry" not in problem:
        bad.pop("images")
    path = write_jsonl(image_dir / "parts.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert_one_line_error(error, f"{path}:2: ", problem)


@pytest.mark.parametrize("bad, problem", [
    ({"messages": [{"role": "user", "content": "<video>What happens?"}], "videos": ["v.mp4"]}, "(record key `videos`)"),
    ({"messages": [{"role": "user", "content": "<video>What happens?"}]}, "(<video> placeholder in message 0)"),
    ({"conversations": [{"from": "human", "value": "<image><video>?"}], "images": ["ok.png"]}, "<video> placeholder"),
])
def test_videos_are_refused_not_trained_on_as_text(image_dir, bad, problem):
    path = write_jsonl(image_dir / "mllm_video_demo.jsonl", [bad])
    with pytest.raises(DataError) as error:
        load_examples(path)
    assert_one_line_error(error, f"{path}:1: ", "videos are not supported yet")
    assert problem in str(error.value)


# ----------------------------------------------------------------------------- LLaMA-Factory dataset_info.json


def write_dataset_dir(root: Path) -> Path:
    """A LLaMA-Factory data folder: dataset_info.json, data files, and images under media/."""
    media = root / "media"
    make_png(media / "coco" / "a.png", RED)
    make_png(media / "coco" / "b.png", BLUE)
    data = root / "data"
    data.mkdir(parents=True)
    (data / "llava.json").write_text(json.dumps([  # LLaVA-style: one `image` string, from/value turns
        {"id": "x1", "image": "coco/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
    ]))
    write_jsonl(data / "openai.jsonl", [{  # custom tags: OpenAI-like role/content turns
        "chat": [{"role": "sys", "text": "Be brief."}, {"role": "me", "text": "<image><image>Same?"},
                 {"role": "bot", "text": "no"}],
        "pics": ["coco/a.png", "coco/b.png"], "answer": "no"}])
    write_jsonl(data / "alpaca.jsonl", [{
        "instruction": "<image>Count the stars.", "input": "Answer with a number.", "output": "3",
        "history": [["Hi", "Hello"]], "img": ["coco/b.png"], "sys": "Think.", "tools": "[]", "level": 2}])
    write_jsonl(data / "video.jsonl", [{"messages": [{"role": "user", "content": "<video>?"}], "videos": ["v.mp4"]}])
    (root / "dataset_info.json").write_text(json.dumps({
        "llava": {"file_name": "data/llava.json", "formatting": "sharegpt", "columns": {"images": "image"}},
        "openai_style": {
            "file_name": "data/openai.jsonl", "formatting": "sharegpt",
            "columns": {"messages": "chat", "images": "pics"},
            "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot",
                     "system_tag": "sys"},
        },
        "alpaca_mm": {"file_name": "data/alpaca.jsonl",  # formatting defaults to alpaca
                      "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                  "history": "history", "images": "img", "system": "sys", "tools": "tools"}},
        "video_demo": {"file_name": "data/video.jsonl", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "videos": "videos"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}},
        "remote": {"hf_hub_url": "BUAADreamer/llava-en-zh-300k", "formatting": "sharegpt"},
        "odd": {"file_name": "data/llava.json", "formatting": "openai"},
        "typo": {"file_name": "data/llava.json", "formatting": "sharegpt", "columns": {"imags": "image"}},
    }, indent=2))
    return root


def test_dataset_info_sharegpt_llava_image_column_and_tags(tmp_path):
    root = write_dataset_dir(tmp_path / "lf")
    media = root / "media"

    (llava,) = load_dataset_info(root, "llava", media_dir=media)
    assert llava.messages == [{"role": "user", "content": "<image>\nWhat colour?"},
                              {"role": "assistant", "content": "red"}]
    assert llava.images == [str(media / "coco" / "a.png")] and llava.meta == {"id": "x1"}
    assert llava.source == f"{root / 'data' / 'llava.json'}:0"

    (chat,) = load_dataset_info(root / "dataset_info.json", "openai_style", media_dir=media)
    assert chat.messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "<image><image>Same?"},
                             {"role": "assistant", "content": "no"}]
    assert chat.images == [str(media / "coco" / "a.png"), str(media / "coco" / "b.png")]
    assert chat.answer == "no" and chat.meta == {}


def test_dataset_info_alpaca(tmp_path):
    root = write_dataset_dir(tmp_path / "lf")
    (ex,) = load_dataset_info(root, "alpaca_mm", media_dir=root / "media", require_response=True)
    assert ex.messages == [
        {"role": "system", "content": "Think."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "<image>Count the stars.\nAnswer with a number."},
        {"role": "assistant", "content": "3"},
    ]
    assert ex.images == [str(root / "media" / "coco" / "b.png")]
    assert ex.meta == {"tools": "[]", "level": 2}  # tools are kept, not used


def test_dataset_by_name_through_load_examples_path_syntax(tmp_path):
    root = write_dataset_dir(tmp_path / "lf")
    # Images resolve against the dataset folder by default, so put a copy where it looks.
    make_png(root / "coco" / "a.png", RED)
    for spec in (f"{root}#llava", f"{root / 'dataset_info.json'}#llava"):
        (ex,) = load_examples(spec)
        assert ex.images == [str(root / "coco" / "a.png")] and ex.response == "red"


@pytest.mark.parametrize("name, problem", [
    ("missing", "no dataset 'missing' (datasets: alpaca_mm, llava, odd, openai_style, remote, typo, video_demo)"),
    ("remote", "dataset 'remote': `hf_hub_url` is a remote dataset"),
    ("odd", "dataset 'odd': unknown `formatting` 'openai'"),
    ("typo", "dataset 'typo': `columns` key 'imags' is not supported"),
])
def test_dataset_info_entry_errors_name_the_index_and_key(tmp_path, name, problem):
    root = write_dataset_dir(tmp_path / "lf")
    with pytest.raises(DataError) as error:
        load_examples(f"{root}#{name}")
    assert_one_line_error(error, f"{root / 'dataset_info.json'}: ", problem)


def test_dataset_info_video_entry_is_refused(tmp_path):
    root = write_dataset_dir(tmp_path / "lf")
    with pytest.raises(DataError) as error:
        load_dataset_info(root, "video_demo")
    assert_one_line_error(error, f"{root / 'data' / 'video.jsonl'}:1: ", "videos are not supported yet (record key `videos`)")


def test_dataset_index_given_as_data_file_says_how_to_name_a_dataset(tmp_path):
    root = write_dataset_dir(tmp_path / "lf")
    renamed = tmp_path / "index.json"
    renamed.write_text((root / "dataset_info.json").read_text())
    for given in (root / "dataset_info.json", root, renamed):
        with pytest.raises(DataError) as error:
            load_examples(given)
        assert_one_line_error(error, f"{given}: ", f"a LLaMA-Factory dataset index (dataset_info.json), not a data file; "
                                                   f"name one of its datasets as {given}#NAME (datasets: alpaca_mm, llava")
        assert "invalid JSON" not in str(error.value)


# ----------------------------------------------------------------------------- verl answers, PRISM alignment Parquet


def test_verl_list_ground_truth_and_equivalent_answers(tmp_path):
    table = pa.Table.from_pylist([
        {"data_source": "geo3k", "prompt": [{"role": "user", "content": "<image>x?"}], "images": [png_bytes(RED)],
         "reward_model": {"ground_truth": ["3", "3.0"], "equivalent_answers": ["three"], "style": "rule"}},
        {"data_source": "geo3k", "prompt": [{"role": "user", "content": "<image>y?"}], "images": [png_bytes(BLUE)],
         "reward_model": {"ground_truth": ["4"], "equivalent_answers": None, "style": "rule"}},
    ])
    pq.write_table(table, tmp_path / "answers.parquet")

    first, second = load_examples(tmp_path / "answers.parquet")

    assert first.answer == "3"
    assert first.meta == {"data_source": "geo3k", "reward_model": {"style": "rule"}, "equivalent_answers": ["3.0", "three"]}
    assert first.answers == ["3", "3.0", "three"] and first.data_source == "geo3k"
    assert second.answer == "4" and "equivalent_answers" not in second.meta and second.answers == ["4"]
    out = save_sharegpt_jsonl([first, second], tmp_path / "out.jsonl")
    assert [(e.answer, e.meta) for e in load_examples(out)] == [(first.answer, first.meta), (second.answer, second.meta)]


def test_prism_alignment_parquet_with_teacher_columns(tmp_path):
    def row(i: int, **teacher) -> dict:
        return {"data_source": "mm_gad", "prompt": [{"role": "user", "content": f"<image>Q{i}"}],
                "images": [{"bytes": png_bytes(RED), "path": None}], "reward_model": {"ground_truth": str(i)},
                "teacher_response": None, "teacher_caption": None, "teacher_cot": None, **teacher}

    full = "<caption>a red square</caption><think>count</think><answer>0</answer>"
    path = tmp_path / "align.parquet"
    pq.write_table(pa.Table.from_pylist([
        row(0, teacher_response=full, teacher_caption="a red square", teacher_cot="count"),
        row(1, teacher_caption="two dots", teacher_cot="1 + 1 = 2, minus one"),
        row(2, teacher_caption="only a caption"),
    ]), path)

    first, second, third = load_examples(path, require_answer=True)

    assert first.response == full and first.messages[0] == {"role": "user", "content": "<image>Q0"}
    assert first.meta == {"data_source": "mm_gad", "teacher_caption": "a red square", "teacher_cot": "count"}
    assert second.response == "<caption>two dots</caption><think>1 + 1 = 2, minus one</think><answer>1</answer>"
    assert second.meta == {"data_source": "mm_gad"}
    assert third.response is None and third.meta == {"data_source": "mm_gad", "teacher_caption": "only a caption"}
    assert first.data_source == "mm_gad"
