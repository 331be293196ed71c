"""Plain image/mask folders: ``--images`` and ``--masks`` paired by file name stem.

Layout: either flat folders (split by ``--val-fraction``/``--seed``), or both folders with
``train/`` and ``val/`` (optionally ``test/``) sub-folders, which are the splits. An image
``<stem>.<jpg|png|webp|bmp|tif>`` pairs with the mask ``<stem><mask-suffix>.<png|tif|bmp|...>``.
Images without a mask are reported missing; masks without an image are counted in the report.

Masks hold class indices (8- or 16-bit grey, or palette PNGs, whose *indices* are the values, not
their colours) or RGB colours (a colour table in ``--classes`` is then required). ``--classes``
is a JSON file: a list of names (value i = class i), or ``{"classes": [...]}`` whose entries are
names or objects ``{"name": ..., "value": v | [v, ...], "color": [r, g, b] | "#rrggbb"}``; the
class index is the entry's position; an entry named ``__ignore__`` takes no index and maps its
values/colours to 255. Without ``--classes`` the masks are scanned first and the classes are
``class_0`` .. ``class_<max value>``. Mask pixels equal to ``--ignore-value`` (default 255; -1:
none) become 255 unless the class table maps that value; any other unmapped value is an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msattn.data.prepare import importing
from msattn.data.prepare.common import IGNORE_INDEX, MISSING, PrepareSummary, Result, Task, make_console
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import REPORT_NAME, locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import Target, check_size, write_item
from msattn.errors import DataError, UsageError
from msattn.images import open_image
from msattn.io import read_json

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test",)}


@dataclass(frozen=True)
class ClassTable:
    """How mask values or colours become class indices."""

    names: tuple[str, ...]
    values: dict[int, int] = field(default_factory=dict)  # mask value -> class index (255: ignore)
    colours: dict[tuple[int, int, int], int] = field(default_factory=dict)
    ignore_value: int | None = 255
    palette: tuple[tuple[int, int, int], ...] | None = None


def _entry_values(raw: Any, name: str, path: Path) -> list[int]:
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 65536 for v in raw):
        raise DataError(f"{path}: class {name!r}: 'value' must be integers 0..65535")
    return raw


def _entry_colour(given: Any, path: Path) -> tuple[int, int, int] | None:
    if given is None:
        return None
    text = given if isinstance(given, str) else ",".join(str(v) for v in given) if isinstance(given, list) else "?"
    return importing.parse_colour(text, path)


def read_class_table(path: Path, ignore_value: int | None) -> ClassTable:
    """Parse a ``classes.json`` (see the module docstring)."""
    data = read_json(path)
    entries = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a list of classes (or {{\"classes\": [...]}})")
    names, values, colours, palette = [], {}, {}, {}
    for position, entry in enumerate(entries):
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise DataError(f"{path}: class entry {position} needs a 'name' string")
        name = entry["name"]
        ignore = name in importing.IGNORE_NAMES
        index = IGNORE_INDEX if ignore else len(names)
        names += [] if ignore else [name]
        rgb = _entry_colour(entry.get("color", entry.get("colour")), path)
        if rgb is not None:
            if rgb in colours:
                raise DataError(f"{path}: colour {rgb} is given to two classes")
            colours[rgb] = index
            palette.update({} if ignore else {index: rgb})
        raw = entry.get("value", entry.get("values"))
        for value in _entry_values([index] if raw is None and rgb is None and not ignore else raw, name, path):
            if value in values:
                raise DataError(f"{path}: value {value} is given to two classes")
            values[value] = index
    if not 2 <= len(names) <= 255:
        raise DataError(f"{path}: needs 2..255 classes, found {len(names)}")
    full = tuple(tuple(rgb) for rgb in importing.palette_for(names, palette)) if palette else None
    return ClassTable(tuple(names), values, colours, ignore_value, full)


def mask_to_label(img: Any, table: ClassTable, source: Any) -> np.ndarray:
    """A decoded mask (PIL image) as a uint8 class-index label by ``table``."""
    mode = img.mode
    colour_only = bool(table.colours) and not table.values
    if mode in ("RGB", "RGBA") or (mode == "P" and colour_only):
        rgb = np.asarray(img.convert("RGB"))
        if table.colours:
            return importing.colours_to_label(rgb, table.colours, source)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{source}: an RGB colour mask; give the colours of the classes in --classes")
        values = rgb[..., 0].astype(np.int64)
    elif mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "LA"):
        values = np.asarray(img.getchannel(0) if mode == "LA" else img).astype(np.int64)
    else:
        raise DataError(f"{source}: a mode {mode} image; masks must hold class indices or RGB colours")
    return values_to_label(values, table, source)


def values_to_label(values: np.ndarray, table: ClassTable, source: Any) -> np.ndarray:
    """Mask values as class indices: the table's values (or identity), ``ignore_value`` -> 255."""
    found = np.unique(values)
    lookup: dict[int, int] = {}
    for value in found.tolist():
        if value in table.values:
            lookup[value] = table.values[value]
        elif value == table.ignore_value:
            lookup[value] = IGNORE_INDEX
        elif not table.values and value < len(table.names):
            lookup[value] = value
        else:
            hint = "listed in --classes" if table.values else f"a class index 0..{len(table.names) - 1}"
            raise DataError(f"{source}: mask value {value} is not {hint} (nor --ignore-value {table.ignore_value})")
    out = np.empty(values.shape, dtype=np.uint8)
    positions = np.searchsorted(found, values)
    out[...] = np.array([lookup[v] for v in found.tolist()], dtype=np.uint8)[positions]
    return out


