"""Folders of saved probabilities through the dense CRF: ``msattn crf-refine`` and its grid search.

:func:`refine_folder` refines a folder written by ``msattn predict --save-probs`` with worker
processes, into an output folder that is locked, never an input folder, and whose files carry
a mark of the settings and inputs that made them (:mod:`msattn.outputs`); :func:`grid_search`
scores a small grid against ground truth. The per-image pieces are in :mod:`msattn.crf.dense`.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from msattn import __version__
from msattn.config.crf import CRFParams
from msattn.crf.dense import dense_crf, import_densecrf
from msattn.crf.files import (
    SEARCH_FILE,
    SEARCH_GRID,
    confusion_matrix,
    find_image,
    load_pair,
    mean_iou,
    palette_of,
    read_label,
    resolve_params,
)
from msattn.data.labels import WarningLog, distinct_values, label_warnings
from msattn.errors import DataError, UsageError
from msattn.images import save_image
from msattn.io import clean_temporaries, write_json
from msattn.locks import folder_lock
from msattn.outputs import (
    Item,
    Mark,
    check_output_file,
    inputs_key,
    json_written_by,
    mark_params,
    plan_outputs,
    refuse_inputs_in_out,
    settings_key,
    write_settings,
)
from msattn.visualize import label_image


def refine_one(
    image_path: Path, npz_path: Path, out_path: Path, params: CRFParams, mark: Any = None
) -> str | None:
    """Refine one image and write ``out_path`` (palette PNG, carrying ``mark``). Returns an error message or None."""
    try:
        image, data = load_pair(image_path, npz_path)
        refined = dense_crf(image, data["probs"].astype(np.float32), params)
        labels = refined.argmax(axis=0).astype(np.uint8)
        save_image(label_image(labels, palette_of(data)), out_path, **(mark_params(out_path, mark) if mark else {}))
    except DataError as exc:
        return str(exc)
    return None


def _search_one(
    image_path: Path, npz_path: Path, label_path: Path, params: CRFParams | None
) -> tuple[np.ndarray, list[str]] | str:
    """Confusion matrix [C,C] of the CRF (or argmax when ``params`` is None) for one image and the
    warnings about its label (:func:`msattn.data.labels.label_warnings`), or an error message."""
    try:
        image, data = load_pair(image_path, npz_path)
        probs = data["probs"].astype(np.float32)
        label = read_label(label_path, probs.shape[0], probs.shape[1:])
        refined = dense_crf(image, probs, params) if params is not None else probs
        warnings = label_warnings(distinct_values(label), probs.shape[0]) if params is None else []
        return confusion_matrix(refined.argmax(axis=0), label, probs.shape[0]), warnings
    except DataError as exc:
        return str(exc)


# ----------------------------------------------------------------------------- parallel driver


def _run_parallel(
    fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], workers: int, description: str
) -> Iterator[tuple[int, Any]]:
    """Yield (task index, result) as tasks finish, with a Rich progress bar on stderr."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        bar = progress.add_task(description, total=len(tasks))
        if workers <= 0 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                yield i, fn(*task)
                progress.advance(bar)
            return

        # spawn: workers must not inherit the parent's thread pools (torch/OpenMP) through fork
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                yield futures[future], future.result()
                progress.advance(bar)


def _err_console() -> Any:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _skipped(console: Any, message: str) -> None:
    console.print(f"skipped {message}", markup=False)


def _list_npz(probs: Path) -> list[str]:
    if not probs.is_dir():
        raise DataError(f"{probs}: probabilities folder not found")
    names = sorted(p.stem for p in probs.glob("*.npz") if p.is_file())
    if not names:
        raise DataError(f"{probs}: no .npz files (write them with: msattn predict --save-probs)")
    return names


