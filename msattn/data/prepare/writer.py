"""Writing one item of a prepared dataset: ``labels/<id>.png`` and ``images/<id>.jpg``, the same for every source.

A source's worker parses its format into a class-index label and an image, and calls
:func:`write_item`, which checks them against each other and against the classes, writes the label
as a palette PNG and places the image, each file under a temporary name then renamed (so a file
under its final name is complete), and returns the item's :class:`~msattn.data.prepare.common.Result`.

Images come in two kinds:

- :class:`StoredImage`: a JPEG file kept as it is (the paper's datasets), decoded fully to check it,
  then a **hard link** to the source file when source and output share a file system (no extra
  disk space; do not edit them in place), and a copy otherwise;
- :class:`DecodedImage`: pixels already decoded (an importer's image as displayed, a generated
  scene), linked from its file when that file is an upright JPEG, else written as a JPEG.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msattn.data.palette import flat_palette
from msattn.data.prepare.common import IGNORE_INDEX, MISSING, WRITTEN, Result, Task
from msattn.data.prepare.output_folder import image_path, label_path
from msattn.errors import DataError
from msattn.images import EXIF_ORIENTATION, open_image, save_image
from msattn.io import atomic_write

#: quality of the JPEGs written from decoded pixels (importers; the demo uses its own)
JPEG_QUALITY = 95

Palette = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Target:
    """The dataset a run writes: its name, folder, classes and class colours (None: the VOC colour map).

    Built once per run and handed to every worker and to :func:`msattn.data.prepare.finish.finish`.
    """

    name: str
    out: Path
    classes: tuple[str, ...]
    palette: Palette | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(tuple(int(v) for v in rgb) for rgb in self.palette))


@dataclass(frozen=True)
class StoredImage:
    """A JPEG file stored as it is (linked or copied); a missing file makes the item missing."""

    path: Path


@dataclass(frozen=True)
class DecodedImage:
    """Decoded RGB pixels (a PIL image), written as a JPEG of ``quality``, or linked from ``link``.

    ``link``: the file the pixels were decoded from when it is an upright JPEG (stored as it is);
    ``name`` names the image in errors.
    """

    image: Image.Image
    name: Path | str
    link: Path | None = None
    quality: int = JPEG_QUALITY


def write_item(
    target: Target, task: Task, label: np.ndarray, image: StoredImage | DecodedImage, label_source: Path | str
) -> Result:
    """Check ``label`` (values, size) against ``target``'s classes and ``image``, write both; the item's Result.

    ``label_source`` names the annotation in errors. A :class:`StoredImage` whose file is absent
    gives a ``missing`` result; every other problem raises :class:`DataError` naming the file.
    """
    check_label_values(label, len(target.classes), label_source)
    size = (label.shape[1], label.shape[0])
    if isinstance(image, StoredImage):
        if not image.path.is_file():
            return task.result(MISSING, f"no image in {image.path.parent}")
        check_image(image.path, size)
    else:
        check_size(size, image.image.size, label_source, image.name)
    save_label(label, label_path(target.out, task.id), target.palette)
    destination = image_path(target.out, task.id)
    if isinstance(image, StoredImage):
        link_or_copy(image.path, destination)
    elif image.link is not None:
        link_or_copy(image.link, destination)
    else:
        save_image(image.image, destination, quality=image.quality)
    return task.result(WRITTEN)


# ----------------------------------------------------------------------------- checks


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
    img = open_image(src, mode=None, orient=False)
    turned = img.size[::-1] if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else img.size  # 90-degree turns
    if size is not None and tuple(size) not in (img.size, turned):
        raise DataError(
            f"{src}: image is {img.size[0]}x{img.size[1]} but its annotation is {size[0]}x{size[1]}"
        )


def check_size(label_size: tuple[int, int], image_size: tuple[int, int], label_source: Any, image_source: Any) -> None:
    """Raise :class:`DataError` naming both files when the annotation's (W, H) differs from the image's."""
    if tuple(label_size) != tuple(image_size):
        raise DataError(
            f"{label_source}: annotation is {label_size[0]}x{label_size[1]} but the image {image_source} is "
            f"{image_size[0]}x{image_size[1]} (as displayed, EXIF orientation applied)"
        )


# ----------------------------------------------------------------------------- files


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

    ``palette``: one ``[r, g, b]`` per class (the dataset's own colours, as ``dataset.json`` records
    them); the VOC colour map fills every other index, and is the whole palette when ``None``.
    """
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"labels must be 2-D uint8, got {label.dtype} {label.shape}")
    img = Image.fromarray(np.ascontiguousarray(label))  # mode "L"
    img.putpalette(_label_palette(_palette_key(palette)))  # -> mode "P", indices unchanged
    save_image(img, path)


def dataset_palette(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """The ``palette`` of ``dataset.json``: the first ``num_classes`` colours of :func:`save_label`'s palette."""
    flat = _label_palette(_palette_key(palette))
    return [flat[3 * i : 3 * i + 3] for i in range(num_classes)]


def _palette_key(palette: Sequence[Sequence[int]] | None) -> tuple[tuple[int, ...], ...] | None:
    return None if palette is None else tuple(tuple(int(v) for v in rgb) for rgb in palette)


@functools.cache
def _label_palette(colours: tuple[tuple[int, ...], ...] | None = None) -> list[int]:
    """The 768-value palette of prepared label PNGs (computed once per process and colour list)."""
    return flat_palette([list(rgb) for rgb in colours] if colours is not None else None)
