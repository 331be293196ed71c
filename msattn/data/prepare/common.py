"""The words every ``prepare-data`` module shares: splits, task results and the run's summary.

A command turns its source into a list of :class:`Task` (one per output id) and a top-level
``process(task, target) -> Result`` function that parses one item of its format and hands the
label and image to :func:`msattn.data.prepare.writer.write_item`. The other rooms of a run:

- :mod:`msattn.data.prepare.output_folder`: the ``--out`` checks, its lock and the file names there;
- :mod:`msattn.data.prepare.writer`: writing one item (image + label), the same for every source;
- :mod:`msattn.data.prepare.runner`: running the tasks in-process or in worker processes;
- :mod:`msattn.data.prepare.finish`: the id lists, ``dataset.json``, the report and the summary.

This module imports none of them, so each of them can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

IGNORE_INDEX = 255
SPLITS = ("train", "val")
#: splits a command may produce besides SPLITS; their lists are written only when they hold ids
OPTIONAL_SPLITS = ("test",)

# Result statuses
WRITTEN, DONE, MISSING, SKIPPED, ERROR = "written", "done", "missing", "skipped", "error"


@dataclass(frozen=True)
class Result:
    """What became of one task. ``message`` says why for missing/skipped/error."""

    split: str
    id: str
    status: str
    message: str = ""


@dataclass(frozen=True)
class Task:
    """One output id: its split, its id and whatever (picklable) the dataset's worker needs."""

    split: str
    id: str
    payload: Any = None

    def result(self, status: str, message: str = "") -> Result:
        """This task's :class:`Result` with ``status`` (and why, for missing/skipped/error)."""
        return Result(self.split, self.id, status, message)


@dataclass
class PrepareSummary:
    """Returned by every ``prepare_*`` function."""

    name: str
    out: Path
    splits: dict[str, list[str]]
    written: int = 0
    already_done: int = 0
    missing: list[Result] = field(default_factory=list)
    skipped: list[Result] = field(default_factory=list)
    errors: list[Result] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Number of usable ids per split."""
        return {split: len(ids) for split, ids in self.splits.items()}


def dedupe(ids: Sequence[str]) -> list[str]:
    """``ids`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(ids))


def make_console(stderr: bool = False) -> Console:
    """A Rich console bound to the current stdout/stderr (created per call so captured streams work)."""
    return Console(stderr=stderr, highlight=False)
