"""Console entry points (see [project.scripts] in pyproject.toml).

Each stage's module owns its argument parsing; this file only routes, and turns prism's own
input errors (bad config, bad data, missing files) into a one-line message and exit code 2, and a
run that cannot go on (NaN loss, dynamic sampling exhausted) into one line and exit code 1,
instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from prism.config import ConfigError
from prism.data.example import DataError
from prism.loop import RunError


def _run(fn: Callable[[], object]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        fn()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


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
    from prism.align.train import main

    _run(main)


def rl() -> None:
    from prism.rl.train import main

    _run(main)


def eval() -> None:  # noqa: A001 - the console script is called prism-eval
    from prism.eval.run import main

    _run(main)


def pipeline() -> None:
    from prism.pipeline import main

    _run(main)
