"""Running a ``prepare-data`` command's tasks: in-process or in worker processes, behind a progress bar.

:func:`run_tasks` skips ids whose two files already exist: every file is written under a temporary
name and renamed (:mod:`msattn.data.prepare.writer`), so a file under its final name is complete,
and re-running the command resumes an interrupted run. One bad item becomes an ``error`` result;
it does not stop the others.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from msattn.data.prepare.common import DONE, ERROR, Result, Task, make_console
from msattn.data.prepare.output_folder import is_done
from msattn.data.prepare.writer import Target
from msattn.errors import MsattnError, ResourceError

#: a source's worker: parse one task's item and write it with :func:`msattn.data.prepare.writer.write_item`
ProcessFn = Callable[[Task, Target], Result]


def run_tasks(process: ProcessFn, tasks: Sequence[Task], target: Target, workers: int) -> list[Result]:
    """Run ``process`` over ``tasks`` (skipping finished ids) with a progress bar; results in task order.

    ``workers`` <= 0 runs in this process; otherwise that many spawned processes share the work.
    """
    results: dict[int, Result] = {}
    todo: list[tuple[int, Task]] = []
    for index, task in enumerate(tasks):
        if is_done(target.out, task.id):
            results[index] = task.result(DONE)
        else:
            todo.append((index, task))

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    run_one = functools.partial(_run_one, process, target)
    with Progress(*columns, console=make_console(stderr=True), transient=False) as progress:
        bar = progress.add_task(target.name.replace("_", "-"), total=len(tasks), completed=len(results))
        if workers <= 0 or len(todo) <= 1:
            for index, task in todo:
                results[index] = run_one(task)
                progress.advance(bar)
        else:
            for index, result in _run_pool(run_one, todo, workers):
                results[index] = result
                progress.advance(bar)
    return [results[i] for i in range(len(tasks))]


def _run_one(process: ProcessFn, target: Target, task: Task) -> Result:
    try:
        return process(task, target)
    except MsattnError as exc:
        return task.result(ERROR, str(exc))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others; reported below
        return task.result(ERROR, f"{task.id}: unexpected {type(exc).__name__}: {exc}")


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
