"""Cityscapes (fine annotations) with the 19 evaluation classes.

Layout: ``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``; the id is
``<city>_<seq>_<frame>``. The official train (2,975) and val (500) splits are kept; test has no
public labels and is left out. A source holding only one of ``leftImg8bit/train`` and
``leftImg8bit/val`` (a val download to evaluate a model) gives that split and an empty list for the
other, with a warning naming the missing folder; a source with neither is an error.

Labels: each labelId becomes its trainId by the table below (the Cityscapes label definition);
labelIds without a trainId (void, parking, rail track, guard rail, bridge, tunnel, polegroup,
caravan, trailer, ...) become 255. Where ``*_gtFine_labelIds.png`` is absent, the
``*_gtFine_polygons.json`` file is rasterised instead: objects in file order, later on top,
``deleted`` objects skipped, ``<name>group`` read as ``<name>``, uncovered pixels unlabeled (255);
edges may differ from the official PNGs by a pixel, since every importer here uses one polygon rule.
The images (PNG) are stored as quality-95 JPEGs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from msattn.data.prepare import importing
from msattn.data.prepare.common import IGNORE_INDEX, MISSING, SPLITS, PrepareSummary, Result, Task
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import Target, write_item
from msattn.errors import DataError
from msattn.images import open_image

#: (name, labelId, trainId, colour) of the Cityscapes label definition; trainId 255 = not evaluated
LABELS: tuple[tuple[str, int, int, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
    ("license plate", -1, 255, (0, 0, 142)),
)
CLASSES = tuple(name for name, _, train_id, _ in sorted(LABELS, key=lambda r: r[2]) if train_id != 255)
PALETTE = tuple(rgb for _, _, train_id, rgb in sorted(LABELS, key=lambda r: r[2]) if train_id != 255)
TRAIN_ID_OF_NAME = {name: train_id for name, _, train_id, _ in LABELS}
IMAGE_SUFFIX, LABEL_SUFFIX, POLYGON_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png", "_gtFine_polygons.json"


def train_id_table() -> np.ndarray:
    """A 256-entry lookup: labelId -> trainId (255 for labelIds that are not evaluated or unknown)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for _, label_id, train_id, _ in LABELS:
        if label_id >= 0:
            table[label_id] = train_id
    return table


def polygons_label(path: Path) -> np.ndarray:
    """The trainId label of a ``*_gtFine_polygons.json`` file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        height, width, objects = int(data["imgHeight"]), int(data["imgWidth"]), data["objects"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a Cityscapes polygons file ({type(exc).__name__}: {exc})") from None
    label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    for number, obj in enumerate(objects):
        if obj.get("deleted"):
            continue
        name = str(obj.get("label", ""))
        if name not in TRAIN_ID_OF_NAME and name.endswith("group"):
            name = name[: -len("group")]
        if name not in TRAIN_ID_OF_NAME:
            raise DataError(f"{path}: object {number} has the unknown label {obj.get('label')!r}")
        try:
            points = [float(v) for point in obj["polygon"] for v in point[:2]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: object {number} has a malformed polygon") from None
        if len(points) >= 6:
            label[importing.polygon_mask(points, height, width)] = TRAIN_ID_OF_NAME[name]
    return label


def _process(task: Task, target: Target) -> Result:
    image_path, label_path, polygon_path = task.payload
    if label_path is not None:
        raw = open_image(label_path, mode=None)
        if raw.mode not in ("L", "P"):
            raise DataError(f"{label_path}: a mode {raw.mode} image; expected 8-bit labelIds")
        label, source = train_id_table()[np.asarray(raw)], label_path
    elif polygon_path is not None:
        label, source = polygons_label(Path(polygon_path)), polygon_path
    else:
        return task.result(MISSING, f"no {LABEL_SUFFIX} or {POLYGON_SUFFIX} in gtFine/{task.split}/")
    image = replace(importing.load_image(Path(image_path), Path(image_path)), link=None)  # always a new JPEG
    return write_item(target, task, label, image, source)


def _split_tasks(root: Path, split: str, ids: importing.IdTable) -> list[Task]:
    images, labels = root / "leftImg8bit" / split, root / "gtFine" / split
    tasks = []
    for image in sorted(images.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        item_id = ids.add(stem, image)
        if item_id is None:
            continue
        label, polygons = (labels / image.parent.name / f"{stem}{s}" for s in (LABEL_SUFFIX, POLYGON_SUFFIX))
        payload = (str(image), str(label) if label.is_file() else None, str(polygons) if polygons.is_file() else None)
        tasks.append(Task(split, item_id, payload))
    return tasks


def present_splits(source: Path) -> tuple[list[str], dict[str, str]]:
    """The splits of ``source`` that have a ``leftImg8bit/<split>/`` folder, and why each other one is empty.

    Raises :class:`DataError` naming ``leftImg8bit/`` when neither train nor val is there.
    """
    images = source / "leftImg8bit"
    present = [split for split in SPLITS if (images / split).is_dir()]
    if not present:
        found = "folder not found" if not images.is_dir() else "holds neither train/ nor val/"
        raise DataError(f"{images}: {found} (--source must hold leftImg8bit/train/, leftImg8bit/val/ or both)")
    return present, {split: f"{images / split}: folder not found" for split in SPLITS if split not in present}


@locked_output("source")
def prepare_cityscapes(source: Path, out: Path, workers: int = 2) -> PrepareSummary:
    """Write Cityscapes train/val (fine labels, 19 classes) to ``out``."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"{source}: folder not found (--source must hold leftImg8bit/ and gtFine/)")
    if not (source / "gtFine").is_dir():
        raise DataError(f"{source}: no gtFine/ folder here (download gtFine_trainvaltest.zip)")
    importing.check_out_separate(out, source)
    splits, why_empty = present_splits(source)
    ids = importing.IdTable()
    tasks = [task for split in splits for task in _split_tasks(source, split, ids)]
    if not tasks:
        raise DataError(f"{source}: no *{IMAGE_SUFFIX} images under leftImg8bit/{' or leftImg8bit/'.join(splits)}")
    polygons = sum(1 for t in tasks if t.payload[1] is None and t.payload[2] is not None)
    prepare_output(out, "cityscapes", {"source": str(source.resolve())})
    target = Target("cityscapes", out, CLASSES, PALETTE)
    results = run_tasks(_process, tasks, target, workers) + ids.error_results()
    return finish(target, results, RunInfo(
        source,
        {"cityscapes": str(source.resolve())},
        extra={"label_map": {str(label_id): train_id for _, label_id, train_id, _ in LABELS if label_id >= 0}},
        warnings=[f"{polygons} label(s) rasterised from {POLYGON_SUFFIX} (no {LABEL_SUFFIX})"] if polygons else [],
        why_empty=why_empty,
    ))  # fmt: skip
