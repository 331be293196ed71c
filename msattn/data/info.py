"""What a dataset folder's ``dataset.json`` says (classes, ignore index, palette), read and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msattn.data.palette import voc_colormap
from msattn.errors import DataError
from msattn.io import read_json


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about a dataset folder."""

    name: str
    classes: list[str]
    ignore_index: int
    palette: list[list[int]]
    root: Path
    palette_declared: bool = True  # False: dataset.json has no palette (the VOC colours stand in)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_dataset_info(root: Path) -> DatasetInfo:
    """Read and check ``root/dataset.json``; a missing or malformed file raises :class:`DataError`."""
    root = Path(root)
    path = root / "dataset.json"
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    name = data.get("name", root.name)
    classes = data.get("classes")
    ignore_index = data.get("ignore_index", 255)
    if not isinstance(name, str):
        raise DataError(f"{path}: 'name' must be a string")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of class names (index 0 first)")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not 0 <= ignore_index <= 255:
        raise DataError(f"{path}: 'ignore_index' must be an integer in 0..255")
    if len(classes) > 255 or (ignore_index < len(classes)):
        raise DataError(f"{path}: {len(classes)} classes do not fit 8-bit labels with ignore_index {ignore_index}")
    palette = data.get("palette")
    declared = palette is not None
    if palette is None:
        palette = voc_colormap(len(classes))
    ok = isinstance(palette, list) and all(
        isinstance(rgb, list) and len(rgb) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)
        for rgb in palette
    )
    if not ok or len(palette) < len(classes):
        raise DataError(f"{path}: 'palette' must list one [r, g, b] (0..255) per class")
    return DatasetInfo(
        name=name, classes=list(classes), ignore_index=ignore_index, palette=palette, root=root,
        palette_declared=declared,
    )  # fmt: skip
