"""PASCAL-Person-Part from the Pascal-Part annotations (``Annotations_Part/*.mat``) and VOC 2010 images.

Merge rule (reproduces the published PASCAL-Person-Part ground truth):
head = head, hair, eyes, ears, eyebrows, nose, mouth; torso = torso, neck;
upper_arms = luarm, ruarm; lower_arms = llarm, rlarm, lhand, rhand;
upper_legs = luleg, ruleg; lower_legs = llleg, rlleg, lfoot, rfoot.
Person objects (``class_ind == 15``; names are not reliable keys) are painted in file order and
within each person its parts in file order, later over earlier. Person pixels covered by no part,
and every other pixel, are background (0). Only images with at least one person are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from msattn.data.lists import split_ids
from msattn.data.prepare.common import MISSING, SKIPPED, SPLITS, PrepareSummary, Result, Task, dedupe
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import StoredImage, Target, write_item
from msattn.errors import DataError

CLASSES = ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")
PERSON_CLASS_IND = 15
_GROUPS = {
    1: ("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth"),
    2: ("torso", "neck"),
    3: ("luarm", "ruarm"),
    4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"),
    6: ("llleg", "rlleg", "lfoot", "rfoot"),
}
#: Pascal-Part person part name -> PASCAL-Person-Part class index
PART_TO_CLASS: dict[str, int] = {name: index for index, names in _GROUPS.items() for name in names}


def load_pascal_part(path: Path) -> list[dict[str, Any]]:
    """Read one Pascal-Part ``.mat`` into ``[{"class_ind", "mask", "parts": [(name, mask), ...]}, ...]``.

    Handles scipy's squeezing: one object (or one part) comes back as a bare struct, no parts as an
    empty array. Unreadable or malformed files raise :class:`DataError` naming the file.
    """
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        anno = mat["anno"]
        objects = [_read_object(obj) for obj in _as_list(anno.objects)]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises many types on corrupt files
        raise DataError(f"{path}: not a readable Pascal-Part annotation ({type(exc).__name__}: {exc})") from None
    shapes = {obj["mask"].shape for obj in objects} | {m.shape for obj in objects for _, m in obj["parts"]}
    if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
        raise DataError(f"{path}: masks of different or non-2-D shapes {sorted(shapes)}")
    return objects


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def _read_object(obj: Any) -> dict[str, Any]:
    parts = [(str(p.part_name), np.asarray(p.mask)) for p in _as_list(obj.parts)]
    return {"class_ind": int(obj.class_ind), "mask": np.asarray(obj.mask), "parts": parts}


def person_part_label(objects: Sequence[dict[str, Any]], source: Path | str = "") -> np.ndarray | None:
    """The ``[H, W]`` uint8 Person-Part label of one image, or ``None`` when it shows no person."""
    persons = [obj for obj in objects if obj["class_ind"] == PERSON_CLASS_IND]
    if not persons:
        return None
    label = np.zeros(persons[0]["mask"].shape, dtype=np.uint8)
    for person in persons:
        for name, mask in person["parts"]:
            if name not in PART_TO_CLASS:
                raise DataError(f"{source}: unknown person part {name!r}")
            label[mask.astype(bool)] = PART_TO_CLASS[name]
    return label


def _process(task: Task, target: Target) -> Result:
    mat_path, jpg_path = (Path(p) for p in task.payload)
    if not mat_path.is_file():
        return task.result(MISSING, f"no annotation in {mat_path.parent}")
    label = person_part_label(load_pascal_part(mat_path), mat_path)
    if label is None:
        return task.result(SKIPPED, "no person in the annotation")
    return write_item(target, task, label, StoredImage(jpg_path), mat_path)


@locked_output("source")
def prepare_person_part(
    source: Path,
    out: Path,
    workers: int = 2,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
) -> PrepareSummary:
    """Write PASCAL-Person-Part to ``out`` from ``source`` (``Annotations_Part/``, ``JPEGImages/``).

    Splits come from the shipped 1,716/1,831 lists unless ``train_ids``/``val_ids`` are given; listed
    ids absent from ``source`` are counted and reported, not fatal.
    """
    source, out = Path(source), Path(out)
    annotations, images = source / "Annotations_Part", source / "JPEGImages"
    for folder in (annotations, images):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (--source must hold Annotations_Part/ and JPEGImages/)")
    train, train_source = split_ids("person_part", "train", train_ids)
    val, val_source = split_ids("person_part", "val", val_ids)
    lists = {"train": train, "val": val}
    prepare_output(out, "person_part", {})
    tasks = [
        Task(split, item_id, (str(annotations / f"{item_id}.mat"), str(images / f"{item_id}.jpg")))
        for split in SPLITS
        for item_id in dedupe(lists[split])
    ]
    target = Target("person_part", out, CLASSES)
    results = run_tasks(_process, tasks, target, workers)
    sources = {"pascal_part": str(source.resolve()), "lists": {"train": train_source, "val": val_source}}
    return finish(target, results, RunInfo(source, sources))
