"""The output folder of ``prepare-data``: the names written there, and the checks before writing.

Every ``prepare_*`` function is decorated with :func:`locked_output`: it refuses an ``--out``
that is a source folder (or would write where a source lies), and holds the output folder's lock
(:func:`msattn.locks.folder_lock`) for the whole run. :func:`prepare_output` refuses a folder
holding files that prepare-data did not write, or prepared with other settings.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msattn.data.prepare.common import PrepareSummary
from msattn.errors import DataError, UsageError
from msattn.io import clean_temporaries, read_json, write_json
from msattn.locks import OWNER_NAME, folder_lock

MARKER_NAME = ".msattn-prepare.json"
REPORT_NAME = "prepare_report.json"

#: What prepare-data writes directly in ``--out`` (a folder holding one of these without the marker is refused).
WRITTEN_NAMES = ("images", "labels", "train.txt", "val.txt", "trainval.txt", "dataset.json", REPORT_NAME)


def locked_output(*source_args: str) -> Callable[[Callable[..., PrepareSummary]], Callable[..., PrepareSummary]]:
    """Decorate a ``prepare_*(..., out, ...)`` function: check ``out`` against its source folders (the
    arguments named ``source_args``, shown as ``--<name>``) and hold ``out``'s lock for the whole call.
    """
    def wrap(fn: Callable[..., PrepareSummary]) -> Callable[..., PrepareSummary]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> PrepareSummary:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = Path(bound.arguments["out"])
            sources = {f"--{n}": Path(bound.arguments[n]) for n in source_args if bound.arguments[n] is not None}
            check_sources(out, sources)
            with folder_lock(out, f"msattn prepare-data ({fn.__name__})"):
                return fn(*args, **kwargs)

        return run

    return wrap


def check_sources(out: Path, sources: dict[str, Path]) -> None:
    """Refuse an ``out`` that could write over or mix with a source: the source folder itself, or a
    folder holding the source where prepare-data writes (``out/images``, ``out/labels``). An ``out``
    inside a source folder (``--voc data --out data/voc``) or holding it elsewhere
    (``--voc data/voc/VOC2012 --out data/voc``) is fine: every name written there is new.
    """
    target = Path(os.path.abspath(out))
    for option, source in sources.items():
        src = Path(os.path.abspath(source))
        if target == src or _samefile(target, src):
            raise UsageError(f"--out {out}: is the {option} folder; prepare-data never writes into its sources' "
                             "folders: choose another folder, e.g. a new folder beside it")  # fmt: skip
        for written in ("images", "labels"):
            if src.is_relative_to(target / written) or _samefile(target / written, src):
                raise UsageError(f"--out {out}: would write {target / written}, where the {option} folder {source} "
                                 "lies: choose another --out")  # fmt: skip


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prepare_output(out: Path, name: str, params: dict[str, Any]) -> None:
    """Create ``out``'s folders, remove temporaries left by a killed run, and pin the settings.

    Must run inside :func:`locked_output` (the lock of ``out`` held by this process). A folder
    prepared earlier with other settings (another seed, size, dataset) is refused, since resuming
    into it would mix two datasets; so is one holding files prepare-data did not write.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    _require_lock(out)
    marker = out / MARKER_NAME
    wanted = {"name": name, "params": params}
    if marker.is_file():
        try:
            found = read_json(marker)
        except DataError:
            found = None  # a damaged marker cannot pin anything; rewrite it
        if found is not None and found != wanted:
            raise DataError(
                f"{out}: was prepared with other settings ({_describe_difference(found, wanted)}); "
                "choose another --out or delete the folder"
            )
    elif (out / "dataset.json").is_file():
        raise DataError(f"{out}: holds a dataset.json not written by this command; choose another --out")
    else:
        foreign = [n for n in WRITTEN_NAMES if (out / n).exists() and not _is_empty_dir(out / n)]
        if foreign:
            raise DataError(
                f"{out}: holds {', '.join(foreign)} not written by prepare-data (no {MARKER_NAME}); prepare-data never "
                "writes over them: choose another --out"
            )
    for sub in (out, out / "images", out / "labels"):
        sub.mkdir(parents=True, exist_ok=True)
        clean_temporaries(sub)
    write_json(marker, wanted)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _require_lock(out: Path) -> None:
    """A programming error when ``out``'s lock is not held by this process (see :func:`locked_output`)."""
    try:
        owner = json.loads((out / OWNER_NAME).read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != os.getpid():
        raise RuntimeError(f"{out}: prepare_output() runs only inside a @locked_output prepare_* function")


def _describe_difference(found: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(found, dict) or found.get("name") != wanted["name"]:
        name = found.get("name") if isinstance(found, dict) else None
        return f"dataset {name!r}, not {wanted['name']!r}"
    old = found.get("params") or {}
    keys = sorted(k for k in set(old) | set(wanted["params"]) if old.get(k) != wanted["params"].get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {wanted['params'].get(k)!r}" for k in keys[:4])


def image_path(out: Path, item_id: str) -> Path:
    return out / "images" / f"{item_id}.jpg"


def label_path(out: Path, item_id: str) -> Path:
    return out / "labels" / f"{item_id}.png"


def is_done(out: Path, item_id: str) -> bool:
    """Both files of ``item_id`` exist under their final names (so both are complete)."""
    return image_path(out, item_id).is_file() and label_path(out, item_id).is_file()
