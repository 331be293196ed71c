"""Checks of a dataset folder before hours of training (``msattn check-data``).

:func:`check_dataset` reads ``dataset.json``, the id lists and every (or a sample of) image/label
pair and returns a :class:`CheckReport`: findings (errors break training or scoring; warnings are
suspicious) and a summary (per-class pixel share and image count per split, image sizes, object
sizes as connected components per class). :func:`label_problems` holds the rules for one label's
values so that other commands can apply the same ones.

EXIF rule: msattn reads the stored pixels of an image and ignores its EXIF orientation tag, so a
label must match the stored pixels; an image with a rotating tag is shown turned in viewers (and
was likely annotated that way), hence a warning. ``prepare-data`` stores images upright.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
from PIL import Image
from rich.progress import Progress

from msattn.data.info import read_dataset_info
from msattn.data.labels import bad_label_values, label_warnings
from msattn.data.prepare.common import make_console
from msattn.data.prepare.importing import exif_orientation
from msattn.errors import DataError
from msattn.images import open_image
from msattn.io import check_id, max_pixels_limit, read_list_lines

ERROR, WARNING = "error", "warning"
TINY_SIDE = 32  # px: smaller images are suspicious (thumbnails, icons)
HUGE_SIDE = 4096  # px: larger images are slow to read and crop on every iteration
DEFAULT_SPLITS = ("train", "val", "test")
OBJECT_BINS = 24  # log2 bins of connected-component areas: [1, 2), [2, 4), ... [2^23, inf)


@dataclass(frozen=True)
class Finding:
    """One problem: ``level`` is ``error`` or ``warning``; ``code`` groups findings of one kind."""

    level: str
    code: str
    message: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class ItemStats:
    """What checking one image/label pair found."""

    split: str
    id: str
    findings: list[Finding] = field(default_factory=list)
    size: tuple[int, int] | None = None
    pixels: list[int] | None = None  # per class, then ignore
    digest: str | None = None
    objects: dict[int, list[int]] = field(default_factory=dict)  # class -> OBJECT_BINS counts


@dataclass
class CheckReport:
    """Everything :func:`check_dataset` found; ``ok`` when there is no error."""

    root: Path
    classes: list[str]
    ignore_index: int
    splits: dict[str, int]  # ids listed per split
    checked: dict[str, int]  # ids checked per split (fewer with ``sample``)
    sampled: bool
    findings: list[Finding]
    class_pixels: dict[str, list[int]]  # split -> pixels per class
    class_images: dict[str, list[int]]  # split -> images containing each class
    ignore_pixels: dict[str, int]
    image_sizes: list[tuple[int, int, int]]  # (width, height, count), most common first
    object_sizes: list[list[int]]  # per class: OBJECT_BINS counts of component areas

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary_line(self) -> str:
        """``N errors, M warnings in K images`` with the most common error or warning."""
        checked = sum(self.checked.values())
        head = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) in {checked} image(s) of {self.root}"
        first = (self.errors or self.warnings or [None])[0]
        return head if first is None else f"{head}; first: {first}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every number and finding."""
        return {
            "root": str(self.root), "classes": self.classes, "ignore_index": self.ignore_index,
            "splits": self.splits, "checked": self.checked, "sampled": self.sampled, "ok": self.ok,
            "errors": len(self.errors), "warnings": len(self.warnings),
            "findings": [vars(f) for f in self.findings],
            "class_pixels": self.class_pixels, "class_images": self.class_images, "ignore_pixels": self.ignore_pixels,
            "image_sizes": [list(s) for s in self.image_sizes],
            "object_sizes": {"bins": "log2 of the component area: bin k counts areas in [2^k, 2^(k+1))",
                             "per_class": self.object_sizes},
        }  # fmt: skip


# ----------------------------------------------------------------------------- rules for one label


def label_problems(values: np.ndarray, num_classes: int, ignore_index: int = 255) -> list[Finding]:
    """Problems of a label from its values (the label array, or its unique values), by the rules of
    :mod:`msattn.data.labels` that training and evaluation apply too.

    Errors: values that are neither a class index nor ``ignore_index``. Warnings: a label that is
    all ignore, and one holding only 0 and ``ignore_index`` (a binary mask whose objects were
    stored as 255, which means ignore).
    """
    found = np.unique(np.asarray(values))
    problems = []
    bad = bad_label_values(found.tolist(), num_classes, ignore_index)
    if bad:
        shown = ", ".join(str(v) for v in bad[:5])
        problems.append(Finding(ERROR, "values-out-of-range",
                                f"label values {shown} outside the classes 0..{num_classes - 1} (ignore: {ignore_index})"))  # fmt: skip
    for message in label_warnings(found.tolist(), num_classes, ignore_index):
        code = "all-ignore" if message.startswith("every pixel") else "binary-mask"
        problems.append(Finding(WARNING, code, message))
    return problems


