"""LabelMe JSON files (one per image) as semantic segmentation.

Files: every ``*.json`` under ``--source`` (sub-folders too, sorted by path) that has a ``shapes``
list; the id is its path relative to the source without ``.json`` (``a/b.json`` -> ``a_b``).

Images: the file ``imagePath`` names (relative to the JSON file) when it exists, otherwise the
embedded ``imageData`` (base64); ``imageWidth``/``imageHeight`` must match the image as displayed.

Shapes: ``polygon`` (or no ``shape_type``, as old LabelMe wrote), ``rectangle`` (two corners),
``circle`` (centre and a point on the circle) and ``mask`` (a base64 PNG placed at its first
point) are painted in file order, later shapes on top. ``line``, ``linestrip``, ``point`` and
``points`` have no area: they are ignored and counted. Polygons with fewer than 3 points are
ignored and counted too.

Classes: from ``--labels`` (one name per line, LabelMe's ``labels.txt``) or, without it, every
label in first-seen order (files sorted by path, shapes in file order). Either way ``_background_``
(or ``background``) is class 0, named ``background``, and is added first when absent;
``__ignore__`` takes no class index: its shapes become 255 (ignore). The list goes to
``dataset.json`` and ``<out>/labels.txt`` (pass that file as ``--labels`` to pin the order).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from msattn.data.prepare import importing
from msattn.data.prepare.common import ERROR, MISSING, PrepareSummary, Result, Task, make_console
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import Target, check_size, write_item
from msattn.errors import DataError
from msattn.io import read_list_lines, write_text

AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
LINE_SHAPES = ("line", "linestrip", "point", "points")


def _decode_mask(data: str, source: Any) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            return np.asarray(img.convert("L")) > 0
    except Exception as exc:  # noqa: BLE001 - base64 or PIL errors on bad data
        raise DataError(f"{source}: unreadable mask shape ({exc})") from None


def shape_mask(kind: str, points: list[list[float]], extra: Any, height: int, width: int, source: Any) -> np.ndarray:
    """The ``[H, W]`` bool mask of one LabelMe shape of an area type."""
    if kind == "polygon":
        return importing.polygon_mask([v for point in points for v in point], height, width)
    if kind == "rectangle":
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return importing.rectangle_mask(min(xs), min(ys), max(xs), max(ys), height, width)
    if kind == "circle":
        (cx, cy), (px, py) = points[:2]
        radius = float(np.hypot(px - cx, py - cy))
        return importing.ellipse_mask(cx, cy, radius, radius, height, width)
    patch = _decode_mask(extra, source)
    return importing.paste_mask(patch, int(round(points[0][0])), int(round(points[0][1])), height, width)


def _process(task: Task, target: Target) -> Result:
    json_path, image_file, size, shapes = task.payload
    json_path = Path(json_path)
    if image_file is not None:
        image = importing.load_image(Path(image_file), Path(image_file))
    else:
        data = json.loads(json_path.read_text(encoding="utf-8")).get("imageData")
        if not data:
            return task.result(MISSING, f"{json_path}: imagePath not found and no imageData")
        try:
            embedded = base64.b64decode(data)
        except ValueError as exc:
            raise DataError(f"{json_path}: imageData is not base64 ({exc})") from None
        image = importing.load_image(embedded, json_path)
    if size is not None:
        check_size(size, image.image.size, json_path, image_file or f"{json_path} (imageData)")
    width, height = image.image.size
    label = np.zeros((height, width), dtype=np.uint8)
    for kind, class_index, points, extra in shapes:
        label[shape_mask(kind, points, extra, height, width, json_path)] = class_index
    return write_item(target, task, label, image, json_path)


def _points(shape: dict[str, Any], path: Path) -> list[list[float]]:
    try:
        points = [[float(p[0]), float(p[1])] for p in shape.get("points") or []]
    except (TypeError, ValueError, IndexError):
        raise DataError(f"{path}: shape {shape.get('label')!r} has malformed points") from None
    return points


def read_file(path: Path, counts: Counter) -> tuple[dict[str, Any], list[tuple[str, str, list, Any]]]:
    """A LabelMe file's JSON and its area shapes as (kind, label, points, mask data); others are counted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    shapes = data.get("shapes") if isinstance(data, dict) else None
    if not isinstance(shapes, list):
        raise DataError(f"{path}: not a LabelMe file (no 'shapes' list)")
    kept = []
    for shape in shapes:
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise DataError(f"{path}: a shape without a 'label' string")
        kind = shape.get("shape_type") or "polygon"
        points = _points(shape, path)
        if kind in LINE_SHAPES or kind not in AREA_SHAPES:
            counts[f"{kind} shapes (no area) ignored"] += 1
        elif (kind == "polygon" and len(points) < 3) or (kind != "polygon" and len(points) < (1 if kind == "mask" else 2)):
            counts[f"{kind} shapes with too few points ignored"] += 1
        elif kind == "mask" and not shape.get("mask"):
            counts["mask shapes without mask data ignored"] += 1
        else:
            kept.append((kind, shape["label"], points, shape.get("mask")))
    return data, kept


