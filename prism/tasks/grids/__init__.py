"""The embedded demo task: coloured grids with a perception part (caption the cells) and a reasoning
part (count / compare). `generator` writes the data (`prism-synth`), `task` is its `Task` object.

    data.task: grids          # in a stage config: caption checks, per-question accuracy, corruptions
"""

from prism.tasks.grids.task import TASK, GridTask

__all__ = ["TASK", "GridTask"]