def image_problems(width: int, height: int, orientation: int = 1) -> list[Finding]:
    """Warnings about an image's size and EXIF orientation (see the module docstring)."""
    problems = []
    if min(width, height) < TINY_SIDE:
        problems.append(Finding(WARNING, "tiny-image", f"tiny image ({width}x{height}, a side under {TINY_SIDE} px)"))
    if max(width, height) > HUGE_SIDE:
        problems.append(Finding(WARNING, "huge-image",
                                f"huge image ({width}x{height}, a side over {HUGE_SIDE} px): slow to read on every "
                                "iteration; consider downscaling images and labels"))  # fmt: skip
    if orientation not in (0, 1):
        problems.append(Finding(WARNING, "exif-rotated",
                                f"EXIF orientation {orientation}: viewers show it turned; msattn reads it turned when "
                                "its label matches the turned size, else as stored (prepare-data stores images upright)"))  # fmt: skip
    return problems


# ----------------------------------------------------------------------------- one pair


@dataclass(frozen=True)
class _Settings:
    root: str
    num_classes: int
    ignore_index: int
    palette: tuple[tuple[int, int, int], ...]
    full: bool
    max_pixels: int


def _read_image(path: Path, settings: _Settings, stats: ItemStats) -> tuple[int, int] | None:
    """Header (and with ``full``, pixels) of the image; findings into ``stats``; returns its stored (W, H)."""
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as img:
            width, height = img.size
            if settings.max_pixels and width * height > settings.max_pixels:
                stats.findings.append(Finding(ERROR, "over-pixel-limit",
                                              f"{width}x{height} pixels, over the limit of {settings.max_pixels}", str(path)))  # fmt: skip
                return None
            orientation = exif_orientation(img)
            if settings.full:
                img.load()
                stats.digest = hashlib.sha256(img.tobytes()).hexdigest()
    except FileNotFoundError:
        stats.findings.append(Finding(ERROR, "missing-image", "image file not found", str(path)))
        return None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt files
        stats.findings.append(Finding(ERROR, "unreadable-image", f"cannot read image ({exc})", str(path)))
        return None
    if stats.digest is None:
        stats.digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stats.findings += [Finding(f.level, f.code, f.message, str(path)) for f in image_problems(width, height, orientation)]
    if orientation in (5, 6, 7, 8):
        stats.size = (height, width)  # as displayed: a label drawn on the turned image has these sides
    return width, height


