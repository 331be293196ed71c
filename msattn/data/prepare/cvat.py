"""CVAT exports: "CVAT for images 1.1" (XML) and "Segmentation mask 1.1" (colour PNGs + labelmap.txt).

XML (``annotations.xml``, images in ``images/`` or ``--images``): classes are the labels of
``<meta>`` in their order (background 0 first, or where a label named ``background`` says), with
their colours as the palette. ``box`` (rotation too), ``polygon``, ``ellipse`` and ``mask`` (CVAT's
RLE) are painted by increasing ``z_order``, equal ``z_order`` in file order (later on top), as CVAT
draws them; ``occluded`` makes no difference. ``polyline``, ``points``, ``cuboid``, ``skeleton``
and ``tag`` have no area and are counted as ignored. Images are split by their ``subset``
attribute when it names a train and a val subset, otherwise by ``--val-fraction``.

Segmentation mask (``labelmap.txt`` with ``label:r,g,b:parts:actions`` lines,
``SegmentationClass/*.png``, images in ``JPEGImages/`` or ``--images``): each mask colour is the
class whose labelmap line has it (line order = class order, background 0 first); a colour not in
labelmap.txt is an error naming the file. Splits come from ``ImageSets/Segmentation/<subset>.txt``
when they name a train and a val subset, otherwise from ``--val-fraction``.
"""

from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from msattn.data.prepare import importing
from msattn.data.prepare.coco_json import image_candidates
from msattn.data.prepare.common import ERROR, IGNORE_INDEX, MISSING, PrepareSummary, Result, Task
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import Target, check_size, write_item
from msattn.errors import DataError, UsageError
from msattn.images import open_image
from msattn.io import read_list_lines

AREA_SHAPES = ("box", "polygon", "ellipse", "mask")
OTHER_SHAPES = ("polyline", "points", "cuboid", "skeleton", "tag")


# ----------------------------------------------------------------------------- CVAT for images 1.1 (XML)


def _floats(element: ET.Element, *names: str) -> list[float]:
    return [float(element.attrib[name]) for name in names]


