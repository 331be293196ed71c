"""Helpers for the data tests: fixture lookup, the CLI runner and builders of tiny source folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# the copy in tests/fixtures (of the project's shared/fixtures), or wherever MSATTN_FIXTURES points
FIXTURES = Path(os.environ.get("MSATTN_FIXTURES") or Path(__file__).resolve().parent / "fixtures")
#: Set to 1 (CI does, in .ci/run) to fail instead of skip when the fixtures are missing.
REQUIRE_ENV = "MSATTN_REQUIRE_FIXTURES"


def fixtures_dir(root: Path | None = None) -> Path:
    """``tests/fixtures`` (or ``$MSATTN_FIXTURES``), else skip the test saying how to get them.

    With ``MSATTN_REQUIRE_FIXTURES=1`` a missing folder fails the test instead (CI).
    """
    root = FIXTURES if root is None else root
    if (root / "README.md").is_file():
        return root
    reason = (
        f"real-format fixtures not found at {root}: they are small samples of Pascal-Part, VOC 2012 and the id "
        "lists, in tests/fixtures of the repository (a copy of the project's shared/fixtures folder); restore "
        "that folder from git, or set MSATTN_FIXTURES=/path/to/fixtures, e.g. ../shared/fixtures (README, Tests)"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this a failure")
    pytest.skip(reason)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``msattn.cli.app.main(args)``; return ``(exit_code, stdout, stderr)``."""
    from msattn.cli.app import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def tree_bytes(
    root: Path, skip: tuple[str, ...] = ("prepare_report.json", ".msattn.lock", ".msattn.lock.json")
) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), for comparing two outputs (the lock's holder aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def pattern_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, JPEG-friendly uint8 RGB image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3)
    return np.clip(base + 30 * np.sin(xx[..., None] / 3.0) + 20 * np.cos(yy[..., None] / 4.0), 0, 255).astype(np.uint8)


def write_jpeg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def write_palette_png(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    """A VOC-style palette PNG whose indices are ``label``."""
    from PIL import Image

    from msattn.data.palette import flat_palette

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8))
    img.putpalette(palette if palette is not None else flat_palette())
    img.save(path)


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """An SBD ``cls/<id>.mat`` with a ``GTcls`` struct."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    gtcls = {
        "Boundaries": np.zeros((20, 1), dtype=object),
        "Segmentation": segmentation.astype(np.uint8),
        "CategoriesPresent": np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8),
    }
    scipy.io.savemat(str(path), {"GTcls": gtcls})


def write_pascal_part_mat(path: Path, objects: list[dict[str, Any]]) -> None:
    """A Pascal-Part ``anno`` struct: objects = [{"class", "class_ind", "mask", "parts": [(name, mask)]}]."""
    import scipy.io

    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    part_dtype = [("part_name", "O"), ("mask", "O")]
    objs = np.zeros((1, len(objects)), dtype=obj_dtype)
    for i, obj in enumerate(objects):
        parts = np.zeros((1, len(obj["parts"])), dtype=part_dtype) if obj["parts"] else np.zeros((0, 0))
        for j, (name, mask) in enumerate(obj["parts"]):
            parts[0, j]["part_name"] = name
            parts[0, j]["mask"] = mask.astype(np.uint8)
        objs[0, i]["class"] = obj["class"]
        objs[0, i]["class_ind"] = np.array([[obj["class_ind"]]], dtype=np.uint8)
        objs[0, i]["mask"] = obj["mask"].astype(np.uint8)
        objs[0, i]["parts"] = parts
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"anno": {"imname": path.stem, "objects": objs}})


def box(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rect_polygon(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A COCO polygon of the rectangle covering pixel columns x0..x1-1 and rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco(root: Path, split: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
               categories: list[dict[str, Any]] | None = None, write_images: bool = True) -> Path:
    """``root/annotations/instances_<split>2014.json`` and the JPEGs in ``root/<split>2014/``."""
    categories = categories or [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]
    folder = root / f"{split}2014"
    folder.mkdir(parents=True, exist_ok=True)
    if write_images:
        for img in images:
            write_jpeg(folder / img["file_name"], pattern_image(img["height"], img["width"], img["id"]))
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def coco_images(split: str, ids: list[int], height: int = 20, width: int = 24) -> list[dict[str, Any]]:
    return [
        {"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "height": height, "width": width} for i in ids
    ]


def photo(path: Path, height: int = 24, width: int = 32, seed: int = 0, **save: Any) -> Path:
    """A small patterned RGB image saved at ``path`` (format from the suffix; ``save``: PIL options)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern_image(height, width, seed)).save(path, **save)
    return path
