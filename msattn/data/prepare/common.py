"""Machinery shared by every ``prepare-data`` command.

A command turns its source into a list of :class:`Task` (one per output id), and a
top-level ``process(task, out) -> Result`` function that writes ``images/<id>.jpg`` and
``labels/<id>.png`` for one task. :func:`run_tasks` runs them in-process or in a
``ProcessPoolExecutor`` behind a Rich progress bar, skipping ids whose two files already
exist: every file is written under a temporary name and renamed, so a file under its
final name is complete, and re-running the command resumes an interrupted run.
:func:`finish` writes ``train.txt``, ``val.txt``, ``dataset.json`` and
``prepare_report.json`` and prints the summary.

Images are **hard links** to the source JPEGs when source and output share a file
system (no extra disk space; do not edit them in place), and copies otherwise.

Every ``prepare_*`` function is decorated with :func:`locked_output`: it refuses an ``--out``
that is a source folder (or would write where a source lies), and holds the
output folder's lock (:func:`msattn.locks.folder_lock`) for the whole run, so that a second
``prepare-data`` into the same folder stops at once. :func:`prepare_output` refuses a folder
holding files that prepare-data did not write. Both live in
:mod:`msattn.data.prepare.output_folder` and are re-exported here.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msattn import __version__
from msattn.data.palette import flat_palette
from msattn.data.prepare.output_folder import (  # the output folder's names and checks (re-exported)
    MARKER_NAME,
    REPORT_NAME,
    WRITTEN_NAMES,
    check_sources,
    image_path,
    is_done,
    label_path,
    locked_output,
    prepare_output,
)
from msattn.errors import DataError, MsattnError, ResourceError
from msattn.io import atomic_write, write_id_list, write_json

IGNORE_INDEX = 255
SPLITS = ("train", "val")
#: splits a command may produce besides SPLITS; their lists are written only when they hold ids
OPTIONAL_SPLITS = ("test",)

# Result statuses
WRITTEN, DONE, MISSING, SKIPPED, ERROR = "written", "done", "missing", "skipped", "error"

__all__ = [
    "DONE", "ERROR", "IGNORE_INDEX", "MARKER_NAME", "MISSING", "OPTIONAL_SPLITS", "REPORT_NAME", "SKIPPED", "SPLITS",
    "WRITTEN", "WRITTEN_NAMES", "PrepareSummary", "ProcessFn", "Result", "Task", "check_image", "check_label_values",
    "check_sources", "dataset_palette", "dedupe", "finish", "image_path", "is_done", "label_path", "link_or_copy",
    "locked_output", "make_console", "prepare_output", "run_tasks", "save_label",
]  # fmt: skip


@dataclass(frozen=True)
class Task:
    """One output id: its split, its id and whatever (picklable) the dataset's worker needs."""

    split: str
    id: str
    payload: Any = None


@dataclass(frozen=True)
class Result:
    """What became of one task. ``message`` says why for missing/skipped/error."""

    split: str
    id: str
    status: str
    message: str = ""


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


def make_console(stderr: bool = False) -> Any:
    """A Rich console bound to the current stdout/stderr (created per call so captured streams work)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ----------------------------------------------------------------------------- writing files


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically place ``src`` at ``dst``: a hard link when possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.parent / f".tmp-{dst.name}.{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as source, atomic_write(dst, "wb") as handle:
            shutil.copyfileobj(source, handle)
        return
    try:
        os.replace(tmp, dst)
    finally:
        # rename() is a no-op when both names are links to one file: never leave the temporary behind
        tmp.unlink(missing_ok=True)


def save_label(label: np.ndarray, path: Path, palette: Sequence[Sequence[int]] | None = None) -> None:
    """Write an ``[H, W]`` uint8 class-index map as an 8-bit palette PNG (atomically).

    ``palette``: one ``[r, g, b]`` per class (the dataset's own colours, as :func:`finish` records
    them); the VOC colour map fills every other index, and is the whole palette when ``None``.
    """
    from PIL import Image

    from msattn.io import save_image

    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"labels must be 2-D uint8, got {label.dtype} {label.shape}")
    img = Image.fromarray(np.ascontiguousarray(label))  # mode "L"
    key = None if palette is None else tuple(tuple(int(v) for v in rgb) for rgb in palette)
    img.putpalette(_label_palette(key))  # -> mode "P", indices unchanged
    save_image(img, path)


@functools.cache
def _label_palette(colours: tuple[tuple[int, ...], ...] | None = None) -> list[int]:
    """The 768-value palette of prepared label PNGs (computed once per process and colour list)."""
    return flat_palette([list(rgb) for rgb in colours] if colours is not None else None)


def dataset_palette(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """The ``palette`` of ``dataset.json``: the first ``num_classes`` colours of :func:`save_label`'s palette."""
    flat = _label_palette(None if palette is None else tuple(tuple(int(v) for v in rgb) for rgb in palette))
    return [flat[3 * i : 3 * i + 3] for i in range(num_classes)]