def _image_file(path: Path, data: dict[str, Any]) -> str | None:
    name = data.get("imagePath")
    if not isinstance(name, str) or not name:
        return None
    candidate = path.parent / name.replace("\\", "/")
    return str(candidate) if candidate.is_file() else None


def _size(data: dict[str, Any]) -> tuple[int, int] | None:
    try:
        return int(data["imageWidth"]), int(data["imageHeight"])
    except (KeyError, TypeError, ValueError):
        return None


def scan(source: Path) -> tuple[list[tuple[str, Path, dict, list]], list[tuple[str, str]], Counter, str]:
    """Every LabelMe file under ``source``: (id, path, json, shapes); (id, error); shape counts; a fingerprint."""
    ids, items, bad, counts, digest = importing.IdTable(), [], [], Counter(), hashlib.sha256()
    for path in sorted(source.rglob("*.json"), key=lambda p: p.relative_to(source).as_posix()):
        relative = path.relative_to(source).with_suffix("").as_posix()
        digest.update(relative.encode() + b"\0" + path.read_bytes())
        item_id = ids.add(relative, path)
        if item_id is None:
            continue
        try:
            data, shapes = read_file(path, counts)
        except DataError as exc:
            bad.append((item_id, str(exc)))
            continue
        data.pop("imageData", None)  # the worker reads it again when the image file is absent
        items.append((item_id, path, data, shapes))
    bad += [(item_id, message) for item_id, message in ids.problems]
    return items, bad, counts, digest.hexdigest()


def read_labels_file(path: Path) -> list[str]:
    """Class names of a LabelMe ``labels.txt`` (one per line, blank lines and ``#`` comments skipped)."""
    names = read_list_lines(path, "labels file")
    if not names:
        raise DataError(f"{path}: lists no class names")
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise DataError(f"{path}: class {duplicates[0]!r} is listed twice")
    return names


def _tasks(items: list, index: dict[str, int], assign: dict[str, str]) -> tuple[list[Task], list[Result]]:
    tasks, bad = [], []
    for item_id, path, data, shapes in items:
        unknown = sorted({label for _, label, _, _ in shapes if label not in index})
        if unknown:
            bad.append(Result(assign[item_id], item_id, ERROR, f"{path}: label {unknown[0]!r} is not in the class list"))
            continue
        painted = [(kind, index[label], points, extra) for kind, label, points, extra in shapes]
        tasks.append(Task(assign[item_id], item_id, (str(path), _image_file(path, data), _size(data), painted)))
    return tasks, bad


@locked_output("source")
def prepare_labelme(
    source: Path, out: Path, labels: Path | None = None, val_fraction: float = 0.1, seed: int = 0, workers: int = 2
) -> PrepareSummary:
    """Write every LabelMe-annotated image under ``source`` and its label to ``out``."""
    source, out = Path(source), Path(out)
    importing.check_split_options(val_fraction, seed)
    if not source.is_dir():
        raise DataError(f"{source}: folder not found (--source must hold LabelMe .json files)")
    importing.check_out_separate(out, labels, scanned=source)
    names = read_labels_file(Path(labels)) if labels is not None else None
    items, problems, counts, fingerprint = scan(source)
    if not items and not problems:
        raise DataError(f"{source}: no LabelMe .json files found (searched sub-folders too)")
    first_seen = [label for _, _, _, shapes in items for _, label, _, _ in shapes]
    classes, index = importing.class_names_with_background(names if names is not None else first_seen, labels or source)
    assign = importing.split_by_fraction([i for i, *_ in items] + [i for i, _ in problems], val_fraction, seed)
    tasks, bad = _tasks(items, index, assign)
    bad += [Result(assign.get(item_id, "train"), item_id, ERROR, message) for item_id, message in problems]

    params = {"annotations_sha256": fingerprint, "classes": classes, "split": importing.fraction_rule(val_fraction, seed)}
    prepare_output(out, "labelme", params)
    target = Target("labelme", out, classes)
    results = run_tasks(_process, tasks, target, workers) + bad
    origin = f"from {labels}" if labels is not None else "in first-seen order"
    make_console().print(f"classes ({origin}): {', '.join(classes)}", markup=False, soft_wrap=True)
    write_text(out / "labels.txt", "".join(f"{n}\n" for n in ["__ignore__", "_background_", *classes[1:]]))
    return finish(target, results, RunInfo(
        source,
        {"labelme": str(source.resolve()), "labels": str(Path(labels).resolve()) if labels else None},
        extra={"class_order": origin, "overlap_rule": "shapes painted in file order, later on top",
               "split": importing.fraction_rule(val_fraction, seed)},
        warnings=[f"{source}: {n} {what}" for what, n in sorted(counts.items())],
    ))  # fmt: skip
