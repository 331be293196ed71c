"""Helpers shared by the importers of users' own annotations (coco-json, labelme, cvat, cityscapes, masks).

Rules every importer follows:

- **Ids** are the source file's name stem, made safe by :func:`safe_id` (path separators, control
  characters, ``..`` and a leading ``.`` or ``#`` become ``_``); two sources giving one id are
  an error for the second, naming both files.
- **Images** are stored as people see them: the EXIF orientation is applied
  (``ImageOps.exif_transpose``) before writing, and every size check uses the oriented size, since
  annotation tools draw on the image as displayed. JPEGs without a rotation are hard-linked (or
  copied); everything else (PNG, WebP, BMP, TIFF, rotated JPEGs) is written as a quality-95 JPEG.
- **Geometry**: coordinates are in pixels with ``(0, 0)`` the top-left corner of the top-left
  pixel; a pixel belongs to a shape when its centre is inside (polygons and rectangles are
  rasterised by pycocotools, the reader of COCO polygons, so every format follows one rule).
- **Splits**: when the source gives none, ids are sorted, permuted with
  ``numpy.random.default_rng([seed, 2])`` and the first ``round(F * n)`` (at least 1) go to val.
- ``--out`` must not be or contain an input (nor lie inside a folder that is searched recursively).
"""

from __future__ import annotations

import io
import math
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from msattn.data.palette import voc_colormap
from msattn.data.prepare.coco import decode_segmentation
from msattn.data.prepare.common import ERROR, IGNORE_INDEX, Result
from msattn.data.prepare.writer import DecodedImage, check_size
from msattn.errors import DataError, UsageError
from msattn.images import open_image
from msattn.io import check_id, max_pixels_limit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: names that mean "background" (class 0) and "ignore" (255) in class lists and annotations
BACKGROUND_NAMES = ("background", "_background_", "__background__")
IGNORE_NAMES = ("__ignore__",)
SUBSET_NAMES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


# ----------------------------------------------------------------------------- ids and folders


def safe_id(name: str) -> str:
    """``name`` as a safe id: separators, control characters and ``..`` -> ``_``; no leading ``.``/``#``."""
    text = "".join("_" if c in "/\\" or unicodedata.category(c).startswith("C") else c for c in name).strip()
    while ".." in text:
        text = text.replace("..", "_")
    if text[:1] in (".", "#"):
        text = "_" + text[1:]
    return text or "_"


class IdTable:
    """Gives each source a safe, unique id; a second source with the same id becomes a problem naming both."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.problems: list[tuple[str, str]] = []  # (id, message)

    def add(self, name: str, source: str | Path) -> str | None:
        """The id for ``name`` (from ``source``), or None (and a recorded problem) if it is taken."""
        item_id = check_id(safe_id(name), source)
        if item_id in self.owner:
            self.problems.append((item_id, f"{source}: gives the id {item_id!r} that {self.owner[item_id]} already has"))
            return None
        self.owner[item_id] = str(source)
        return item_id

    def error_results(self, split: str = "train") -> list[Result]:
        """The problems as error results (so they reach the report table and ``prepare_report.json``)."""
        return [Result(split, f"{item_id} (duplicate {n + 1})", ERROR, message)
                for n, (item_id, message) in enumerate(self.problems)]  # fmt: skip


def check_out_separate(out: Path, *sources: Path | None, scanned: Path | None = None) -> None:
    """Refuse an ``--out`` that is or contains a source (file or folder), or lies inside ``scanned``.

    ``scanned`` is a folder the importer searches recursively, where its own output would be found
    as input on the next run.
    """
    target = Path(out).resolve()
    for source in (*sources, scanned):
        if source is None:
            continue
        src = Path(source).resolve()
        if src == target or src.is_relative_to(target):
            raise UsageError(f"{out}: is or contains the input {source}; choose an --out outside the inputs")
    if scanned is not None and target.is_relative_to(Path(scanned).resolve()):
        raise UsageError(f"{out}: lies inside the input folder {scanned}, which is searched; choose an --out outside it")


def subset_split(name: str | None) -> str | None:
    """``train``/``val``/``test`` for a subset name such as ``Train``, ``validation``, ``test``; else None."""
    return SUBSET_NAMES.get((name or "").strip().lower())


def split_by_fraction(ids: Iterable[str], fraction: float, seed: int) -> dict[str, str]:
    """id -> ``train``/``val``: sorted ids permuted with ``default_rng([seed, 2])``, the first ``round(F n)`` to val."""
    ordered = sorted(set(ids))
    if not ordered:
        return {}
    count = min(len(ordered) - 1, max(1, round(fraction * len(ordered)))) if len(ordered) > 1 else 0
    order = np.random.default_rng([seed, 2]).permutation(len(ordered))
    val = {ordered[i] for i in order[:count]}
    return {item_id: "val" if item_id in val else "train" for item_id in ordered}


def fraction_rule(fraction: float, seed: int) -> str:
    """How :func:`split_by_fraction` chose val, for ``dataset.json``."""
    return f"sorted ids permuted by numpy default_rng([{seed}, 2]); the first round({fraction} x n) (at least 1) are val"


def check_split_options(val_fraction: float, seed: int) -> None:
    """``--val-fraction`` must lie in (0, 1) and ``--seed`` be >= 0."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")


