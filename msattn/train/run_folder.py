"""The run folder's rules: one writer, no accidental reuse, outputs never over inputs.

- ``train`` holds :func:`msattn.locks.folder_lock` on the run folder for its whole run (rank 0
  under DDP); a second ``train`` into the same folder stops at once, naming the holder.
- A folder that holds another run's files (:data:`RUN_FILES`) is refused unless ``--resume``
  continues that run or ``--overwrite`` replaces it. ``--overwrite`` deletes nothing: at the
  first finished step the old run's files move to ``<out>/replaced-<date>-<time>/``; files
  msattn does not write stay where they are.
- A run folder that is (or is inside) the dataset folder is refused, and so is one where an
  output would replace an input (a recipe, ``model.pretrained`` or ``model.init_from`` file
  named like a run file).
- Nothing is written before the first step has finished: ``config.json``, ``metrics.jsonl``
  and TensorBoard events start then (:func:`begin_run`), so a run that fails at start-up
  leaves the folder as it was (and removes it if it created it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from msattn.config.recipe import Recipe
from msattn.errors import MsattnError, TrainingError, UsageError
from msattn.io import clean_temporaries, write_json
from msattn.locks import folder_lock
from msattn.runtime.distributed import DistInfo, broadcast_object

CHECKPOINTS = ("last.pt", "best.pt", "failed.pt")
#: What ``train`` writes into a run folder (besides the lock files).
RUN_FILES = (*CHECKPOINTS, "config.json", "metrics.jsonl", "eval.json", "tensorboard")
REPLACED_PREFIX = "replaced-"

T = TypeVar("T")


def on_rank0(info: DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result, or its error, reaches every rank (which would otherwise wait forever)."""
    result: Any = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if info.distributed:
        summary = None
        if error is not None:
            summary = (type(error) if isinstance(error, MsattnError) else TrainingError, str(error))
        summary = broadcast_object(summary, info)
        if summary is not None:
            if error is not None:
                raise error
            raise summary[0](summary[1])
        return broadcast_object(result, info)
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def run_folder_lock(out_dir: Path, command: str, info: DistInfo) -> Iterator[None]:
    """Hold the run folder's write lock (rank 0) for the block; a busy folder stops every rank."""
    with contextlib.ExitStack() as stack:
        on_rank0(info, lambda: stack.enter_context(folder_lock(out_dir, command)))
        yield


def check_inputs_apart(out_dir: Path, recipe: Recipe, recipe_path: Path | None, resume: bool) -> None:
    """Refuse a run folder inside the dataset folder, or one whose outputs would replace an input file."""
    out = Path(out_dir).expanduser().resolve()
    root = Path(recipe.data.root).expanduser().resolve()
    if out == root or root in out.parents:
        raise UsageError(
            f"{out_dir}: the run folder is {'the' if out == root else 'inside the'} dataset folder {recipe.data.root}; "
            "training would write checkpoints and logs among the data: choose another --out"
        )
    if resume and (out / "last.pt").is_file():
        return  # a resumed run reads last.pt, not its initial weights
    inputs = {"the recipe": recipe_path, "model.pretrained": recipe.model.pretrained,
              "model.init_from": recipe.model.init_from}  # fmt: skip
    for what, value in inputs.items():
        if value is None or value == "torchvision":
            continue
        path = Path(value).expanduser().resolve()
        inside = path.parent == out and path.name in RUN_FILES
        if inside or out / "tensorboard" in path.parents:
            raise UsageError(
                f"{value}: {what} is a file of the run folder {out_dir} that training replaces; "
                "copy it elsewhere or choose another --out"
            )


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to reuse a run folder by accident and check that it is writable (rank 0, under the lock).

    Returns the run files ``--overwrite`` will move aside at the first finished step.
    """
    found = refuse_reuse(out_dir, resume, overwrite)
    try:
        write_probe(out_dir)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{out_dir}: the run folder is not writable ({reason}); choose another --out") from None
    return found if overwrite else []


def refuse_reuse(out_dir: Path, resume: bool, overwrite: bool) -> list[str]:
    """The run files in ``out_dir``; refused without ``--resume`` or ``--overwrite`` (reads only, runs twice)."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not resume and not overwrite:
        what = "another run's checkpoints" if set(found) & set(CHECKPOINTS) else "another run's files"
        raise UsageError(
            f"{out_dir}: holds {what} ({', '.join(found)}); add --resume to continue that run, --overwrite to start "
            f"afresh (its files move to {out_dir / (REPLACED_PREFIX + '<date>-<time>')}), or choose another --out"
        )
    return found


def write_probe(folder: Path) -> None:
    """Write and remove a small file in ``folder`` (an OSError says it cannot be written)."""
    probe = folder / f".tmp-write-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"msattn")
    finally:
        probe.unlink(missing_ok=True)


def move_aside(out_dir: Path, names: list[str]) -> Path | None:
    """Move the run files ``names`` of ``out_dir`` into a new ``replaced-<date>-<time>`` folder inside it."""
    present = [name for name in names if (out_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = out_dir / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir()
    for name in present:
        os.replace(out_dir / name, target / name)
    return target


def begin_run(out_dir: Path, config: dict[str, Any], replaced: list[str]) -> Path | None:
    """The first write of a run (rank 0, after its first step): old files aside, leftovers gone, config.json.

    Returns the folder the replaced run's files went to (``--overwrite``), or None.
    """
    moved = move_aside(out_dir, replaced)
    clean_temporaries(out_dir)
    write_json(out_dir / "config.json", config)
    return moved