def refine_folder(
    images: Path, probs: Path, out: Path, params: CRFParams | None = None, workers: int = 2
) -> dict[str, int]:
    """Refine every ``<name>.npz`` in ``probs`` with its image from ``images``; write ``out/<name>.png``.

    ``out`` must not be an input folder, and holds nothing crf-refine did not write (refused
    before any work); it is locked while the command runs. Every output carries a mark of the
    CRF settings and of its image and ``.npz`` (:mod:`msattn.outputs`): outputs whose mark
    matches are kept (resume), others redone with a note saying why. A missing or corrupt
    input is reported and skipped. Returns counts {"refined", "skipped_done", "failed"};
    DataError if nothing could be refined.
    """
    params = params or CRFParams()
    names = _list_npz(probs)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    _check_out(out, images, probs)
    settings = {"crf": params.to_dict(), "msattn_version": __version__}
    key = settings_key(settings)
    console = _err_console()
    found, failed, problems = [], 0, []
    for name in names:
        image_path = find_image(images, name)
        if image_path is None:
            problems.append(f"{name}: no image {name}.jpg/.png/... in {images}")
            _skipped(console, problems[-1])
            failed += 1
        else:
            found.append((name, image_path, probs / f"{name}.npz"))
    items = [Item((f"{n}.png",), Mark("crf-refine", key, inputs_key([i, z]))) for n, i, z in found]
    plan = plan_outputs(out, items, "crf-refine", settings, keep_current=True)
    with folder_lock(out, "msattn crf-refine"):
        clean_temporaries(out)
        for note in plan.notes:
            console.print(f"note: {note}", markup=False)
        if plan.done:
            console.print(f"resuming: {len(plan.done)} of {len(names)} already refined in {out}", markup=False)
        tasks = [(found[i][1], found[i][2], out / f"{found[i][0]}.png", params, items[i].mark) for i in plan.todo]
        refined = 0
        try:
            for i, error in _run_parallel(refine_one, tasks, workers, "CRF refine"):
                if error is None:
                    refined += 1
                else:
                    failed += 1
                    problems.append(f"{tasks[i][1].stem}: {error}")
                    _skipped(console, problems[-1])
        finally:
            if refined:
                write_settings(out, "crf-refine", key, settings)
        if (tasks or failed) and refined == 0:
            first = f"; first: {problems[0]}" if problems else ""
            raise DataError(f"{probs}: none of the {len(names)} images could be refined{first}")
    return {"refined": refined, "skipped_done": len(plan.done), "failed": failed}


def _check_out(out: Path, images: Path, probs: Path, labels: Path | None = None) -> None:
    """Refuse an ``--out`` that is a file or one of the input folders (before any work)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    folders = {"--images": images, "--probs (predict's output: its label maps would be replaced)": probs}
    if labels is not None:
        folders["--labels"] = labels
    refuse_inputs_in_out(out, folders)


def grid_search(
    images: Path,
    probs: Path,
    labels: Path,
    base: CRFParams | None = None,
    grid: Mapping[str, Iterable[float]] | None = None,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Score every combination of ``grid`` (default :data:`SEARCH_GRID`) by mIoU against ``labels``.

    Other settings come from ``base``. Returns rows sorted best first; each row holds the
    grid values, "params" (the full setting as a dict) and "miou". The plain argmax baseline
    is included as a row whose "params" is None.
    """
    base = base or CRFParams()
    grid = grid or SEARCH_GRID
    if not labels.is_dir():
        raise DataError(f"{labels}: label folder not found")
    console = _err_console()
    items = []
    for name in _list_npz(probs):
        image_path, label_path = find_image(images, name), labels / f"{name}.png"
        if image_path is None or not label_path.is_file():
            missing = label_path if image_path else images / f"{name}.jpg"
            _skipped(console, f"{name}: {missing} not found")
            continue
        items.append((image_path, probs / f"{name}.npz", label_path))
    if not items:
        raise DataError(f"{probs}: no image has both an image in {images} and a label in {labels}")
    keys = list(grid)
    settings: list[CRFParams | None] = [None] + [
        base.replace(**dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))
    ]
    tasks = [(*item, s) for s in settings for item in items]
    totals: list[np.ndarray | None] = [None] * len(settings)
    bad: set[str] = set()
    log = WarningLog()
    for i, result in _run_parallel(_search_one, tasks, workers, "CRF search"):
        if isinstance(result, str):
            if result not in bad:
                _skipped(console, result)
            bad.add(result)
            continue
        s = i // len(items)
        matrix, warnings = result
        log.extend(tasks[i][2], warnings)
        totals[s] = matrix if totals[s] is None else _add_confusion(totals[s], matrix)
    for line in log.lines():
        console.print(f"warning: {line}", markup=False)
    if totals[0] is not None and int(totals[0].sum()) == 0:
        raise DataError(f"{labels}: every pixel of every label is ignored (255): there is nothing to score")
    rows = []
    for s, total in zip(settings, totals):
        if total is None:
            raise DataError(f"{probs}: no image could be scored (see messages above)")
        row: dict[str, Any] = {k: (getattr(s, k) if s else None) for k in keys}
        row.update(params=s.to_dict() if s else None, miou=mean_iou(total))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["miou"] if not math.isnan(r["miou"]) else math.inf)