def _rle_patch(element: ET.Element) -> tuple[np.ndarray, int, int]:
    """A ``<mask>``'s bool patch (row-major runs over its box, starting with a run of 0) and its left, top."""
    left, top, width, height = (int(round(v)) for v in _floats(element, "left", "top", "width", "height"))
    runs = [int(v) for v in element.attrib["rle"].replace(" ", "").split(",") if v]
    if sum(runs) != width * height:
        raise ValueError(f"rle covers {sum(runs)} pixels, the {width}x{height} box has {width * height}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(height, width), left, top


def shape_mask(kind: str, element: ET.Element, height: int, width: int) -> np.ndarray:
    """The ``[H, W]`` bool mask of one XML shape of an area type (raises KeyError/ValueError when malformed)."""
    if kind == "polygon":
        points = [float(v) for pair in element.attrib["points"].split(";") for v in pair.split(",")]
        return importing.polygon_mask(points, height, width)
    angle = float(element.attrib.get("rotation", 0.0))
    if kind == "box":
        x0, y0, x1, y1 = _floats(element, "xtl", "ytl", "xbr", "ybr")
        if not angle:
            return importing.rectangle_mask(x0, y0, x1, y1, height, width)
        cx, cy, c, s = (x0 + x1) / 2, (y0 + y1) / 2, math.cos(math.radians(angle)), math.sin(math.radians(angle))
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        points = [v for x, y in corners for v in (cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)]
        return importing.polygon_mask(points, height, width)
    if kind == "ellipse":
        cx, cy, rx, ry = _floats(element, "cx", "cy", "rx", "ry")
        return importing.ellipse_mask(cx, cy, rx, ry, height, width, angle)
    patch, left, top = _rle_patch(element)
    return importing.paste_mask(patch, left, top, height, width)


def _process_xml(task: Task, target: Target) -> Result:
    candidates, size, shapes, xml_path, name = task.payload
    image = importing.load_listed_image(candidates, size, xml_path, name)
    if isinstance(image, str):
        return task.result(MISSING, image)
    width, height = image.image.size
    label = np.zeros((height, width), dtype=np.uint8)
    for order, class_index, kind, text in shapes:
        element = ET.fromstring(text)
        try:
            mask = shape_mask(kind, element, height, width)
        except (KeyError, ValueError, IndexError) as exc:
            raise DataError(f"{xml_path}: image {name!r}: malformed <{kind}> shape #{order} ({exc})") from None
        label[mask] = class_index
    return write_item(target, task, label, image, xml_path)


def xml_labels(root: ET.Element, path: Path) -> tuple[list[str], dict[str, int], list[list[int]]]:
    """Classes of the ``<meta>`` labels (background 0), name -> index, and the palette from their colours."""
    names, colours = [], {}
    meta = root.find("meta")
    for label in meta.findall(".//labels/label") if meta is not None else []:
        name = (label.findtext("name") or "").strip()
        if not name or (label.findtext("parent") or "").strip():
            continue  # sub-labels of skeletons have no area
        names.append(name)
        if (label.findtext("color") or "").strip():
            colours[name] = importing.parse_colour(label.findtext("color"), path)
    used = [e.attrib.get("label", "") for image in root.iter("image") for e in image if e.tag in AREA_SHAPES]
    missing = [n for n in dict.fromkeys(used) if n and n not in names]
    classes, index = importing.class_names_with_background(names + missing, path)
    by_index = {index[name]: rgb for name, rgb in colours.items() if index[name] != IGNORE_INDEX}
    return classes, index, importing.palette_for(classes, by_index)


def _xml_items(root: ET.Element, xml_path: Path, images: Path, index: dict[str, int]) -> tuple[list, list, Counter]:
    """(id, subset, payload) per image, (id, error) per bad image, and counts of ignored shapes."""
    ids, items, counts = importing.IdTable(), [], Counter()
    for image in root.iter("image"):
        name = image.attrib.get("name", "")
        item_id = ids.add(Path(name.replace("\\", "/")).with_suffix("").as_posix(), f"{xml_path} (image {name!r})")
        if item_id is None:
            continue
        shapes, unknown = [], None
        for order, element in enumerate(image):
            label = element.attrib.get("label", "")
            if element.tag not in AREA_SHAPES:
                counts[f"<{element.tag}> shapes (no area) ignored"] += 1
            elif label not in index:
                unknown = f"{xml_path}: image {name!r}: <{element.tag}> has no known label ({label!r})"
            else:
                text = ET.tostring(element, encoding="unicode")
                shapes.append((int(element.attrib.get("z_order", 0) or 0), order, index[label], element.tag, text))
        if unknown is not None:
            ids.problems.append((item_id, unknown))
            continue
        shapes.sort(key=lambda s: (s[0], s[1]))  # z_order, then file order
        try:
            size = (int(image.attrib["width"]), int(image.attrib["height"]))
        except (KeyError, ValueError):
            size = None
        payload = (image_candidates(images, name), size, [s[1:] for s in shapes], str(xml_path), name)
        items.append((item_id, image.attrib.get("subset"), payload))
    return items, ids.problems, counts


def _find_xml(source: Path) -> Path | None:
    if source.is_file():
        return source
    if (source / "annotations.xml").is_file():
        return source / "annotations.xml"
    found = sorted(source.glob("*.xml"))
    return found[0] if len(found) == 1 else None


def read_xml(xml_path: Path, images: Path) -> dict[str, Any]:
    """Everything the XML export gives: classes, palette, items, problems, warnings, fingerprint."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{xml_path}: not valid XML ({exc})") from None
    if root.tag != "annotations":
        raise DataError(f"{xml_path}: not a CVAT XML file (the root element is <{root.tag}>, not <annotations>)")
    if root.find("image") is None and root.find("track") is not None:
        raise DataError(f"{xml_path}: a 'CVAT for video' export (tracks); export the task as 'CVAT for images 1.1'")
    classes, index, palette = xml_labels(root, xml_path)
    items, problems, counts = _xml_items(root, xml_path, images, index)
    return {"classes": classes, "palette": palette, "items": items, "problems": problems,
            "warnings": [f"{xml_path}: {n} {what}" for what, n in sorted(counts.items())],
            "fingerprint": hashlib.sha256(xml_path.read_bytes()).hexdigest(), "process": _process_xml,
            "format": "CVAT for images 1.1", "annotations": str(xml_path.resolve())}  # fmt: skip


# ----------------------------------------------------------------------------- Segmentation mask 1.1


def read_labelmap(path: Path) -> tuple[list[str], dict[tuple[int, int, int], int], list[list[int]]]:
    """Classes of ``labelmap.txt`` (line order, background 0), colour -> class index, and the palette."""
    names, colours = [], []
    for line in read_list_lines(path, "labelmap"):
        parts = line.rsplit(":", 3)
        if len(parts) != 4 or not parts[0]:
            raise DataError(f"{path}: line {line!r} is not 'label:r,g,b:parts:actions'")
        names.append(parts[0])
        colours.append(importing.parse_colour(parts[1], path))
    if not names:
        raise DataError(f"{path}: lists no labels")
    classes, index = importing.class_names_with_background(names, path)
    table: dict[tuple[int, int, int], int] = {}
    for name, rgb in zip(names, colours):
        if rgb in table and table[rgb] != index[name]:
            raise DataError(f"{path}: colour {rgb} is given to two labels")
        table[rgb] = index[name]
    if 0 not in table.values():
        if (0, 0, 0) in table:
            raise DataError(f"{path}: no background line, and black (0,0,0) belongs to a class")
        table[(0, 0, 0)] = 0
    by_index = {i: rgb for rgb, i in table.items() if i != IGNORE_INDEX}
    return classes, table, importing.palette_for(classes, by_index)


def _process_mask(task: Task, target: Target) -> Result:
    mask_path, image_path, table = task.payload
    if image_path is None:
        return task.result(MISSING, f"no image named {task.id} for {mask_path}")
    image = importing.load_image(Path(image_path), Path(image_path))
    rgb = np.asarray(open_image(mask_path, mode="RGB"))
    check_size((rgb.shape[1], rgb.shape[0]), image.image.size, mask_path, image_path)
    return write_item(target, task, importing.colours_to_label(rgb, dict(table), mask_path), image, mask_path)


def _mask_subsets(root: Path) -> dict[str, str]:
    """id -> subset name from ``ImageSets/Segmentation/<subset>.txt``."""
    folder, subsets = root / "ImageSets" / "Segmentation", {}
    for path in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
        for name in read_list_lines(path, "image set"):
            subsets.setdefault(importing.safe_id(name), path.stem)
    return subsets


def read_mask_export(root: Path, images: Path) -> dict[str, Any]:
    """Everything the segmentation-mask export gives (see :func:`read_xml`)."""
    labelmap = root / "labelmap.txt"
    classes, table, palette = read_labelmap(labelmap)
    masks = root / "SegmentationClass"
    if not masks.is_dir():
        raise DataError(f"{root}: no SegmentationClass/ folder next to labelmap.txt")
    subsets, ids, items = _mask_subsets(root), importing.IdTable(), []
    table_items = tuple(sorted(table.items()))
    for path in sorted(masks.rglob("*.png")):
        relative = path.relative_to(masks).with_suffix("").as_posix()
        item_id = ids.add(relative, path)
        if item_id is None:
            continue
        image = next((c for c in (images / relative).parent.glob(f"{Path(relative).name}.*")
                      if c.suffix.lower() in importing.IMAGE_SUFFIXES), None)  # fmt: skip
        items.append((item_id, subsets.get(item_id), (str(path), str(image) if image else None, table_items)))
    return {"classes": classes, "palette": palette, "items": items, "problems": ids.problems, "warnings": [],
            "fingerprint": hashlib.sha256(labelmap.read_bytes()).hexdigest(), "process": _process_mask,
            "format": "Segmentation mask 1.1", "annotations": str(root.resolve())}  # fmt: skip


# ----------------------------------------------------------------------------- both


def _assign(items: list, problems: list, val_fraction: float, seed: int) -> tuple[dict[str, str], str]:
    """id -> split: the export's subsets when they name train and val, else a seeded fraction."""
    subsets = {item_id: importing.subset_split(subset) for item_id, subset, _ in items}
    if {"train", "val"} <= set(subsets.values()):
        assign = {item_id: split or "train" for item_id, split in subsets.items()}
        return {**{i: "train" for i, _ in problems}, **assign}, "the export's subsets (others -> train)"
    ids = list(subsets) + [i for i, _ in problems]
    return importing.split_by_fraction(ids, val_fraction, seed), importing.fraction_rule(val_fraction, seed)


@locked_output("source", "images")
def prepare_cvat(
    source: Path, out: Path, images: Path | None = None, val_fraction: float = 0.1, seed: int = 0, workers: int = 2
) -> PrepareSummary:
    """Write a CVAT export (XML or segmentation masks) to ``out``."""
    source, out = Path(source), Path(out)
    importing.check_split_options(val_fraction, seed)
    if not source.exists():
        raise DataError(f"{source}: not found (--source must be a CVAT export folder or its annotations.xml)")
    root = source.parent if source.is_file() else source
    xml_path = _find_xml(source)
    if xml_path is not None:
        images = Path(images) if images is not None else root / "images"
        found = read_xml(xml_path, images)
    elif (root / "labelmap.txt").is_file():
        images = Path(images) if images is not None else root / "JPEGImages"
        found = read_mask_export(root, images)
    else:
        raise DataError(f"{source}: neither annotations.xml ('CVAT for images 1.1') nor labelmap.txt ('Segmentation mask 1.1')")
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found (export with images, or pass --images)")
    importing.check_out_separate(out, root, images)
    if not found["items"] and not found["problems"]:
        raise UsageError(f"{source}: the export holds no images")
    assign, split_rule = _assign(found["items"], found["problems"], val_fraction, seed)
    tasks = [Task(assign[item_id], item_id, payload) for item_id, _, payload in found["items"]]
    bad = [Result(assign.get(i, "train"), i, ERROR, message) for i, message in found["problems"]]

    params = {"format": found["format"], "sha256": found["fingerprint"], "images": str(images.resolve()), "split": split_rule}
    prepare_output(out, "cvat", params)
    target = Target("cvat", out, found["classes"], found["palette"])
    results = run_tasks(found["process"], tasks, target, workers) + bad
    return finish(target, results, RunInfo(
        source,
        {"cvat": found["annotations"], "images": str(images.resolve()), "format": found["format"]},
        extra={"split": split_rule, "overlap_rule": "z_order, then file order (later on top)"},
        warnings=found["warnings"],
    ))  # fmt: skip