def find_images(folder: Path) -> dict[str, Path]:
    """Stem -> image file directly in ``folder`` (sorted by name; the first of two equal stems wins)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


# ----------------------------------------------------------------------------- images


def exif_orientation(img: Any) -> int:
    """The EXIF orientation tag of an opened PIL image (1 when absent or unreadable)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not stop the import
        return 1


def load_image(source: Path | bytes, name: str | Path) -> DecodedImage:
    """Decode an image as displayed (EXIF applied, RGB), to be linked from its file when that is an upright JPEG.

    ``source`` is a path or the bytes of an image file (LabelMe's ``imageData``); ``name`` names it
    in errors.
    """
    if isinstance(source, bytes):
        img = _decode_bytes(source, name)
        link = None
    else:
        img = open_image(source, mode=None)  # decodes fully, within the pixel limit; drops .format
        with Image.open(source) as probe:
            link = source if probe.format == "JPEG" and exif_orientation(probe) == 1 else None
    oriented = ImageOps.exif_transpose(img)
    if oriented.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey photos (microscopy): keep the top 8 bits
        array = np.asarray(oriented, dtype=np.int64)
        oriented = Image.fromarray((array >> 8 if array.max() > 255 else array).clip(0, 255).astype(np.uint8))
    return DecodedImage(oriented if oriented.mode == "RGB" else oriented.convert("RGB"), name, link)


def _decode_bytes(data: bytes, name: str | Path) -> Image.Image:
    """An image embedded in an annotation file, decoded within the pixel limit."""
    limit = max_pixels_limit()
    try:
        img = Image.open(io.BytesIO(data))
        if limit and img.size[0] * img.size[1] > limit:
            raise DataError(f"{name}: the embedded image has {img.size[0]}x{img.size[1]} pixels, over the "
                            f"limit of {limit} (msattn --max-pixels N to raise it)")  # fmt: skip
        img.load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad bytes
        raise DataError(f"{name}: cannot read the embedded image ({exc})") from None
    return img


def load_listed_image(
    candidates: Sequence[str], size: tuple[int, int] | None, annotation: Any, name: str
) -> DecodedImage | str:
    """The first existing file of ``candidates`` decoded by :func:`load_image` and checked against the
    annotation's (W, H) ``size`` (when given), or the reason it is missing."""
    found = next((Path(c) for c in candidates if Path(c).is_file()), None)
    if found is None:
        return f"no image {name!r} in {Path(candidates[-1]).parent}"
    image = load_image(found, found)
    if size is not None:
        check_size(size, image.image.size, f"{annotation} (image {name!r})", found)
    return image


# ----------------------------------------------------------------------------- geometry


