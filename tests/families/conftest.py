"""The models of the family suite: one per Qwen-VL family prism supports, each test run on every one.

- Real published files, shrunk (`prism-tiny --like`): Qwen2.5-VL-3B-Instruct and Qwen3-VL-4B-Instruct from
  `../shared/qwen` (their config.json, tokenizer, chat template, processor and generation settings; the
  Qwen2 vocabulary beside them), or from `$PRISM_QWEN_FILES`. Absent: those cases skip, saying where they
  looked.
- prism's own tiny model of every family (`prism-tiny --family`), for the families whose files are not
  here (Qwen2-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) and as a second check of the others.
- Any folder a user names: `PRISM_MODEL_DIRS=/models/Qwen2-VL-2B-Instruct:/models/Qwen3.5-9B pytest -m families`
  builds each with `--like` (its weights are not needed) and runs the same tests on it. A folder whose template
  prism refuses (a Thinking one) runs under `model.chat_template=chatml`, and a test checks the refusal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from prism.core.errors import ConfigError
from prism.models.families import FAMILIES, Family, family_named
from prism.models.loader import read_json_object

QWEN_FILES = Path(os.environ.get("PRISM_QWEN_FILES", Path(__file__).resolve().parents[3] / "shared" / "qwen"))
"""The shared published files: one folder per checkpoint, and tokenizer/ with the Qwen2 vocabulary."""
PUBLISHED = ("Qwen2.5-VL-3B-Instruct", "Qwen3-VL-4B-Instruct")


@dataclass
class Case:
    name: str
    family: Family
    path: Path
    """The tiny model's folder (read-only for tests)."""
    source: Path | None
    """The real checkpoint folder it was built `--like` (None: prism's own tiny model)."""
    chat_template: str = "auto"
    """What the suite loads its processor with (chatml where the folder's own template is refused)."""
    refused: str | None = None
    """The refusal of the folder's own template, if any."""

    def processor(self, **kwargs):
        from prism.models.processor import load_processor

        return load_processor(self.path, chat_template=kwargs.pop("chat_template", self.chat_template), **kwargs)


def _cases() -> list:
    cases = [pytest.param(("published", name), id=name) for name in PUBLISHED]
    cases += [pytest.param(("own", f), id=f"tiny-{f}") for f in FAMILIES]
    for d in filter(None, os.environ.get("PRISM_MODEL_DIRS", "").split(os.pathsep)):
        cases.append(pytest.param(("user", d), id=Path(d).name))
    return cases


def _published_source(name: str, into: Path) -> Path:
    """A folder with the checkpoint's small files and the shared vocabulary beside them."""
    files, vocab = QWEN_FILES / name, QWEN_FILES / "tokenizer"
    if not (files / "config.json").is_file() or not (vocab / "vocab.json").is_file():
        pytest.skip(f"the published files of {name} are not in {QWEN_FILES} (set PRISM_QWEN_FILES to a folder with "
                    f"{name}/ and tokenizer/)")
    into.mkdir(parents=True)
    for f in [*files.iterdir(), vocab / "vocab.json", vocab / "merges.txt"]:
        (into / f.name).symlink_to(f.resolve())
    return into


@pytest.fixture(scope="session", params=_cases())
def case(request, tmp_path_factory) -> Case:
    from prism.models.tiny import build_like, build_tiny

    kind, what = request.param
    work = tmp_path_factory.mktemp(f"family-{Path(str(what)).name}")
    if kind == "own":
        path, source = build_tiny(work / "tiny", family=what), None
        name = f"tiny-{what}"
    else:
        source = _published_source(what, work / "source") if kind == "published" else Path(what)
        path, name = build_like(source, work / "tiny"), Path(str(what)).name
    family = family_named(read_json_object(path / "config.json", "config.json")["model_type"], str(path))
    c = Case(name, family, path, source)
    try:
        c.processor()
    except ConfigError as e:  # the folder's own template does not fit PRISM: the rest runs under chatml
        c.refused, c.chat_template = str(e), "chatml"
    return c


@pytest.fixture(scope="session")
def loaded(case):
    """(model in eval mode, processor) of the case, loaded once per session."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(case.path).eval(), case.processor()
