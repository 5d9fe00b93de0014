"""Console entry points (see [project.scripts] in pyproject.toml).

Each stage's module owns its argument parsing; this file only routes, and turns prism's own
input errors (bad config, bad data, missing files) into a one-line message and exit code 2
instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from prism.config import ConfigError
from prism.data.example import DataError


def _run(fn: Callable[[], object]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        fn()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _not_yet(name: str, issue: str) -> None:
    print(f"error: {name} is not implemented yet (tracked in the {issue} issue)", file=sys.stderr)
    sys.exit(2)


def sft() -> None:
    from prism.sft.train import main

    _run(main)


def tiny() -> None:
    from prism.models.tiny import main

    _run(main)


def synth() -> None:
    from prism.data.synthetic import main

    _run(main)


def align() -> None:
    _not_yet("prism-align", "Stage 2 (ALIGN)")


def rl() -> None:
    _not_yet("prism-rl", "Stage 3 (RLVR)")


def eval() -> None:  # noqa: A001 - the console script is called prism-eval
    _not_yet("prism-eval", "pipeline/evaluation")
