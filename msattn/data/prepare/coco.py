"""A seeded subset of COCO 2014 as semantic segmentation (80 classes + background).

Subset: image ids of ``instances_{train,val}2014.json`` are sorted, permuted with
``numpy.random.default_rng([seed, 0])`` (train) / ``default_rng([seed, 1])`` (val), and the first
``train_size`` / ``val_size`` are kept (a larger size keeps the smaller subset). The chosen ids and the
SHA-256 of both JSON files go into ``dataset.json``.

Classes: COCO category ids map to 1..80 in sorted id order; background is 0.

Overlaps: non-crowd instances are painted by decreasing mask area (ties: increasing annotation id),
so a smaller object lying on a larger one stays visible. Crowd regions (``iscrowd=1``) become 255
(ignore) wherever no non-crowd instance covers the pixel.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from msattn.data.prepare.common import IGNORE_INDEX, MISSING, SPLITS, PrepareSummary, Result, Task
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import StoredImage, Target, write_item
from msattn.errors import DataError, UsageError
from msattn.io import check_id, file_sha256

SPLIT_SOURCES = {"train": "train2014", "val": "val2014"}


def load_instances(path: Path) -> dict[str, Any]:
    """Read an ``instances_*.json``; a missing, corrupt or wrongly shaped file raises :class:`DataError`."""
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (--coco must hold annotations/instances_*2014.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: not a COCO instances file (needs lists 'images', 'annotations', 'categories')")
    return data


def category_table(data: dict[str, Any], path: Path) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> class index (1..N in sorted id order), and the class names (background first)."""
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed 'categories' ({exc})") from None
    if not cats or len(cats) > 254:
        raise DataError(f"{path}: expected 1..254 categories, found {len(cats)}")
    return {cid: index + 1 for index, (cid, _) in enumerate(cats)}, ["background"] + [name for _, name in cats]


