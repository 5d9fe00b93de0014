"""The synthetic grid task: answers by hand, captions, drift statistics, splits, determinism."""

import hashlib
import json
import random

import pytest
from PIL import Image

from prism.tasks.grids.generator import (
    CELL_PX,
    COLORS,
    SPLITS,
    SynthConfig,
    answer_question,
    caption_for_scene,
    caption_matches_scene,
    format_response,
    generate,
    main,
    render_scene,
    scene_from_caption,
    solve,
)
from prism.core.response import parse_response

# red 3, blue 3, green 2, yellow 1: a tie for `most`, which only drifted captions can have.
SCENE = [["red", "blue", "green"], ["yellow", "red", "red"], ["blue", "blue", "green"]]


def load(path):
    return [json.loads(line) for line in open(path)]


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A large public pool (for the bias statistics) and small clean splits, 3x3 and 4x4."""
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(out=str(out), n=2000, seed=3, grids=(3, 4), n_curated=50, n_align=20, n_rl=20, n_test=20)
    generate(cfg)
    return out, {s: load(out / f"{s}.jsonl") for s in SPLITS}


# ---------------------------------------------------------------------------- answers by hand


def test_count_by_hand():
    assert answer_question(SCENE, "count", {"color": "red"}) == "3"
    assert answer_question(SCENE, "count", {"color": "yellow"}) == "1"
    assert answer_question(SCENE, "count", {"color": "purple"}) == "0"
    _, full, terse = solve(SCENE, "count", {"color": "red"})
    assert full == ("Count each colour: red three, green two, blue three, yellow one. "
                    "The question asks about red, so red three.")
    assert terse == "red: 3."


def test_compare_by_hand():
    assert answer_question(SCENE, "compare", {"color": "red", "color2": "blue"}) == "equal"  # 3 vs 3
    assert answer_question(SCENE, "compare", {"color": "green", "color2": "yellow"}) == "green"  # 2 vs 1
    assert answer_question(SCENE, "compare", {"color": "yellow", "color2": "blue"}) == "blue"  # 1 vs 3
    _, full, terse = solve(SCENE, "compare", {"color": "yellow", "color2": "blue"})
    assert full == ("Count each colour: red three, green two, blue three, yellow one. Compare yellow one with "
                    "blue three: one is less than three, so there are more blue cells.")
    assert terse == "yellow: 1, blue: 3."


def test_row_count_by_hand():
    assert answer_question(SCENE, "row_count", {"color": "red", "row": 2}) == "2"
    assert answer_question(SCENE, "row_count", {"color": "blue", "row": 3}) == "2"
    assert answer_question(SCENE, "row_count", {"color": "green", "row": 1}) == "1"
    assert answer_question(SCENE, "row_count", {"color": "yellow", "row": 1}) == "0"
    _, full, _ = solve(SCENE, "row_count", {"color": "red", "row": 2})
    assert full == ("Row 2 is: yellow red red. Count each colour in row 2: red two, green zero, blue zero, "
                    "yellow one. The question asks about red, so red two.")
    with pytest.raises(ValueError, match="row 4"):
        answer_question(SCENE, "row_count", {"color": "red", "row": 4})


def test_most_by_hand():
    scene = [["red", "red", "blue"], ["green", "red", "yellow"], ["blue", "red", "green"]]  # red 4
    assert answer_question(scene, "most", {}) == "red"
    _, full, terse = solve(scene, "most", {})
    assert full == "Count each colour: red four, green two, blue two, yellow one. The largest count is four, for red."
    assert terse == "red 4, green 2, blue 2, yellow 1."
    # A tie goes to the colour listed first (palette order), and the trace says so.
    assert answer_question(SCENE, "most", {}) == "red"
    assert "shared by red and blue; taking the first listed, red" in solve(SCENE, "most", {})[1]
    # the palette sets the order of the count, so also the tie-break
    assert answer_question(SCENE, "most", {}, palette=("blue", "red", "green", "yellow")) == "blue"


# ---------------------------------------------------------------------------- captions, images


def test_caption_round_trip():
    assert caption_for_scene(SCENE) == "row 1: red blue green; row 2: yellow red red; row 3: blue blue green"
    rng = random.Random(0)
    for _ in range(200):
        g = rng.randint(2, 6)
        scene = [[rng.choice(list(COLORS)) for _ in range(g)] for _ in range(g)]
        assert scene_from_caption(caption_for_scene(scene)) == scene
        assert caption_matches_scene(caption_for_scene(scene), scene)
    # Case and whitespace do not matter; content does.
    assert scene_from_caption("  Row 1:  RED blue green;row 2: yellow red red ;\nrow 3: blue blue green ") == SCENE
    assert not caption_matches_scene(caption_for_scene(SCENE).replace("yellow", "blue"), SCENE)


@pytest.mark.parametrize("text", [
    "", "a red square", "row 2: red blue", "row 1: red blue; row 3: red blue",
    "row 1: red blue; row 2: red", "row 1: red pink", "row 1: red, blue", "row 1:",
])
def test_unparsable_caption_is_none(text):
    assert scene_from_caption(text) is None
    assert not caption_matches_scene(text, SCENE)


def test_render_scene_cells():
    im = render_scene(SCENE)
    assert im.size == (3 * CELL_PX, 3 * CELL_PX) and im.mode == "RGB"
    assert im.getpixel((CELL_PX // 2 + 2 * CELL_PX, CELL_PX // 2)) == COLORS["green"]  # row 1, col 3
    assert im.getpixel((0, CELL_PX)) == COLORS["yellow"]  # first pixel of row 2


def test_images_match_scene(pool):
    out, splits = pool
    for split in SPLITS:
        for rec in splits[split][:15]:
            im = Image.open(out / rec["images"][0]).convert("RGB")
            g = rec["grid"]
            assert im.size == (CELL_PX * g, CELL_PX * g) and len(rec["scene"]) == g
            for r, row in enumerate(rec["scene"]):
                for c, colour in enumerate(row):
                    assert im.getpixel((c * CELL_PX + CELL_PX // 2, r * CELL_PX + CELL_PX // 2)) == COLORS[colour]


# ---------------------------------------------------------------------------- pools and splits


def test_clean_splits_are_teacher_references(pool):
    _, splits = pool
    for split in ("curated", "align", "rl", "test"):
        for rec in splits[split]:
            resp = rec["messages"][-1]["content"]
            parsed = parse_response(resp)
            assert parsed.valid
            assert caption_matches_scene(parsed.caption, rec["scene"])
            assert parsed.answer == rec["answer"] == answer_question(rec["scene"], rec["question_type"], rec["params"])
            assert resp == format_response(rec["scene"], rec["question_type"], rec["params"])  # the full trace
            assert rec["messages"][0]["content"].startswith("<image>")


def test_public_pool_drift(pool):
    """Yellow cells are captioned blue at bias_rate, and think/answer follow the caption."""
    _, splits = pool
    yellow = yellow_as_blue = other_wrong = terse = answer_wrong = 0
    for rec in splits["public"]:
        parsed = parse_response(rec["messages"][-1]["content"])
        assert parsed.valid
        shown = scene_from_caption(parsed.caption)
        assert shown is not None
        for true_row, shown_row in zip(rec["scene"], shown):
            for t, s in zip(true_row, shown_row):
                yellow += t == "yellow"
                yellow_as_blue += t == "yellow" and s == "blue"
                other_wrong += t != "yellow" and s != t
        # The response is consistent with its own (wrong) caption; the record keeps the truth.
        assert parsed.answer == answer_question(shown, rec["question_type"], rec["params"])
        assert rec["answer"] == answer_question(rec["scene"], rec["question_type"], rec["params"])
        answer_wrong += parsed.answer != rec["answer"]
        terse += rec["drift"]["terse"]
        assert (parsed.think == solve(shown, rec["question_type"], rec["params"])[2]) == rec["drift"]["terse"]
    n = len(splits["public"])
    assert n == 2000 and yellow > 1000
    assert abs(yellow_as_blue / yellow - 0.6) < 0.05
    assert other_wrong == 0  # caption_noise is 0
    assert abs(terse / n - 0.8) < 0.05
    assert answer_wrong > 0.05 * n  # the bias reaches the answers


def test_caption_noise_changes_every_cell(tmp_path):
    generate(SynthConfig(out=str(tmp_path), n=50, caption_noise=1.0, n_curated=0))
    for rec in load(tmp_path / "public.jsonl"):
        parsed = parse_response(rec["messages"][-1]["content"])
        shown = scene_from_caption(parsed.caption)
        assert all(s != t for tr, sr in zip(rec["scene"], shown) for t, s in zip(tr, sr))
        assert parsed.answer == answer_question(shown, rec["question_type"], rec["params"])


def test_splits_disjoint_and_sized(pool):
    out, splits = pool
    meta = json.loads((out / "meta.json").read_text())
    keys = set()
    for split in SPLITS:
        assert len(splits[split]) == meta["splits"][split]["n"]
        assert all(rec["id"].startswith(split + "-") for rec in splits[split])
        keys |= {json.dumps([rec["scene"], rec["messages"][0]["content"]]) for rec in splits[split]}
    assert len(keys) == sum(len(v) for v in splits.values())
    assert {len(r["scene"]) for r in splits["public"]} == {3, 4}
    assert {r["question_type"] for r in splits["public"]} == {"count", "compare", "row_count", "most"}


def test_default_split_sizes_scale_with_n():
    assert SynthConfig(n=5000).split_sizes() == {"test": 300, "align": 200, "rl": 400, "curated": 2500, "public": 5000}
    assert SynthConfig(n=100).split_sizes() == {"test": 20, "align": 10, "rl": 20, "curated": 50, "public": 100}


def test_deterministic(tmp_path):
    kw = dict(n=60, grids=(3, 4), n_align=5, n_rl=5, n_test=5)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(SynthConfig(out=str(tmp_path / name), seed=seed, **kw))
    a, b, c = (digests(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 60 + 30 + 15 + 6  # images + 5 jsonl + meta
    assert a["public.jsonl"] != c["public.jsonl"] and a["test.jsonl"] != c["test.jsonl"]


def test_drift_knobs_do_not_move_prompts(tmp_path):
    generate(SynthConfig(out=str(tmp_path / "a"), n=40, bias_rate=0.0))
    generate(SynthConfig(out=str(tmp_path / "b"), n=40, bias_rate=1.0, terse_rate=0.0))
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a["test.jsonl"] == b["test.jsonl"] and a["curated.jsonl"] == b["curated.jsonl"]
    assert a["public.jsonl"] != b["public.jsonl"]


@pytest.mark.parametrize("layout", ["swap_rows", "flip_rows"])
def test_layout_drift_keeps_colour_counts_and_moves_only_positions(tmp_path, layout):
    """Each drifted public caption holds the true rows in another order (every colour count kept), at
    layout_rate; think and answer follow the caption, so only position questions (row_count) can be
    wrong; the same seed gives the same files, and the other splits and prompts do not move."""
    kw = dict(n=300, grids=(3, 4), bias_rate=0.0, terse_rate=0.0, n_curated=10, n_align=5, n_rl=5, n_test=5)
    generate(SynthConfig(out=str(tmp_path / "a"), layout_drift=layout, layout_rate=0.5, **kw))
    generate(SynthConfig(out=str(tmp_path / "b"), layout_drift=layout, layout_rate=0.5, **kw))
    generate(SynthConfig(out=str(tmp_path / "none"), **kw))
    a, b, plain = (digests(tmp_path / name) for name in ("a", "b", "none"))
    assert a == b  # deterministic per seed
    assert a["test.jsonl"] == plain["test.jsonl"] and a["curated.jsonl"] == plain["curated.jsonl"]
    moved = wrong_by_type = 0
    wrong_types = set()
    for rec in load(tmp_path / "a" / "public.jsonl"):
        shown = scene_from_caption(parse_response(rec["messages"][-1]["content"]).caption)
        truth = rec["scene"]
        assert sorted(map(tuple, shown)) == sorted(map(tuple, truth))  # the same rows: counts kept
        changed = shown != truth
        assert changed == (rec["drift"]["layout"] == layout)
        if changed and layout == "flip_rows":
            assert shown == truth[::-1]
        if changed and layout == "swap_rows":
            assert sum(x != y for x, y in zip(shown, truth)) == 2
        moved += changed
        parsed = parse_response(rec["messages"][-1]["content"])
        assert parsed.answer == answer_question(shown, rec["question_type"], rec["params"])
        if parsed.answer != rec["answer"]:
            wrong_types.add(rec["question_type"])
            wrong_by_type += 1
    n = 300
    assert abs(moved / n - 0.5) < 0.1  # layout_rate (a flip of a palindromic grid changes nothing)
    assert wrong_by_type > 0 and wrong_types == {"row_count"}
    plain_public = load(tmp_path / "none" / "public.jsonl")
    assert all("layout" not in rec["drift"] for rec in plain_public)  # off: the records are as before


# ---------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("kwargs, option", [
    ({"bias_rate": 1.5}, "bias_rate"),
    ({"terse_rate": -0.1}, "terse_rate"),
    ({"caption_noise": 2}, "caption_noise"),
    ({"bias_from": "purple"}, "bias_from"),
    ({"bias_to": "yellow"}, "bias_from and bias_to"),
    ({"grids": (7,)}, "grids"),
    ({"grids": ()}, "grids"),
    ({"questions": ("count", "colour_sum")}, "questions"),
    ({"palette": ("red", "pink")}, "palette"),
    ({"palette": ("red",)}, "palette"),
    ({"n": 0}, "n must"),
    ({"n_test": -1}, "n_test"),
    ({"layout_drift": "shuffle"}, "layout_drift"),
    ({"layout_rate": 1.5}, "layout_rate"),
])
def test_bad_config_raises(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SynthConfig(**kwargs)


def test_space_too_small(tmp_path):
    # 2x2 grids of 2 colours with a unique majority: only 10 scenes exist.
    cfg = SynthConfig(out=str(tmp_path), n=20, grids=(2,), palette=("red", "green"), bias_from="red",
                      bias_to="green", questions=("most",))
    with pytest.raises(ValueError, match="distinct"):
        generate(cfg)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "30", "--seed", "2", "--grids", "3,4", "--questions", "count,most",
          "--n-curated", "4", "--n-align", "3", "--n-rl", "3", "--n-test", "3", "--bias-rate", "0.5"])
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("prism-synth: wrote") and "public=30" in summary and "\n" not in summary
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["config"]["grids"] == [3, 4] and meta["config"]["bias_rate"] == 0.5 and meta["seed"] == 2
    assert {r["question_type"] for r in load(tmp_path / "public.jsonl")} == {"count", "most"}


@pytest.mark.parametrize("argv, message", [
    (["--bias-rate", "2"], "bias_rate"),
    (["--grids", "3,x"], "--grids"),
    (["--bias-from", "blue"], "bias_from and bias_to"),
    (["--questions", "count,nope"], "questions"),
])
def test_cli_bad_options_exit(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n", "10"] + argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
