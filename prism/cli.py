"""Console entry points (see [project.scripts] in pyproject.toml).

Each stage's module owns its argument parsing; this file only routes, and turns prism's own
input errors (bad config, bad data, missing files) into a one-line message and exit code 2, and a
run that cannot go on (NaN loss, dynamic sampling exhausted) into one line and exit code 1,
instead of a traceback. (`prism-synth` belongs to the demo task: `prism.tasks.grids.generator`.)
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from prism.core.errors import ConfigError, DataError, RunError


def run_main(fn: Callable[[], object]) -> None:
    """Run a console script's `main`, printing prism's own errors as one line (exit 2: input, 1: run)."""
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

    run_main(main)


def tiny() -> None:
    from prism.models.tiny import main

    run_main(main)


def align() -> None:
    from prism.align.train import main

    run_main(main)


def rl() -> None:
    from prism.rl.train import main

    run_main(main)


def eval() -> None:  # noqa: A001 - the console script is called prism-eval
    from prism.eval.run import main

    run_main(main)


def pipeline() -> None:
    from prism.pipeline import main

    run_main(main)