def _process(task: Task, target: Target, table: ClassTable) -> Result:
    image_path, mask_path = task.payload
    if mask_path is None:
        return task.result(MISSING, f"no mask for {image_path}")
    if Path(mask_path).suffix.lower() in (".jpg", ".jpeg"):
        raise DataError(f"{mask_path}: a JPEG mask; JPEG compression changes class values, save masks as PNG")
    image = importing.load_image(Path(image_path), Path(image_path))
    mask = open_image(mask_path, mode=None)
    check_size(mask.size, image.image.size, mask_path, image_path)
    return write_item(target, task, mask_to_label(mask, table, mask_path), image, mask_path)


def _split_folders(images: Path, masks: Path) -> dict[str, tuple[Path, Path]] | None:
    """split -> (image folder, mask folder) when both hold train/ and val/ sub-folders, else None."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if (images / name).is_dir() and (masks / name).is_dir():
                found[split] = (images / name, masks / name)
                break
    return found if {"train", "val"} <= set(found) else None


def pair_files(images: Path, masks: Path, suffix: str) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """(stem, image, mask or None) per image, sorted; and the masks that have no image."""
    found = importing.find_images(images)
    mask_files: dict[str, Path] = {}
    for path in sorted(masks.iterdir()):
        if path.is_file() and path.suffix.lower() in (*MASK_SUFFIXES, ".jpg", ".jpeg") and path.stem.endswith(suffix):
            mask_files.setdefault(path.stem[: len(path.stem) - len(suffix)] if suffix else path.stem, path)
    pairs = [(stem, image, mask_files.get(stem)) for stem, image in sorted(found.items())]
    orphans = [str(path) for stem, path in sorted(mask_files.items()) if stem not in found]
    return pairs, orphans


def scan_values(masks: list[Path], ignore_value: int | None) -> ClassTable:
    """Without a class table: read every mask; classes ``class_0`` .. ``class_<max value>``."""
    top = -1
    for path in masks:
        img = open_image(path, mode=None)
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img)
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise DataError(f"{path}: an RGB colour mask; give the class colours with --classes classes.json")
            img = img.getchannel(0)
        values = np.unique(np.asarray(img.getchannel(0) if img.mode == "LA" else img).astype(np.int64))
        values = values[values != (ignore_value if ignore_value is not None else -1)]
        if values.size and values.max() >= 255:
            raise DataError(f"{path}: mask value {int(values.max())} is too large for a class index; map values with --classes")
        top = max(top, int(values.max()) if values.size else -1)
    if top < 1:
        raise DataError(
            f"{masks[0].parent if masks else '--masks'}: the masks hold only {'0 and ' if top == 0 else ''}the ignore value "
            f"{ignore_value}: a binary mask where {ignore_value} marks objects? Pass --classes with e.g. "
            f'[{{"name": "background", "value": 0}}, {{"name": "object", "value": {ignore_value}}}]'
        )
    return ClassTable(tuple(f"class_{i}" for i in range(top + 1)), ignore_value=ignore_value)


def _collect(images: Path, masks: Path, suffix: str, val_fraction: float, seed: int) -> tuple[list[Task], list[str], str]:
    folders = _split_folders(images, masks)
    ids, tasks, orphans = importing.IdTable(), [], []
    for split, (image_dir, mask_dir) in (folders or {"train": (images, masks)}).items():
        pairs, lonely = pair_files(image_dir, mask_dir, suffix)
        orphans += lonely
        for stem, image, mask in pairs:
            item_id = ids.add(stem, image)
            if item_id is not None:
                tasks.append(Task(split, item_id, (str(image), str(mask) if mask else None)))
    if folders is None:
        assign = importing.split_by_fraction([t.id for t in tasks], val_fraction, seed)
        tasks = [Task(assign[t.id], t.id, t.payload) for t in tasks]
    rule = "the train/ val/ test/ sub-folders" if folders else importing.fraction_rule(val_fraction, seed)
    return tasks, orphans + [m for _, m in ids.problems], rule


@locked_output("images", "masks")
def prepare_masks(
    images: Path, masks: Path, out: Path, classes: Path | None = None, ignore_value: int = 255,
    val_fraction: float = 0.1, seed: int = 0, mask_suffix: str = "", workers: int = 2,
) -> PrepareSummary:  # fmt: skip
    """Write image/mask pairs to ``out`` as a dataset folder."""
    images, masks, out = Path(images), Path(masks), Path(out)
    importing.check_split_options(val_fraction, seed)
    if not -1 <= ignore_value <= 65535:
        raise UsageError(f"--ignore-value must be -1 (none) or 0..65535, got {ignore_value}")
    for folder, what in ((images, "--images"), (masks, "--masks")):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found ({what} must be a folder)")
    importing.check_out_separate(out, images, masks, classes)
    ignore = None if ignore_value < 0 else ignore_value
    tasks, notes, split_rule = _collect(images, masks, mask_suffix, val_fraction, seed)
    if not tasks:
        raise DataError(f"{images}: no images ({', '.join(importing.IMAGE_SUFFIXES)}) found")
    if classes is not None:
        table = read_class_table(Path(classes), ignore)
    else:
        make_console(stderr=True).print("no --classes: reading every mask for its values", markup=False)
        table = scan_values([Path(t.payload[1]) for t in tasks if t.payload[1] is not None], ignore)
    digest = hashlib.sha256(json.dumps([table.names, sorted(table.values.items()), sorted(table.colours.items())]).encode())
    params = {"classes": digest.hexdigest(), "ignore_value": ignore, "split": split_rule, "mask_suffix": mask_suffix,
              "images": str(images.resolve()), "masks": str(masks.resolve())}  # fmt: skip
    prepare_output(out, "masks", params)
    target = Target("masks", out, table.names, table.palette)
    results = run_tasks(functools.partial(_process, table=table), tasks, target, workers)
    return finish(target, results, RunInfo(
        masks,
        {"images": str(images.resolve()), "masks": str(masks.resolve()),
         "classes": str(Path(classes).resolve()) if classes else None},
        extra={"split": split_rule, "ignore_value": ignore},
        warnings=[f"{len(notes)} mask(s) without an image (listed in {REPORT_NAME})"] if notes else [],
        notes=notes,
    ))  # fmt: skip
