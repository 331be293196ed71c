"""The id lists shipped with msattn (top-level ``datasets/`` in the repository, ``msattn/_lists`` when installed).

``msattn/_lists`` is a symlink to ``../datasets`` in the source tree; building a wheel copies the files in
as package data, so the same lookup works in an editable install, a source checkout and a wheel.
"""

from __future__ import annotations

from pathlib import Path

from msattn.errors import DataError
from msattn.io import check_id, read_id_list

#: dataset name -> split name -> file name under ``datasets/<dataset>/``
SHIPPED_LISTS: dict[str, dict[str, str]] = {
    "person_part": {"train": "train.txt", "val": "val.txt"},
    "voc": {"train_aug": "train_aug.txt", "val": "val.txt"},
}


def lists_root() -> Path:
    """The folder holding the shipped lists (``datasets/`` or its installed copy)."""
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir / "_lists", package_dir.parent / "datasets"):
        if (candidate / "voc" / "val.txt").is_file():
            return candidate
    raise DataError(
        f"{package_dir / '_lists'}: the shipped id lists are missing; reinstall msattn (pip install msattn)"
    )


def shipped_list_path(dataset: str, split: str) -> Path:
    """Path of a shipped id list, e.g. ``shipped_list_path("voc", "train_aug")``."""
    try:
        name = SHIPPED_LISTS[dataset][split]
    except KeyError:
        raise DataError(f"no shipped id list for dataset {dataset!r}, split {split!r}") from None
    return lists_root() / dataset / name


def shipped_ids(dataset: str, split: str) -> list[str]:
    """The ids of a shipped list, in file order."""
    return read_id_list(shipped_list_path(dataset, split))


def split_ids(dataset: str, split: str, given: list[str] | None) -> tuple[list[str], str]:
    """The ids of a split: ``given`` (checked) or the shipped list; and where they came from."""
    if given is not None:
        return [check_id(i, f"{split} ids") for i in given], "given by the caller"
    return shipped_ids(dataset, split), str(shipped_list_path(dataset, split))