def _read_label(path: Path, settings: _Settings, stats: ItemStats) -> np.ndarray | None:
    """The label's values (any mode the loader accepts); mode, format and palette findings into ``stats``."""
    try:
        img = open_image(path, mode=None, max_pixels=settings.max_pixels)  # a copy: no .format
        with Image.open(path) as probe:
            fmt = probe.format
    except DataError as exc:
        code = "missing-label" if "not found" in str(exc) else "unreadable-label"
        stats.findings.append(Finding(ERROR, code, str(exc).split(": ", 1)[-1], str(path)))
        return None
    add = stats.findings.append
    if fmt != "PNG":
        add(Finding(ERROR, "label-not-png", f"a {fmt} file: labels must be PNG (lossy formats change values)", str(path)))
    if img.mode in ("RGB", "RGBA"):
        add(Finding(ERROR, "label-rgb", "an RGB image: labels must hold class indices (8-bit palette PNG); "
                    "convert colour masks with `msattn prepare-data masks --classes`", str(path)))  # fmt: skip
        return None
    if img.mode not in ("P", "L", "I", "I;16"):
        add(Finding(ERROR, "label-mode", f"a mode {img.mode} image: labels must be 8-bit palette PNGs", str(path)))
        return None
    if img.mode == "L":
        add(Finding(WARNING, "label-no-palette", "a grey PNG without palette (readable; viewers show it dark)", str(path)))
    elif img.mode != "P":
        add(Finding(WARNING, "label-16bit", f"a mode {img.mode} (16/32-bit) PNG; 8-bit palette PNGs are expected", str(path)))
    else:
        flat = img.getpalette() or []
        colours = [tuple(flat[3 * i : 3 * i + 3]) for i in range(min(len(flat) // 3, len(settings.palette)))]
        if colours != list(settings.palette[: len(colours)]) or len(colours) < len(settings.palette):
            add(Finding(WARNING, "palette-differs", "its palette differs from dataset.json's (colours only; values are "
                        "read as class indices)", str(path)))  # fmt: skip
    return np.asarray(img)


def _objects(label: np.ndarray, classes: Sequence[int]) -> dict[int, list[int]]:
    """Per class present: OBJECT_BINS counts of connected-component areas (4-connectivity)."""
    found = {}
    for cls in classes:
        components, count = scipy.ndimage.label(label == cls)
        if count:
            areas = np.bincount(components.ravel())[1:]
            bins = np.minimum(np.floor(np.log2(areas)).astype(int), OBJECT_BINS - 1)
            found[int(cls)] = np.bincount(bins, minlength=OBJECT_BINS).tolist()
    return found


def check_item(split: str, item_id: str, settings: _Settings) -> ItemStats:
    """Check one image/label pair of the dataset folder."""
    root, stats = Path(settings.root), ItemStats(split, item_id)
    image_path, label_path = root / "images" / f"{item_id}.jpg", root / "labels" / f"{item_id}.png"
    displayed = None
    stored = _read_image(image_path, settings, stats)
    if stored is not None:
        displayed, stats.size = stats.size, stored
    label = _read_label(label_path, settings, stats) if label_path.is_file() else None
    if not label_path.is_file():
        stats.findings.append(Finding(ERROR, "missing-label", "label file not found", str(label_path)))
    if label is None:
        return stats
    size = (label.shape[1], label.shape[0])
    if stored is not None and size != stored:
        hint = " (it matches the image turned by its EXIF orientation)" if size == displayed else ""
        stats.findings.append(Finding(ERROR, "size-mismatch", f"label is {size[0]}x{size[1]} but {image_path} is "
                                      f"{stored[0]}x{stored[1]}{hint}", str(label_path)))  # fmt: skip
    counts = np.bincount(label.ravel().astype(np.int64), minlength=max(settings.num_classes, settings.ignore_index + 1))
    present = np.flatnonzero(counts)
    stats.findings += [Finding(f.level, f.code, f.message, str(label_path))
                       for f in label_problems(present, settings.num_classes, settings.ignore_index)]  # fmt: skip
    stats.pixels = counts[: settings.num_classes].tolist() + [int(counts[settings.ignore_index])]
    stats.size = stats.size or size
    stats.objects = _objects(label, [c for c in present.tolist() if c < settings.num_classes])
    return stats


# ----------------------------------------------------------------------------- the whole folder


def _read_lists(root: Path, splits: Sequence[str] | None) -> tuple[dict[str, list[str]], list[Finding]]:
    """The ids of each split list (invalid ids dropped) and the findings about the lists themselves."""
    findings, lists = [], {}
    for split in splits or DEFAULT_SPLITS:
        path = root / f"{split}.txt"
        if not path.is_file():
            if split == "train" or splits:
                findings.append(Finding(ERROR, "missing-list", "id list not found", str(path)))
            elif split == "val":
                findings.append(Finding(WARNING, "missing-list", "no val list: training cannot validate", str(path)))
            continue
        try:
            entries = read_list_lines(path, "id list")
        except DataError as exc:
            findings.append(Finding(ERROR, "unreadable-list", str(exc).split(": ", 1)[-1], str(path)))
            continue
        ids = []
        for entry in entries:
            try:
                ids.append(check_id(entry, path))
            except DataError:
                findings.append(Finding(ERROR, "bad-id", f"invalid id {entry!r} (a plain file stem is expected)", str(path)))
        if not ids:
            findings.append(Finding(ERROR, "empty-list", "lists no ids (train and evaluate refuse it)", str(path)))
        for item_id, count in Counter(ids).items():
            if count > 1:
                findings.append(Finding(WARNING, "duplicate-id", f"id {item_id!r} is listed {count} times", str(path)))
        lists[split] = ids
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        for item_id in sorted(set(lists.get(first, ())) & set(lists.get(second, ()))):
            findings.append(Finding(WARNING, "id-in-two-splits", f"id {item_id!r} is in {first} and {second}", str(root)))
    return lists, findings


def _choose(lists: dict[str, list[str]], sample: int | None, seed: int) -> dict[str, list[str]]:
    """Every distinct id of each split, or ``sample`` of them drawn with ``default_rng([seed])``."""
    chosen = {}
    for split, ids in lists.items():
        ids = list(dict.fromkeys(ids))
        if sample is not None and sample < len(ids):
            order = np.random.default_rng([seed]).permutation(len(ids))[:sample]
            ids = [ids[i] for i in sorted(order)]
        chosen[split] = ids
    return chosen


def _run_checks(todo: list[tuple[str, str]], settings: _Settings, workers: int, progress: bool) -> list[ItemStats]:
    run = functools.partial(_check_pair, settings=settings)
    with Progress(console=make_console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("check-data", total=len(todo))
        if workers <= 0 or len(todo) < 8:
            results = []
            for pair in todo:
                results.append(run(pair))
                bar.advance(task)
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = []
            for stats in pool.map(run, todo, chunksize=max(1, min(32, len(todo) // (workers * 8)))):
                results.append(stats)
                bar.advance(task)
            return results


def _check_pair(pair: tuple[str, str], settings: _Settings) -> ItemStats:
    return check_item(pair[0], pair[1], settings)


def _dataset_findings(items: list[ItemStats], classes: list[str], sampled: bool) -> list[Finding]:
    """Findings that need every pair: duplicate content across splits, classes never or only in val."""
    findings, owners = [], defaultdict(list)
    for stats in items:
        if stats.digest is not None:
            owners[stats.digest].append(stats)
    for group in owners.values():
        splits = {s.split for s in group}
        if len(splits) > 1:
            names = ", ".join(f"{s.split}/{s.id}" for s in group[:4])
            findings.append(Finding(WARNING, "duplicate-content", f"the same image content in {names}"))
    if sampled:
        return findings
    present: dict[str, set[int]] = defaultdict(set)
    for stats in items:
        if stats.pixels is not None:
            present[stats.split] |= {c for c, n in enumerate(stats.pixels[:-1]) if n}
    everywhere = set().union(*present.values()) if present else set()
    for index, name in enumerate(classes):
        if index not in everywhere:
            findings.append(Finding(WARNING, "class-never-present", f"class {index} ({name}) is in no label"))
        elif index in present.get("val", set()) and index not in present.get("train", set()):
            findings.append(Finding(WARNING, "class-val-not-train", f"class {index} ({name}) is in val labels but in no train label"))
    return findings


def check_dataset(
    root: Path,
    splits: Sequence[str] | None = None,
    sample: int | None = None,
    num_classes: int | None = None,
    *,
    full: bool = False,
    workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> CheckReport:
    """Check a dataset folder: every pair of ``splits`` (default train, val and test when listed).

    ``sample``: check only that many ids per split (drawn with ``seed``), e.g. at the start of
    training; the findings that need every label (a class never present, in val but not train) are
    then skipped. ``num_classes`` overrides the class count of ``dataset.json`` (a model's).
    ``full`` also decodes every image and compares images by their pixels (else by file bytes).
    A folder without a readable ``dataset.json`` raises :class:`DataError`; every other problem
    is a finding in the report.
    """
    root = Path(root)
    info = read_dataset_info(root)
    count = int(num_classes) if num_classes is not None else info.num_classes
    lists, findings = _read_lists(root, splits)
    chosen = _choose(lists, sample, seed)
    palette = tuple(tuple(int(v) for v in rgb) for rgb in info.palette[: info.num_classes])
    settings = _Settings(str(root), count, info.ignore_index, palette, full, max_pixels_limit())
    todo = [(split, item_id) for split, ids in chosen.items() for item_id in ids]
    items = _run_checks(todo, settings, workers, progress)
    for stats in items:
        findings += stats.findings
    sampled = any(len(chosen[s]) < len(set(lists[s])) for s in lists)
    findings += _dataset_findings(items, info.classes[:count] + [f"class {i}" for i in range(len(info.classes), count)], sampled)
    return _report(root, info, count, lists, chosen, items, findings, sampled)


def _report(root: Path, info: Any, count: int, lists: dict, chosen: dict, items: list[ItemStats],
            findings: list[Finding], sampled: bool) -> CheckReport:  # fmt: skip
    pixels = {split: [0] * count for split in chosen}
    images = {split: [0] * count for split in chosen}
    ignore = {split: 0 for split in chosen}
    objects = [[0] * OBJECT_BINS for _ in range(count)]
    sizes: Counter = Counter()
    for stats in items:
        if stats.size is not None:
            sizes[stats.size] += 1
        if stats.pixels is None:
            continue
        for cls, n in enumerate(stats.pixels[:-1]):
            pixels[stats.split][cls] += n
            images[stats.split][cls] += n > 0
        ignore[stats.split] += stats.pixels[-1]
        for cls, hist in stats.objects.items():
            objects[cls] = [a + b for a, b in zip(objects[cls], hist)]
    classes = list(info.classes[:count]) + [f"class {i}" for i in range(len(info.classes), count)]
    return CheckReport(
        root=root, classes=classes, ignore_index=info.ignore_index,
        splits={s: len(ids) for s, ids in lists.items()}, checked={s: len(ids) for s, ids in chosen.items()},
        sampled=sampled, findings=findings, class_pixels=pixels, class_images=images, ignore_pixels=ignore,
        image_sizes=[(w, h, n) for (w, h), n in sizes.most_common()], object_sizes=objects,
    )  # fmt: skip
