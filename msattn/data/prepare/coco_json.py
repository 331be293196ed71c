"""Any COCO-format instances file (exports of CVAT, Label Studio, Roboflow, ...) as semantic segmentation.

Classes: categories sorted by category id become classes 1..N; background is 0. A category named
``background`` (or ``_background_``) is class 0 itself instead of a class of its own.

Segmentations: polygons, uncompressed RLE and compressed RLE, decoded by pycocotools.

Overlaps: the rule of ``prepare-data coco`` (:func:`msattn.data.prepare.coco.coco_label`): instances
are painted by decreasing area (ties: increasing annotation id), so the smaller object is on top.
Crowd regions (``iscrowd: 1``) become 255 (ignore) where no instance covers them, or with
``crowd="class"`` are painted as their category like any other instance.

Images: ``file_name`` is looked up under the images folder as written (sub-folders allowed), then
by its bare name; names that climb out of the folder (``..``, absolute paths) are looked up by
bare name only. An image listed without annotations is all background. The annotation's
``width``/``height`` must match the image as displayed (EXIF orientation applied).

Splits: the train file gives train and ``--val-annotations`` gives val; without it a seeded
``--val-fraction`` of the train file's images goes to val.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from msattn.data.prepare import importing
from msattn.data.prepare.coco import coco_label, load_instances
from msattn.data.prepare.common import ERROR, MISSING, PrepareSummary, Result, Task
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import Target, write_item
from msattn.errors import DataError, UsageError
from msattn.io import file_sha256

CROWD_MODES = ("ignore", "class")
OVERLAP_RULE = "instances painted by decreasing area (ties: annotation id), smaller on top"


def category_table(data: dict[str, Any], path: Path) -> tuple[dict[int, int], list[str]]:
    """Category id -> class index (sorted by category id, 1..N; a ``background`` category -> 0) and names."""
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed 'categories' ({type(exc).__name__}: {exc})") from None
    if len({cid for cid, _ in cats}) != len(cats):
        raise DataError(f"{path}: two categories share an id")
    classes, table = ["background"], {}
    for cid, name in cats:
        if name.lower() in importing.BACKGROUND_NAMES:
            table[cid] = 0
        else:
            table[cid] = len(classes)
            classes.append(name)
    if len(classes) < 2 or len(classes) > 255:
        raise DataError(f"{path}: expected 1..254 categories besides background, found {len(classes) - 1}")
    return table, classes


def image_candidates(folder: Path, file_name: str) -> list[str]:
    """Where ``file_name`` may be: under ``folder`` as written (when it stays inside), then by bare name."""
    name = Path(file_name.replace("\\", "/"))
    candidates = []
    if not name.is_absolute() and ".." not in name.parts:
        candidates.append(str(folder / name))
    if str(folder / name.name) not in candidates:
        candidates.append(str(folder / name.name))
    return candidates


def _process(task: Task, target: Target) -> Result:
    candidates, size, annotations, source, crowd_as_class, file_name = task.payload
    image = importing.load_listed_image(candidates, size, source, file_name)
    if isinstance(image, str):
        return task.result(MISSING, image)
    width, height = image.image.size
    label = coco_label(annotations, height, width, source, crowd_as_class=crowd_as_class)
    return write_item(target, task, label, image, source)


def _image_size(img: dict[str, Any]) -> tuple[int, int] | None:
    if img.get("width") is None or img.get("height") is None:
        return None
    return int(img["width"]), int(img["height"])


def read_split(
    data: dict[str, Any], path: Path, folder: Path, cat_map: dict[int, int], ids: importing.IdTable, crowd_as_class: bool
) -> tuple[list[tuple[str, Any]], list[tuple[str, str]], list[str]]:
    """(id, task payload) per usable image of one COCO file, (id, message) per bad image, and warnings."""
    by_image: dict[Any, list[tuple[int, int, bool, Any]]] = defaultdict(list)
    errors: dict[Any, str] = {}
    counts: Counter = Counter()
    try:
        known = {img["id"] for img in data["images"]}
        for ann in data["annotations"]:
            image_id, segm = ann["image_id"], ann.get("segmentation")
            if image_id not in known:
                counts["annotations of images not listed in 'images' were skipped"] += 1
            elif not segm:
                counts["annotations without a segmentation (boxes only?) paint nothing"] += 1
            elif int(ann["category_id"]) not in cat_map:
                errors[image_id] = f"{path}: annotation {ann.get('id')}: category_id {ann['category_id']} is not in 'categories'"
            else:
                entry = (int(ann.get("id", 0)), cat_map[int(ann["category_id"])], bool(ann.get("iscrowd", 0)), segm)
                by_image[image_id].append(entry)
        items, bad = [], []
        for img in data["images"]:
            file_name = str(img["file_name"])
            item_id = ids.add(Path(file_name.replace("\\", "/")).stem, f"{path} (image {file_name!r})")
            if item_id is None:
                continue
            if img["id"] in errors:
                bad.append((item_id, errors[img["id"]]))
                continue
            candidates = image_candidates(folder, file_name)
            items.append((item_id, (candidates, _image_size(img), by_image[img["id"]], str(path), crowd_as_class, file_name)))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed image or annotation entry ({type(exc).__name__}: {exc})") from None
    return items, bad, [f"{path}: {n} {what}" for what, n in counts.items()]


def _check_inputs(annotations: Path, images: Path, val_annotations: Path | None, val_images: Path | None) -> None:
    for path in (annotations, val_annotations):
        if path is not None and not path.is_file():
            raise DataError(f"{path}: annotation file not found")
    for folder in (images, val_images):
        if folder is not None and not folder.is_dir():
            raise DataError(f"{folder}: image folder not found")


def _tasks(
    sources: dict[str, tuple[Path, Path]], data: dict[str, Any], cat_map: dict[int, int], crowd: str,
    val_fraction: float, seed: int,
) -> tuple[list[Task], list[Result], list[str]]:
    """Tasks of every source file, error results and warnings; train ids split by fraction without a val file."""
    ids, tasks, bad, warnings = importing.IdTable(), [], [], []
    for split, (path, folder) in sources.items():
        items, errors, found = read_split(data[split], path, folder, cat_map, ids, crowd == "class")
        warnings += found
        assign = {item_id: split for item_id in [i for i, _ in items] + [i for i, _ in errors]}
        if split == "train" and "val" not in sources:
            assign = importing.split_by_fraction(assign, val_fraction, seed)
        tasks += [Task(assign[item_id], item_id, payload) for item_id, payload in items]
        bad += [Result(assign[item_id], item_id, ERROR, message) for item_id, message in errors]
    return tasks, bad + ids.error_results(), warnings


@locked_output("images", "val_images")
def prepare_coco_json(
    annotations: Path,
    images: Path,
    out: Path,
    val_annotations: Path | None = None,
    val_images: Path | None = None,
    crowd: str = "ignore",
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 2,
) -> PrepareSummary:
    """Write the images of COCO instances file(s) and their semantic labels to ``out``."""
    annotations, images, out = Path(annotations), Path(images), Path(out)
    if crowd not in CROWD_MODES:
        raise UsageError(f"--crowd must be one of {', '.join(CROWD_MODES)}, got {crowd!r}")
    if val_images is not None and val_annotations is None:
        raise UsageError("--val-images needs --val-annotations")
    val_images = Path(val_images) if val_images is not None else (images if val_annotations is not None else None)
    importing.check_split_options(val_fraction, seed)
    _check_inputs(annotations, images, val_annotations, val_images)
    importing.check_out_separate(out, annotations, images, val_annotations, val_images)

    sources = {"train": (annotations, images)}
    if val_annotations is not None:
        sources["val"] = (Path(val_annotations), val_images)
    data = {split: load_instances(path) for split, (path, _) in sources.items()}
    tables = {split: category_table(data[split], path) for split, (path, _) in sources.items()}
    if "val" in tables and tables["val"] != tables["train"]:
        raise DataError(f"{val_annotations}: its categories differ from those of {annotations}")
    cat_map, classes = tables["train"]
    tasks, bad, warnings = _tasks(sources, data, cat_map, crowd, val_fraction, seed)
    del data

    hashes = {split: file_sha256(path) for split, (path, _) in sources.items()}
    split_rule = "the files given" if val_annotations else importing.fraction_rule(val_fraction, seed)
    params = {"sha256": hashes, "crowd": crowd, "split": split_rule,
              "images": {split: str(folder.resolve()) for split, (_, folder) in sources.items()}}  # fmt: skip
    prepare_output(out, "coco-json", params)
    target = Target("coco-json", out, classes)
    results = run_tasks(_process, tasks, target, workers) + bad
    files = {split: {"annotations": str(path.resolve()), "images": str(folder.resolve()), "sha256": hashes[split]}
             for split, (path, folder) in sources.items()}  # fmt: skip
    categories = {"order": "sorted by category id; background 0",
                  "class_of_category": {str(k): v for k, v in sorted(cat_map.items())}}  # fmt: skip
    extra = {"categories": categories, "crowd": crowd, "overlap_rule": OVERLAP_RULE, "split": split_rule}
    return finish(target, results, RunInfo(annotations, files, extra=extra, warnings=warnings))
