"""The synthetic visual-reasoning task: coloured grids, a perception part and a reasoning part.

A scene is a square grid (list of rows, each a list of colour names) drawn as flat 16x16-pixel
cells, so one cell is exactly one merged vision token (patch 8, merge 2). Questions (`count`,
`compare`, `row_count`, `most`) have a ground truth computed from the scene, and every reference
response has the docs/design.md §2 shape

    <caption>row 1: red blue green; row 2: ...</caption><think>step by step</think><answer>3</answer>

Why the public pool drifts the way it does. The paper's public demonstrations are cheap and
drifted; the curated ones are clean. We build the drift so that its two parts can be told apart:

- Perception drift: each `bias_from` (yellow) cell is captioned as `bias_to` (blue) with
  probability `bias_rate`, and the reasoning and answer are then computed *from the wrong
  caption*. The trace is internally consistent, so a text-only judge reading caption + think
  finds nothing wrong; only a judge that looks at the image (the perception expert) can see
  that the caption disagrees with the pixels. Optional `caption_noise` adds unstructured
  perception errors on top, handled the same way.
- Layout drift (`layout_drift`, off by default): with probability `layout_rate` the caption places
  the cells wrongly while keeping every colour count — `swap_rows` exchanges two rows, `flip_rows`
  lists the rows bottom-up — and, as above, the reasoning and answer follow that caption. Caption
  text statistics then look right; only a judge that sees the image can tell, and only questions
  that depend on position (`row_count`) are answered wrongly.
- Reasoning drift: with probability `terse_rate` the step-by-step trace ("Count each colour:
  red 3, green 2, ... so red 3.") is replaced by a terse one ("red: 3."), a style gap the
  reasoning expert can see without the image.

The example's `answer` and `scene` fields always hold the truth; only the assistant turn drifts.

Splits (all disjoint in (scene, question)): test, align, rl, curated, public, filled in that
order from one prompt stream, so the test split for a seed does not change with the pool size.
Same seed, same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CELL_PX = 16
# Fixed, well-separated RGB values; a palette is any subset of these names.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
QUESTION_TYPES = ("count", "compare", "row_count", "most")
DEFAULT_PALETTE = ("red", "green", "blue", "yellow")
SPLITS = ("test", "align", "rl", "curated", "public")  # fill order; see module docstring
LAYOUT_DRIFTS = ("none", "swap_rows", "flip_rows")

Scene = list[list[str]]


@dataclass
class SynthConfig:
    out: str = "data/synth"
    """Output directory (JSONL files, images/, meta.json)."""
    n: int = 5000
    """Size of the drifted public demonstration pool."""
    seed: int = 0
    n_curated: int | None = None
    """Clean teacher references; default n // 2."""
    n_align: int | None = None
    """Default min(200, max(4, n // 10))."""
    n_rl: int | None = None
    """Default min(400, max(4, n // 5))."""
    n_test: int | None = None
    """Default min(300, max(4, n // 5))."""
    grids: tuple[int, ...] = (3,)
    """Grid sizes, drawn uniformly per example."""
    questions: tuple[str, ...] = QUESTION_TYPES
    """Question types, drawn uniformly per example."""
    palette: tuple[str, ...] = DEFAULT_PALETTE
    bias_from: str = "yellow"
    bias_to: str = "blue"
    bias_rate: float = 0.6
    """P(a bias_from cell is captioned as bias_to) in the public pool."""
    caption_noise: float = 0.0
    """P(a cell is captioned as a random other colour) in the public pool."""
    terse_rate: float = 0.8
    """P(a public response has the terse trace instead of the step-by-step one)."""
    layout_drift: str = "none"
    """none | swap_rows | flip_rows: how a public caption misplaces cells (colour counts kept)."""
    layout_rate: float = 0.5
    """P(a public caption has the layout drift), when layout_drift is not none."""

    def __post_init__(self) -> None:
        self.grids = tuple(int(g) for g in self.grids)
        self.questions, self.palette = tuple(self.questions), tuple(self.palette)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        defaults = {"n_curated": self.n // 2, "n_align": min(200, max(4, self.n // 10)),
                    "n_rl": min(400, max(4, self.n // 5)), "n_test": min(300, max(4, self.n // 5))}
        for name, default in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.layout_drift not in LAYOUT_DRIFTS:
            raise ValueError(f"layout_drift must be one of {list(LAYOUT_DRIFTS)}, got {self.layout_drift!r}")
        for name in ("bias_rate", "caption_noise", "terse_rate", "layout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.grids or any(not 2 <= g <= 6 for g in self.grids):
            raise ValueError(f"grids must be sizes in 2..6, got {list(self.grids)}")
        bad = [q for q in self.questions if q not in QUESTION_TYPES]
        if not self.questions or bad:
            raise ValueError(f"questions: unknown type(s) {bad}; choose from {list(QUESTION_TYPES)}")
        bad = [c for c in self.palette if c not in COLORS]
        if bad or len(self.palette) < 2 or len(set(self.palette)) != len(self.palette):
            raise ValueError(f"palette must be >= 2 distinct colours from {list(COLORS)}, got {list(self.palette)}")
        for name in ("bias_from", "bias_to"):
            if getattr(self, name) not in self.palette:
                raise ValueError(f"{name} must be in the palette {list(self.palette)}, got {getattr(self, name)!r}")
        if self.bias_from == self.bias_to:
            raise ValueError(f"bias_from and bias_to must differ, both are {self.bias_from!r}")

    def split_sizes(self) -> dict[str, int]:
        return {s: (self.n if s == "public" else getattr(self, f"n_{s}")) for s in SPLITS}


# ---------------------------------------------------------------------------- captions, images


def caption_for_scene(scene: Scene) -> str:
    """Canonical caption: 'row 1: red blue green; row 2: ...' (one segment per row)."""
    return "; ".join(f"row {i}: {' '.join(row)}" for i, row in enumerate(scene, 1))


_ROW = re.compile(r"row (\d+):((?: [a-z]+)+)")


def scene_from_caption(text: str) -> Scene | None:
    """Inverse of caption_for_scene; None unless rows are 1..R, equally long, known colours.

    Lenient only about case and whitespace, so a model's caption parses iff it says one thing.
    """
    segments = [s for s in " ".join(text.lower().split()).split(";") if s.strip()]
    scene = []
    for i, seg in enumerate(segments, 1):
        m = _ROW.fullmatch(seg.strip())
        if m is None or int(m.group(1)) != i:
            return None
        row = m.group(2).split()
        if any(c not in COLORS for c in row):
            return None
        scene.append(row)
    if not scene or len({len(r) for r in scene}) != 1:
        return None
    return scene


def caption_matches_scene(caption: str, scene: Scene) -> bool:
    return scene_from_caption(caption) == [list(r) for r in scene]


def render_scene(scene: Scene) -> Image.Image:
    """Flat cells of CELL_PX x CELL_PX pixels; a g x g scene is a (16g x 16g) RGB image."""
    cells = np.array([[COLORS[c] for c in row] for row in scene], dtype=np.uint8)
    return Image.fromarray(cells.repeat(CELL_PX, axis=0).repeat(CELL_PX, axis=1))


# ---------------------------------------------------------------------------- questions, answers


def question_text(question_type: str, params: dict) -> str:
    c, c2, r = params.get("color"), params.get("color2"), params.get("row")
    return {
        "count": f"How many {c} cells are there?",
        "compare": f"Are there more {c} cells or {c2} cells?",
        "row_count": f"How many {c} cells are in row {r}?",
        "most": "Which colour appears most often?",
    }[question_type]


NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()


def number_word(k: int) -> str:
    return NUMBER_WORDS[k] if 0 <= k < len(NUMBER_WORDS) else str(k)


def _tally(cells: list[str], palette: Sequence[str]) -> tuple[dict[str, int], str]:
    """Counts of every palette colour in `cells`, and the trace 'red three, green two, blue three, yellow one'."""
    counts = {c: cells.count(c) for c in palette}
    return counts, ", ".join(f"{c} {number_word(k)}" for c, k in counts.items())


def solve(scene: Scene, question_type: str, params: dict, palette: Sequence[str] = DEFAULT_PALETTE) -> tuple[str, str, str]:
    """(answer, full step-by-step trace, terse trace) for a question about `scene`.

    The full trace first counts every colour of the palette, always in palette order, then reads
    the asked colour(s) off that list by repeating its entry ("so red three"); counts are number
    words, so an entry is two tokens (colour, count) and reading it off is plain copying. Both
    steps are what a tiny transformer learns in a few hundred steps, where comparing each cell
    with a colour named in the question is not: a per-cell running count stayed at 0% on its
    increments after 1000 steps, and with digits (" ", "3": a space token before every count)
    reading an entry off stalled near 50%. Answers are digits. The terse trace keeps only the
    asked numbers. The traces read only the scene, so fed a (possibly wrong) caption's scene they
    derive the answer that caption implies; `most` ties (only possible in drifted captions) go to
    the tied colour first in palette order, and the trace says so.
    """
    asked = [params[k] for k in ("color", "color2") if k in params]
    palette = tuple(dict.fromkeys([*palette, *(c for row in scene for c in row), *asked]))  # + anything off-palette
    counts, listing = _tally([c for row in scene for c in row], palette)
    w = {c: number_word(k) for c, k in counts.items()}
    if question_type == "count":
        c = params["color"]
        return str(counts[c]), f"Count each colour: {listing}. The question asks about {c}, so {c} {w[c]}.", f"{c}: {counts[c]}."
    if question_type == "compare":
        c1, c2 = params["color"], params["color2"]
        n1, n2 = counts[c1], counts[c2]
        answer = c1 if n1 > n2 else c2 if n2 > n1 else "equal"
        relation = "more than" if n1 > n2 else "less than" if n1 < n2 else "the same as"
        verdict = "so the counts are equal" if answer == "equal" else f"so there are more {answer} cells"
        full = (f"Count each colour: {listing}. Compare {c1} {w[c1]} with {c2} {w[c2]}: "
                f"{w[c1]} is {relation} {w[c2]}, {verdict}.")
        return answer, full, f"{c1}: {n1}, {c2}: {n2}."
    if question_type == "row_count":
        c, r = params["color"], params["row"]
        if not 1 <= r <= len(scene):
            raise ValueError(f"row {r} is outside a scene of {len(scene)} rows")
        row_counts, row_listing = _tally(scene[r - 1], palette)
        k = row_counts[c]
        full = (f"Row {r} is: {' '.join(scene[r - 1])}. Count each colour in row {r}: {row_listing}. "
                f"The question asks about {c}, so {c} {number_word(k)}.")
        return str(k), full, f"row {r} {c}: {k}."
    if question_type == "most":
        best = max(counts.values())
        tied = [c for c in palette if counts[c] == best]
        if len(tied) == 1:
            end = f"The largest count is {number_word(best)}, for {tied[0]}."
        else:
            end = (f"The largest count is {number_word(best)}, shared by {' and '.join(tied)}; "
                   f"taking the first listed, {tied[0]}.")
        terse = ", ".join(f"{c} {k}" for c, k in counts.items() if k) + "."
        return tied[0], f"Count each colour: {listing}. {end}", terse
    raise ValueError(f"unknown question type {question_type!r}")


def answer_question(scene: Scene, question_type: str, params: dict, palette: Sequence[str] = DEFAULT_PALETTE) -> str:
    """Ground-truth answer: an integer string, a colour name, or 'equal' (compare)."""
    return solve(scene, question_type, params, palette)[0]


def format_response(scene: Scene, question_type: str, params: dict, terse: bool = False,
                    palette: Sequence[str] = DEFAULT_PALETTE) -> str:
    """The §2 response whose caption describes `scene` and whose think/answer follow from it."""
    answer, full, short = solve(scene, question_type, params, palette)
    return f"<caption>{caption_for_scene(scene)}</caption><think>{short if terse else full}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------- sampling


def _sample_prompt(rng: random.Random, cfg: SynthConfig) -> tuple[Scene, str, dict]:
    g = rng.choice(cfg.grids)
    qtype = rng.choice(cfg.questions)
    while True:  # `most` needs a unique maximum in the true scene; terminates (4-0 / 3-1 splits exist)
        scene = [[rng.choice(cfg.palette) for _ in range(g)] for _ in range(g)]
        counts = sorted((sum(r.count(c) for r in scene) for c in cfg.palette), reverse=True)
        if qtype != "most" or counts[0] > counts[1]:
            break
    if qtype == "most":
        return scene, qtype, {}
    c1, c2 = rng.sample(cfg.palette, 2)
    params = {"color": c1}
    if qtype == "compare":
        params["color2"] = c2
    if qtype == "row_count":
        params["row"] = rng.randint(1, g)
    return scene, qtype, params


def _drift(rng: random.Random, scene: Scene, cfg: SynthConfig) -> tuple[Scene, dict]:
    """The caption scene of a public response: random noise, else the systematic bias."""
    out, biased, noisy = [], 0, 0
    for row in scene:
        new_row = []
        for c in row:
            noise_hit, bias_hit = rng.random() < cfg.caption_noise, rng.random() < cfg.bias_rate
            if noise_hit:
                c, noisy = rng.choice([x for x in cfg.palette if x != c]), noisy + 1
            elif c == cfg.bias_from and bias_hit:
                c, biased = cfg.bias_to, biased + 1
            new_row.append(c)
        out.append(new_row)
    info = {"biased_cells": biased, "noisy_cells": noisy}
    if cfg.layout_drift != "none":  # drawn only when on: the default data stays byte for byte the same
        moved = rng.random() < cfg.layout_rate and len(out) > 1
        if moved and cfg.layout_drift == "swap_rows":
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        elif moved:
            out = out[::-1]
        info["layout"] = cfg.layout_drift if moved and out != [list(r) for r in scene] else "none"
    return out, info


def _record(split: str, i: int, scene: Scene, qtype: str, params: dict, response: str,
            palette: Sequence[str]) -> dict:
    uid = f"{split}-{i:06d}"
    return {
        "id": uid,
        "messages": [{"role": "user", "content": "<image>" + question_text(qtype, params)},
                     {"role": "assistant", "content": response}],
        "images": [f"images/{uid}.png"],
        "answer": answer_question(scene, qtype, params, palette),
        "scene": scene,
        "question_type": qtype,
        "params": params,
        "grid": len(scene),
    }


def generate(cfg: SynthConfig) -> dict:
    """Write OUT/{public,curated,align,rl,test}.jsonl, OUT/images/*.png and OUT/meta.json."""
    sizes = cfg.split_sizes()
    total = sum(sizes.values())
    # Separate streams: the drift knobs never change which prompts land in which split.
    prompt_rng = random.Random(f"prism-synth/{cfg.seed}/prompts")
    drift_rng = random.Random(f"prism-synth/{cfg.seed}/drift")
    seen: set[str] = set()
    prompts = []
    max_draws, draws = 50 * total + 10_000, 0
    while len(prompts) < total:
        if draws >= max_draws:
            raise ValueError(
                f"n: only {len(prompts)} distinct (scene, question) pairs of the {total} needed after "
                f"{draws} draws; lower the split sizes or use bigger grids / more colours / question types")
        draws += 1
        scene, qtype, params = _sample_prompt(prompt_rng, cfg)
        key = json.dumps([scene, question_text(qtype, params)])
        if key not in seen:
            seen.add(key)
            prompts.append((scene, qtype, params))

    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for split in SPLITS:
        lines = []
        for i, (scene, qtype, params) in enumerate(prompts[start:start + sizes[split]]):
            if split == "public":
                shown, drift = _drift(drift_rng, scene, cfg)
                terse = drift_rng.random() < cfg.terse_rate
                response = format_response(shown, qtype, params, terse, cfg.palette)
            else:
                response = format_response(scene, qtype, params, palette=cfg.palette)
            rec = _record(split, i, scene, qtype, params, response, cfg.palette)
            if split == "public":
                rec["drift"] = {**drift, "terse": terse}
            render_scene(scene).save(out / rec["images"][0], format="PNG", compress_level=6)
            lines.append(json.dumps(rec, sort_keys=True) + "\n")
        start += sizes[split]
        paths[split] = str(out / f"{split}.jsonl")
        Path(paths[split]).write_text("".join(lines))

    knobs = {k: v for k, v in asdict(cfg).items() if k != "out"}  # no paths: meta is seed-determined
    meta = {"config": knobs, "seed": cfg.seed, "splits": {s: {"file": f"{s}.jsonl", "n": sizes[s]} for s in SPLITS},
            "cell_px": CELL_PX, "colors": {c: list(COLORS[c]) for c in cfg.palette}}
    (out / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    return {"out": str(out), "sizes": sizes, "paths": paths}


# ---------------------------------------------------------------------------- CLI


def _csv(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def main(argv: list[str] | None = None) -> dict:
    """prism-synth --out DIR --n N --seed S [--grids 3,4] [--bias-rate 0.6] ..."""
    d = SynthConfig()
    p = argparse.ArgumentParser(prog="prism-synth", description="Generate the synthetic grid task.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=d.n, help="public pool size")
    p.add_argument("--seed", type=int, default=d.seed)
    for name in ("n-curated", "n-align", "n-rl", "n-test"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--grids", type=_csv(int), default=d.grids, help="e.g. 3,4")
    p.add_argument("--questions", type=_csv(str), default=d.questions, help=",".join(QUESTION_TYPES))
    p.add_argument("--palette", type=_csv(str), default=d.palette, help=",".join(COLORS))
    p.add_argument("--bias-from", default=d.bias_from)
    p.add_argument("--bias-to", default=d.bias_to)
    for name in ("bias-rate", "caption-noise", "terse-rate", "layout-rate"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name.replace("-", "_")))
    p.add_argument("--layout-drift", choices=LAYOUT_DRIFTS, default=d.layout_drift,
                   help="how public captions misplace cells, keeping colour counts (module docstring)")
    args = p.parse_args(argv)
    try:
        result = generate(SynthConfig(**vars(args)))
    except ValueError as e:
        p.error(str(e))
    sizes = " ".join(f"{s}={k}" for s, k in result["sizes"].items())
    print(f"prism-synth: wrote {sizes} to {result['out']} (grids {','.join(map(str, args.grids))}, seed {args.seed})")
    return result


def cli() -> None:
    """The `prism-synth` console script (prints one line, exits 0; bad arguments exit 2)."""
    main()
