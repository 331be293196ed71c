"""What ``msattn predict`` reads: image files, folders of images and ``.txt`` lists, and the names it writes.

- A **folder** gives its image files (sorted, not recursive; every format Pillow reads here:
  :func:`msattn.io.image_suffixes`). Other files and subfolders are named in a note, never
  dropped silently; hidden files (``.name``) are left alone.
- A **list** (``.txt``, UTF-8, BOM accepted) gives one entry per line; blank lines and ``#``
  comments are skipped. An entry is a path relative to the list's folder (or to
  ``--images-dir`` when given); an entry without an image suffix is an **id**, looked up as
  ``<id>.jpg``, ``<id>.png``, ... there, then in ``images/`` beside the list, so that a
  dataset folder's own ``val.txt`` works as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msattn.errors import DataError
from msattn.images import image_suffixes
from msattn.io import read_list_lines

LIST_SUFFIX = ".txt"
SHOWN = 3


@dataclass
class Inputs:
    """The image paths found (in order) and notes about files that were not taken."""

    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def gather_inputs(inputs: Sequence[Path], images_dir: Path | None = None) -> Inputs:
    """Expand image files, folders and ``.txt`` lists (see the module doc) into image paths.

    Paths on the command line must exist; entries of a list are checked when they are read.
    """
    suffixes = image_suffixes()
    found = Inputs()
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"--images-dir {images_dir}: folder not found")
    for path in map(Path, inputs):
        if path.is_dir():
            found.paths += _scan_folder(path, suffixes, found.notes)
        elif path.suffix.lower() == LIST_SUFFIX:
            found.paths += read_image_list(path, images_dir)
        elif not path.exists():
            raise DataError(f"{path}: input not found")
        elif path.suffix.lower() in suffixes:
            found.paths.append(path)
        else:
            raise DataError(f"{path}: not an image ({', '.join(suffixes)}), folder or .txt list")
    return found


def collect_inputs(inputs: Sequence[Path], images_dir: Path | None = None) -> list[Path]:
    """The image paths of :func:`gather_inputs` (without its notes)."""
    return gather_inputs(inputs, images_dir).paths


def _scan_folder(folder: Path, suffixes: Sequence[str], notes: list[str]) -> list[Path]:
    images, others, subfolders = [], [], []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue  # hidden files (.DS_Store, msattn's own bookkeeping) are nobody's input
        if child.is_dir():
            subfolders.append(child.name)
        elif child.suffix.lower() in suffixes:
            images.append(child)
        else:
            others.append(child.name)
    if others:
        notes.append(f"{folder}: {len(others)} file(s) not read, not images by their suffix ({_names(others)})")
    if subfolders:
        notes.append(f"{folder}: {len(subfolders)} subfolder(s) not read (folders are not searched "
                     f"recursively; name them to include them): {_names(subfolders)}")  # fmt: skip
    return images


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def read_image_list(path: Path, images_dir: Path | None = None) -> list[Path]:
    """The image paths of a ``.txt`` list: paths relative to the list (or ``images_dir``), or bare ids."""
    suffixes = image_suffixes()
    base = Path(images_dir) if images_dir is not None else path.parent
    paths = []
    for entry in read_list_lines(path):
        if Path(entry).suffix.lower() in suffixes:
            paths.append(Path(os.path.normpath(base / entry)))
            continue
        folders = [base] if images_dir is not None else [base, path.parent / "images"]
        paths.append(_find_id(entry, folders, suffixes))
    return paths


def _find_id(item_id: str, folders: Sequence[Path], suffixes: Sequence[str]) -> Path:
    """``<folder>/<id><suffix>`` for the first folder and suffix that exist (any case); else the first guess."""
    for folder in folders:
        for suffix in suffixes:
            for candidate in (folder / f"{item_id}{suffix}", folder / f"{item_id}{suffix.upper()}"):
                if candidate.is_file():
                    return Path(os.path.normpath(candidate))
    return Path(os.path.normpath(folders[-1] / f"{item_id}.jpg"))  # reported as not found when read


def unique_names(paths: Sequence[Path], files_of: Any = None) -> tuple[list[str], list[str]]:
    """Output names (file stems) for ``paths``, renaming ``x`` to ``x_2``, ``x_3``... where two inputs
    would write the same file. Returns (names, one message per rename).

    ``files_of(name) -> list[str]`` lists the files a name writes (default: just the name).
    """
    files_of = files_of or (lambda n: [n])
    taken: set[str] = set()
    names, notes = [], []
    for path in paths:
        stem, name, k = path.stem, path.stem, 1
        while any(f in taken for f in files_of(name)):
            k += 1
            name = f"{stem}_{k}"
        if name != stem:
            notes.append(f"{path}: another input already writes '{stem}', writing this one as '{name}'")
        taken.update(files_of(name))
        names.append(name)
    return names, notes