def draw_subset(image_ids: Sequence[int], size: int, seed: int, stream: int) -> list[int]:
    """``size`` ids drawn reproducibly from ``sorted(image_ids)``, returned sorted."""
    ids = sorted(image_ids)
    order = np.random.default_rng([seed, stream]).permutation(len(ids))
    return sorted(ids[i] for i in order[:size])


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an ``[H, W]`` bool mask."""
    if isinstance(segm, list):
        polygons = [[float(v) for v in poly] for poly in segm if len(poly) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation format {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools vs numpy 2: harmless "copy keyword" deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        mask = mask_utils.decode(rle)
    if mask.shape[:2] != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    return mask.astype(bool)


def coco_label(
    annotations: Sequence[tuple[int, int, bool, Any]],
    height: int,
    width: int,
    source: str = "",
    crowd_as_class: bool = False,
) -> np.ndarray:
    """The ``[H, W]`` uint8 label of one image from ``(ann_id, class_index, iscrowd, segmentation)`` tuples.

    Non-crowd instances are painted largest first (ties by annotation id) so small objects stay on
    top; crowd pixels not covered by any instance become 255, or with ``crowd_as_class`` are painted
    as their class like any instance.
    """
    label = np.zeros((height, width), dtype=np.uint8)
    instances, crowd = [], np.zeros((height, width), dtype=bool)
    for ann_id, class_index, iscrowd, segm in annotations:
        try:
            mask = decode_segmentation(segm, height, width)
        except Exception as exc:  # noqa: BLE001 - pycocotools raises many types on bad input
            raise DataError(f"{source}: annotation {ann_id}: unreadable segmentation ({exc})") from None
        if iscrowd and not crowd_as_class:
            crowd |= mask
        else:
            instances.append((-int(mask.sum()), ann_id, class_index, mask))
    covered = np.zeros((height, width), dtype=bool)
    for _, _, class_index, mask in sorted(instances, key=lambda item: (item[0], item[1])):
        label[mask] = class_index
        covered |= mask
    label[crowd & ~covered] = IGNORE_INDEX
    return label


def _process(task: Task, target: Target) -> Result:
    jpg, height, width, annotations, source = task.payload
    jpg = Path(jpg)
    if not jpg.is_file():  # before decoding the annotations: a missing image is missing, whatever they hold
        return task.result(MISSING, f"no image in {jpg.parent}")
    return write_item(target, task, coco_label(annotations, height, width, source), StoredImage(jpg), source)


def _split_tasks(
    split: str, data: dict[str, Any], path: Path, folder: Path, chosen: list[int], cat_map: dict[int, int]
) -> list[Task]:
    chosen_set = set(chosen)
    by_image: dict[int, list[tuple[int, int, bool, Any]]] = defaultdict(list)
    try:
        images = {int(img["id"]): img for img in data["images"] if int(img["id"]) in chosen_set}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id in chosen_set:
                by_image[image_id].append(
                    (int(ann["id"]), cat_map[int(ann["category_id"])], bool(ann.get("iscrowd", 0)), ann["segmentation"])
                )
        tasks = []
        for image_id in chosen:
            img = images[image_id]
            name = check_id(str(img["file_name"]), path)  # a plain file name: nothing outside the folder is read
            item_id = check_id(Path(name).stem, path)
            payload = (str(folder / name), int(img["height"]), int(img["width"]), by_image[image_id], str(path))
            tasks.append(Task(split, item_id, payload))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed image or annotation entry ({type(exc).__name__}: {exc})") from None
    return tasks


@locked_output("coco")
def prepare_coco(
    coco: Path, out: Path, train_size: int = 10000, val_size: int = 1500, seed: int = 0, workers: int = 2
) -> PrepareSummary:
    """Write a seeded ``train_size``/``val_size`` subset of COCO 2014 to ``out``."""
    coco, out = Path(coco), Path(out)
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if not coco.is_dir():
        raise DataError(f"{coco}: folder not found (--coco must hold annotations/, train2014/, val2014/)")
    paths = {split: coco / "annotations" / f"instances_{name}.json" for split, name in SPLIT_SOURCES.items()}
    folders = {split: coco / name for split, name in SPLIT_SOURCES.items()}
    for split in SPLITS:
        if not paths[split].is_file():
            raise DataError(f"{paths[split]}: file not found (--coco must hold annotations/instances_*2014.json)")
        if not folders[split].is_dir():
            raise DataError(f"{folders[split]}: folder not found (--coco must hold train2014/ and val2014/)")

    hashes = {split: file_sha256(paths[split]) for split in SPLITS}
    data = {split: load_instances(paths[split]) for split in SPLITS}
    tables = {split: category_table(data[split], paths[split]) for split in SPLITS}
    if tables["train"] != tables["val"]:
        raise DataError(f"{paths['val']}: its categories differ from those of {paths['train']}")
    cat_map, classes = tables["train"]

    sizes, warnings, chosen = {"train": train_size, "val": val_size}, [], {}
    for stream, split in enumerate(SPLITS):
        try:
            ids = [int(img["id"]) for img in data[split]["images"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{paths[split]}: malformed 'images' entry ({exc})") from None
        if sizes[split] > len(ids):
            warnings.append(f"{paths[split]} has {len(ids)} images, fewer than the {sizes[split]} asked for; using all")
        chosen[split] = draw_subset(ids, sizes[split], seed, stream)

    tasks: list[Task] = []  # built (and every entry checked) before anything is written
    for split in SPLITS:
        tasks += _split_tasks(split, data[split], paths[split], folders[split], chosen[split], cat_map)
    del data
    params = {"seed": seed, "train_size": train_size, "val_size": val_size, "sha256": hashes}
    prepare_output(out, "coco", params)
    target = Target("coco", out, classes)
    results = run_tasks(_process, tasks, target, workers)
    subset = {
        "seed": seed,
        "draw": "sorted image ids, numpy.random.default_rng([seed, 0 train | 1 val]).permutation, first N, sorted",
        "train_image_ids": chosen["train"],
        "val_image_ids": chosen["val"],
        "annotations": {split: {"file": str(paths[split].resolve()), "sha256": hashes[split]} for split in SPLITS},
        "overlap_rule": "instances painted by decreasing area (ties: annotation id); crowd -> 255 where no instance",
        "category_ids": sorted(cat_map),
    }
    info = RunInfo(coco, {"coco": str(coco.resolve())}, extra={"subset": subset}, warnings=warnings)
    return finish(target, results, info)
