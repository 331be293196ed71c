"""Builders shared by the tests of the importers of users' data (prepare-data coco-json, labelme, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from _data_helpers import pattern_image
from PIL import Image


def write_image(path: Path, height: int, width: int, seed: int = 0, orientation: int | None = None) -> np.ndarray:
    """A pattern image in the format of ``path``'s suffix (JPEG with an optional EXIF orientation); its pixels."""
    array = pattern_image(height, width, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, quality=95, exif=exif)
    else:
        img.save(path, **({"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
    return array


def read_label(path: Path) -> np.ndarray:
    """A written label: must be an 8-bit palette PNG; its indices."""
    img = Image.open(path)
    assert img.format == "PNG" and img.mode == "P", (img.format, img.mode)
    return np.array(img)


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a bool mask (as a JSON-ready dict)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def one_line_error(stderr: str, *needles: str) -> None:
    """``stderr`` ends with one ``msattn: error:`` line holding every needle, and has no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("msattn: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr[-800:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