def polygon_mask(points: Sequence[float], height: int, width: int) -> np.ndarray:
    """A filled polygon ``[x0, y0, x1, y1, ...]`` (at least 3 points) as an ``[H, W]`` bool mask."""
    return decode_segmentation([[float(v) for v in points]], height, width)


def rectangle_mask(x0: float, y0: float, x1: float, y1: float, height: int, width: int) -> np.ndarray:
    """The rectangle between two corners (any order) as a bool mask (pixel centres inside)."""
    xa, xb, ya, yb = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    return polygon_mask([xa, ya, xb, ya, xb, yb, xa, yb], height, width)


def ellipse_mask(
    cx: float, cy: float, rx: float, ry: float, height: int, width: int, angle: float = 0.0
) -> np.ndarray:
    """An ellipse (radii ``rx``, ``ry``, rotated by ``angle`` degrees clockwise) as a bool mask (pixel centres)."""
    yy, xx = np.mgrid[0:height, 0:width]
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    theta = math.radians(angle)
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    rx, ry = max(rx, 1e-6), max(ry, 1e-6)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def paste_mask(patch: np.ndarray, left: int, top: int, height: int, width: int) -> np.ndarray:
    """A bool ``patch`` placed with its top-left pixel at (``left``, ``top``) in an ``[H, W]`` mask (clipped)."""
    mask = np.zeros((height, width), dtype=bool)
    ph, pw = patch.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + ph, height), min(left + pw, width)
    if y1 > y0 and x1 > x0:
        mask[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    return mask


def parse_colour(text: str, source: Any) -> tuple[int, int, int]:
    """``#rrggbb`` or ``r,g,b`` as a tuple of three 0..255 ints; anything else raises :class:`DataError`."""
    text = text.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            rgb = tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))
        else:
            rgb = tuple(int(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise DataError(f"{source}: {text!r} is not a colour (expected r,g,b with values 0..255 or #rrggbb)")
    return rgb  # type: ignore[return-value]


def class_names_with_background(names: Sequence[str], source: Any) -> tuple[list[str], dict[str, int]]:
    """Class names with background at 0, and name -> index (ignore names -> 255).

    A background name (``background``, ``_background_``) anywhere in ``names`` becomes class 0
    (named ``background``); otherwise ``background`` is added in front. ``__ignore__`` takes no index.
    """
    classes = ["background"]
    index: dict[str, int] = {}
    for name in names:
        if name in IGNORE_NAMES:
            index[name] = IGNORE_INDEX
        elif name.lower() in BACKGROUND_NAMES:
            index[name] = 0
        elif name not in index:
            index[name] = len(classes)
            classes.append(name)
    for name in BACKGROUND_NAMES:
        index.setdefault(name, 0)
    for name in IGNORE_NAMES:
        index.setdefault(name, IGNORE_INDEX)
    if len(classes) > 255:
        raise DataError(f"{source}: {len(classes)} classes (with background) do not fit 8-bit labels (255 at most)")
    return classes, index


def colours_to_label(rgb: np.ndarray, table: dict[tuple[int, int, int], int], source: Any) -> np.ndarray:
    """An ``[H, W, 3]`` colour mask as class indices via ``table`` (colour -> index); unknown colours are errors."""
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    values, inverse = np.unique(keys.ravel(), return_inverse=True)
    lookup = np.empty(len(values), dtype=np.uint8)
    for n, key in enumerate(values.tolist()):
        colour = (key >> 16, (key >> 8) & 255, key & 255)
        if colour not in table:
            count = int((inverse == n).sum())
            raise DataError(
                f"{source}: colour {colour[0]},{colour[1]},{colour[2]} ({count} pixels) is not in the colour table"
            )
        lookup[n] = table[colour]
    return lookup[inverse].reshape(keys.shape)


def palette_for(classes: Sequence[str], colours: dict[int, tuple[int, int, int]]) -> list[list[int]]:
    """One ``[r, g, b]`` per class: the given colour, else the VOC colour map's."""
    default = voc_colormap(len(classes))
    return [list(colours.get(i, default[i])) for i in range(len(classes))]