def _add_confusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape:
        raise DataError(f"probability files disagree on the number of classes ({a.shape[0]} vs {b.shape[0]})")
    return a + b


# ----------------------------------------------------------------------------- CLI


def crf_refine_command(
    images: Path,
    probs: Path,
    out: Path,
    overrides: Mapping[str, Any] | None = None,
    recipe: Path | None = None,
    labels: Path | None = None,
    search: bool = False,
    workers: int = 2,
) -> None:
    """``msattn crf-refine``: refine a folder of saved probabilities, or grid-search the CRF settings."""
    params = resolve_params(overrides, recipe)
    import_densecrf()  # a missing pydensecrf stops here, before any file is read or written
    console = Console(highlight=False, soft_wrap=True)
    if not search:
        if labels is not None:
            raise UsageError("--labels is only used with --search")
        counts = refine_folder(images, probs, out, params, workers)
        console.print(
            f"refined {counts['refined']}, already done {counts['skipped_done']}, failed {counts['failed']} -> {out}",
            markup=False,
        )
        return
    if labels is None:
        raise UsageError("--search needs --labels DIR (ground-truth label PNGs)")
    _check_out(out, images, probs, labels)
    result = out / SEARCH_FILE
    check_output_file(result, "--out", ours=lambda path: json_written_by(path, ("best", "results")))
    # settings given on the command line stay fixed; the others are searched
    grid = {key: (overrides[key],) if overrides.get(key) is not None else values for key, values in SEARCH_GRID.items()}
    rows = grid_search(images, probs, labels, params, grid=grid, workers=workers)
    _print_search(console, rows)
    best = next(r for r in rows if r["params"] is not None)
    with folder_lock(out, "msattn crf-refine --search"):
        write_json(result, {"best": best["params"] | {"miou": best["miou"]}, "results": rows})
    console.print(f"results written to {result}", markup=False)


def _print_search(console: Any, rows: list[dict[str, Any]]) -> None:
    table = Table(title="CRF grid search (mIoU, %)")
    for key in SEARCH_GRID:
        table.add_column(key, justify="right")
    table.add_column("mIoU", justify="right")
    for row in rows:
        cells = ["-" if row[k] is None else f"{row[k]:g}" for k in SEARCH_GRID]
        if row["params"] is None:
            cells = ["no CRF"] + [""] * (len(cells) - 1)
        table.add_row(*cells, f"{100 * row['miou']:.2f}")
    console.print(table)
    best = next(r for r in rows if r["params"] is not None)
    baseline = next(r for r in rows if r["params"] is None)
    setting = " ".join(f"--{k.replace('_', '-')} {best[k]:g}" for k in SEARCH_GRID)
    console.print(
        f"best: {setting} (mIoU {100 * best['miou']:.2f}, without CRF {100 * baseline['miou']:.2f})"
    )