def check_label_values(label: np.ndarray, num_classes: int, source: Path | str) -> None:
    """Raise :class:`DataError` naming ``source`` if a value is neither a class index nor 255."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise DataError(
            f"{source}: label values {shown} outside the class range 0..{num_classes - 1} (255 = ignore)"
        )


def check_image(src: Path, size: tuple[int, int] | None = None) -> None:
    """Fully decode an image (corrupt or truncated files raise :class:`DataError`); check its (W, H).

    The size may match the stored pixels or the image turned by its EXIF orientation: the
    dataset reader picks the one its label matches (:func:`msattn.data.labels.orient_to_label`).
    """
    from msattn.io import EXIF_ORIENTATION, open_image

    img = open_image(src, mode=None, orient=False)
    turned = img.size[::-1] if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else img.size  # 90-degree turns
    if size is not None and tuple(size) not in (img.size, turned):
        raise DataError(
            f"{src}: image is {img.size[0]}x{img.size[1]} but its annotation is {size[0]}x{size[1]}"
        )


# ----------------------------------------------------------------------------- running tasks

ProcessFn = Callable[[Task, Path], Result]


def _run_one(process: ProcessFn, out: Path, task: Task) -> Result:
    try:
        return process(task, out)
    except MsattnError as exc:
        return Result(task.split, task.id, ERROR, str(exc))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others; reported below
        return Result(task.split, task.id, ERROR, f"{task.id}: unexpected {type(exc).__name__}: {exc}")


def run_tasks(
    process: ProcessFn, tasks: Sequence[Task], out: Path, workers: int, description: str
) -> list[Result]:
    """Run ``process`` over ``tasks`` (skipping finished ids) with a progress bar; results in task order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    results: dict[int, Result] = {}
    todo: list[tuple[int, Task]] = []
    for index, task in enumerate(tasks):
        if is_done(out, task.id):
            results[index] = Result(task.split, task.id, DONE)
        else:
            todo.append((index, task))

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    run_one = functools.partial(_run_one, process, out)
    with Progress(*columns, console=make_console(stderr=True), transient=False) as progress:
        bar = progress.add_task(description, total=len(tasks), completed=len(results))
        if workers <= 0 or len(todo) <= 1:
            for index, task in todo:
                results[index] = run_one(task)
                progress.advance(bar)
        else:
            for index, result in _run_pool(run_one, todo, workers):
                results[index] = result
                progress.advance(bar)
    return [results[i] for i in range(len(tasks))]


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops handing out work and lets them finish their file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_pool(
    run_one: Callable[[Task], Result], todo: list[tuple[int, Task]], workers: int
) -> Iterator[tuple[int, Result]]:
    workers = min(workers, len(todo))
    chunksize = max(1, min(16, len(todo) // (workers * 8)))
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )
    try:
        indices = [index for index, _ in todo]
        yield from zip(indices, executor.map(run_one, [task for _, task in todo], chunksize=chunksize))
    except BrokenProcessPool:
        raise ResourceError(
            "a worker process died (out of memory?); re-run with fewer --workers: finished files are kept"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- finishing


def dedupe(ids: Sequence[str]) -> list[str]:
    """``ids`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(ids))


def finish(
    *,
    name: str,
    out: Path,
    source: Path | str,
    classes: Sequence[str],
    results: Sequence[Result],
    sources: dict[str, Any],
    extra: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
    palette: Sequence[Sequence[int]] | None = None,
    notes: Sequence[str] = (),
    unions: dict[str, Sequence[str]] | None = None,
    why_empty: dict[str, str] | None = None,
) -> PrepareSummary:
    """Write the lists, ``dataset.json`` and the report; print the summary; fail if nothing is usable.

    ``palette``: the class colours given to :func:`save_label` (None: the VOC colour map).
    ``notes``: details written to the report only (``warnings`` are printed and written).
    A ``test`` split (results with split ``"test"``) gets a ``test.txt`` when it holds ids.
    ``unions`` names extra lists made of whole splits, e.g. ``{"trainval": ("train", "val")}``.
    ``why_empty``: split -> why the source gives it no ids, added to the warning of an empty split.
    """
    names = list(SPLITS) + [s for s in OPTIONAL_SPLITS if any(r.split == s for r in results)]
    summary = _collect(name, out, names, results, warnings)
    splits = summary.splits
    for split in SPLITS:
        if not splits[split] and any(splits.values()):
            why = (why_empty or {}).get(split)
            summary.warnings.append(f"the {split} split is empty" + (f" ({why})" if why else ""))
    report = {
        "missing": {f"{r.split}/{r.id}": r.message for r in summary.missing},
        "skipped": {f"{r.split}/{r.id}": r.message for r in summary.skipped},
        "errors": {f"{r.split}/{r.id}": r.message for r in summary.errors},
        "warnings": list(summary.warnings),
        "notes": list(notes),
    }
    write_json(out / REPORT_NAME, report)
    _print_summary(summary, results)

    if not any(splits.values()):
        first = (summary.errors or summary.missing or summary.skipped or [None])[0]
        detail = f"; first problem: {first.message}" if first is not None else ""
        raise DataError(
            f"{source}: nothing usable was produced ({len(summary.missing)} missing, "
            f"{len(summary.skipped)} skipped, {len(summary.errors)} unreadable{detail}); "
            f"full list in {out / REPORT_NAME}"
        )

    _write_dataset(summary, names, classes, sources, extra, palette, unions)
    return summary


def _write_dataset(
    summary: PrepareSummary, names: Sequence[str], classes: Sequence[str], sources: dict[str, Any],
    extra: dict[str, Any] | None, palette: Sequence[Sequence[int]] | None, unions: dict[str, Sequence[str]] | None,
) -> None:
    """The id lists (``<split>.txt`` and the ``unions``) and ``dataset.json`` of a finished run."""
    out, splits = summary.out, summary.splits
    for split in names:
        if split in SPLITS or splits[split]:
            write_id_list(out / f"{split}.txt", splits[split])
    for union, parts in (unions or {}).items():
        write_id_list(out / f"{union}.txt", dedupe([i for part in parts for i in splits[part]]))
    info = {
        "format": "msattn-dataset",
        "format_version": 1,
        "name": summary.name,
        "classes": list(classes),
        "ignore_index": IGNORE_INDEX,
        "palette": dataset_palette(len(classes), palette),  # the colours of save_label's palette
        "counts": summary.counts,
        "sources": sources,
        "msattn_version": __version__,
    }
    info.update(extra or {})
    write_json(out / "dataset.json", info)


def _collect(
    name: str, out: Path, names: Sequence[str], results: Sequence[Result], warnings: Sequence[str]
) -> PrepareSummary:
    """Sort ``results`` into usable ids per split and the missing / skipped / error lists."""
    splits: dict[str, list[str]] = {split: [] for split in names}
    summary = PrepareSummary(name=name, out=out, splits=splits, warnings=list(warnings))
    for result in results:
        if result.status in (WRITTEN, DONE):
            if result.id not in splits[result.split]:
                splits[result.split].append(result.id)
            summary.written += result.status == WRITTEN
            summary.already_done += result.status == DONE
        elif result.status == MISSING:
            summary.missing.append(result)
        elif result.status == SKIPPED:
            summary.skipped.append(result)
        else:
            summary.errors.append(result)
    return summary


def _print_summary(summary: PrepareSummary, results: Sequence[Result]) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = make_console()
    table = Table(title=Text(f"prepare-data {summary.name} -> {summary.out}"), title_justify="left")  # verbatim
    for column in ("split", "usable", "written", "already done", "missing", "skipped", "errors"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in summary.splits:
        status = Counter(r.status for r in results if r.split == split)
        table.add_row(
            split,
            str(len(summary.splits[split])),
            str(status[WRITTEN]),
            str(status[DONE]),
            str(status[MISSING]),
            str(status[SKIPPED]),
            str(status[ERROR]),
        )
    console.print(table)
    err = make_console(stderr=True)
    for group, label in ((summary.missing, "missing"), (summary.skipped, "skipped")):
        for message, count in Counter(r.message for r in group).most_common():
            err.print(f"{label}: {count} id(s): {message}", markup=False, soft_wrap=True)
    for result in summary.errors[:10]:
        err.print(f"[red]error:[/red] {escape(result.message)}", soft_wrap=True, highlight=False)
    if len(summary.errors) > 10:
        err.print(f"... and {len(summary.errors) - 10} more errors", markup=False)
    if summary.missing or summary.skipped or summary.errors:
        err.print(f"full list of problems: {summary.out / REPORT_NAME}", markup=False, soft_wrap=True)
    for message in summary.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)
