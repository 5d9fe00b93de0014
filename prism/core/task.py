"""The task interface: what a task (the embedded colour grids, or a user's own) adds to the library.

The library trains and evaluates any data without a task. A task adds what only it can know:

- whether a response's caption describes the example's image (perception accuracy and the split of
  the errors into perception and reasoning, `prism.eval.metrics`; ALIGN's rollout monitors), and,
  optionally (a method `caption_errors(caption, example) -> list[str] | None` and the tuple
  `caption_error_kinds` of what it can name), what kinds of error a caption makes
  (`caption_error/<kind>` in evaluation and ALIGN's rollout monitors; the grids task tells a colour
  error from a layout error), and (`caption_negatives(response, example) -> dict[str, str]`) the
  response with only its caption made wrong in each such way (the pipeline probes ALIGN's
  discriminators with them);
- the groups an example belongs to, for per-group accuracy (`acc/<group>`);
- warm-start negatives with one perception and one reasoning error (`warmup.negatives=corrupt`);
- for the pipeline, its data splits.

A task is chosen by name in the config (`data.task`): a name registered in `TASKS`, or
`module.path:attribute` naming a `Task` object, imported when a run starts. Nothing in the library
imports a task's module.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Protocol, runtime_checkable

from prism.core.errors import ConfigError
from prism.core.example import Example

TASKS = {"grids": "prism.tasks.grids:TASK"}
"""Built-in task names -> `module:attribute` of their Task object."""


@runtime_checkable
class Task(Protocol):
    name: str
    table_groups: tuple[str, ...]
    """Groups (of `groups`) shown as columns of the pipeline's results table, in order."""

    def caption_correct(self, caption: str | None, example: Example) -> bool | None:
        """Whether `caption` describes the example's image; None when the example has no ground truth."""

    def groups(self, example: Example) -> list[str]:
        """The groups `example` belongs to (e.g. its question type), for per-group accuracy."""

    def corrupt_response(self, response: str, rng: random.Random) -> str:
        """`response` with one perception error in its caption and one reasoning error in its think."""

    def make_data(self, out: Path, settings: dict) -> None:
        """Write the pipeline's splits to `out`: public.jsonl (the SFT pool), curated.jsonl, align.jsonl
        (prompts with teacher references), rl.jsonl and test.jsonl (with answers), and meta.json last.
        `settings` are the pipeline config's `synth` section; a bad one raises ConfigError."""


def load_task(name: str | None, key: str = "data.task") -> Task | None:
    """The task named `name` (see the module docstring), or None for none."""
    if not name:
        return None
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ConfigError(f"{key}: unknown task {name!r}; use one of {', '.join(TASKS)} or module.path:attribute")
    module, _, attr = target.partition(":")
    try:
        task = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import task {name!r}: {e}") from None
    if not isinstance(task, Task):
        raise ConfigError(f"{key}: {name!r} is not a prism.core.task.Task (it lacks part of the interface)")
    return task
