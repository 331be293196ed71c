"""prepare-data coco: seeded subsets, category mapping, overlaps, multi-polygons, crowd regions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import coco_images, rect_polygon, run_cli, tree_bytes, write_coco
from _import_helpers import uncompressed_rle
from PIL import Image

from msattn.data.prepare.coco import draw_subset, prepare_coco

TRAIN_IDS = [12, 3, 7, 1, 9, 5, 11, 2, 8, 4, 10, 6]  # deliberately unsorted in the JSON
VAL_IDS = [104, 101, 103, 102]
H, W = 20, 24


def _crowd_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[12:20, 14:24] = 1
    return mask


def _annotations() -> list[dict]:
    return [
        # the small object comes first in the file and has the lower id: it must still end up on top
        {"id": 21, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [rect_polygon(6, 6, 10, 10)]},
        {"id": 22, "image_id": 1, "category_id": 90, "iscrowd": 0, "segmentation": [rect_polygon(2, 2, 18, 16)]},
        {"id": 23, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [rect_polygon(0, 16, 4, 20), rect_polygon(20, 0, 24, 4)]},  # fmt: skip
        {"id": 24, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(_crowd_mask())},
        {"id": 25, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": [rect_polygon(0, 0, 24, 20)]},
    ]


def _expected_image_1() -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:16, 2:18] = 3  # toothbrush (id 90) -> 3
    label[6:10, 6:10] = 1  # person (id 1) -> 1, smaller so on top
    label[16:20, 0:4] = 2  # car (id 3) -> 2, both polygons
    label[0:4, 20:24] = 2
    label[12:20, 14:24] = 255  # crowd ...
    label[12:16, 14:18] = 3  # ... except where an instance covers it
    return label


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_coco(root, "train", coco_images("train", TRAIN_IDS, H, W), _annotations())
    val_anns = [{"id": 31, "image_id": 102, "category_id": 90, "iscrowd": 0, "segmentation": [rect_polygon(1, 1, 5, 5)]}]
    write_coco(root, "val", coco_images("val", VAL_IDS, H, W), val_anns)
    return root


def _label(out: Path, image_id: int, split: str = "train") -> np.ndarray:
    img = Image.open(out / "labels" / f"COCO_{split}2014_{image_id:012d}.png")
    assert img.mode == "P"
    return np.array(img)


def test_cli_coco_labels(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "coco", "--coco", coco, "--out", out, "--train-size", "12",
                              "--val-size", "4", "--workers", "0")  # fmt: skip
    assert code == 0, stderr
    assert np.array_equal(_label(out, 1), _expected_image_1())
    assert np.all(_label(out, 2) == 2)
    assert np.all(_label(out, 3) == 0)  # an image without annotations is all background
    val = _label(out, 102, "val")
    assert val[1:5, 1:5].tolist() == [[3] * 4] * 4 and val.sum() == 3 * 16
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["background", "person", "car", "toothbrush"]
    assert info["counts"] == {"train": 12, "val": 4}
    assert info["subset"]["train_image_ids"] == sorted(TRAIN_IDS)
    for split in ("train", "val"):
        data = (coco / "annotations" / f"instances_{split}2014.json").read_bytes()
        assert info["subset"]["annotations"][split]["sha256"] == hashlib.sha256(data).hexdigest()
    assert (out / "train.txt").read_text().split() == [f"COCO_train2014_{i:012d}" for i in sorted(TRAIN_IDS)]
    jpg = f"COCO_train2014_{1:012d}.jpg"
    assert (out / "images" / jpg).read_bytes() == (coco / "train2014" / jpg).read_bytes()


def test_seeded_subset_is_reproducible(coco: Path, tmp_path: Path) -> None:
    def chosen(seed: int, name: str) -> tuple[list[int], list[int]]:
        prepare_coco(coco, tmp_path / name, train_size=5, val_size=2, seed=seed, workers=0)
        subset = json.loads((tmp_path / name / "dataset.json").read_text())["subset"]
        return subset["train_image_ids"], subset["val_image_ids"]

    first, again, other = chosen(0, "a"), chosen(0, "b"), chosen(1, "c")
    assert first == again
    assert first != other
    assert len(first[0]) == 5 and len(set(first[0])) == 5 and set(first[0]) <= set(TRAIN_IDS)
    assert first[0] == sorted(first[0])
    # the documented draw: sorted ids, default_rng([seed, 0]).permutation, first N
    order = np.random.default_rng([0, 0]).permutation(len(TRAIN_IDS))[:5]
    assert first[0] == sorted(sorted(TRAIN_IDS)[i] for i in order)
    assert set(draw_subset(TRAIN_IDS, 5, 0, 0)) <= set(draw_subset(TRAIN_IDS, 8, 0, 0))  # bigger keeps smaller
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_other_settings_into_the_same_folder_are_refused(coco: Path, tmp_path: Path) -> None:
    from msattn.errors import DataError

    prepare_coco(coco, tmp_path / "out", train_size=5, val_size=2, seed=0, workers=0)
    with pytest.raises(DataError, match="other settings.*seed: 0 -> 1"):
        prepare_coco(coco, tmp_path / "out", train_size=5, val_size=2, seed=1, workers=0)


def test_missing_image_and_bad_segmentation_are_reported(coco: Path, tmp_path: Path) -> None:
    (coco / "train2014" / f"COCO_train2014_{5:012d}.jpg").unlink()
    path = coco / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 99, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": 42})
    path.write_text(json.dumps(data))
    summary = prepare_coco(coco, tmp_path / "out", train_size=12, val_size=4, seed=0, workers=0)
    assert [r.id for r in summary.missing] == [f"COCO_train2014_{5:012d}"]
    assert len(summary.errors) == 1 and "annotation 99" in summary.errors[0].message
    assert "instances_train2014.json" in summary.errors[0].message
    assert summary.counts == {"train": 10, "val": 4}


def test_corrupt_json_is_a_one_line_error(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = coco / "annotations" / "instances_val2014.json"
    path.write_text('{"images": [')
    code, _, stderr = run_cli(capsys, "prepare-data", "coco", "--coco", coco, "--out", tmp_path / "o", "-j", "0")
    assert code == 2
    assert stderr.startswith(f"msattn: error: {path}: not valid JSON") and len(stderr.strip().splitlines()) == 1


def test_too_few_images_uses_all_with_a_warning(coco: Path, tmp_path: Path) -> None:
    summary = prepare_coco(coco, tmp_path / "out", train_size=100, val_size=4, seed=3, workers=0)
    assert summary.counts == {"train": 12, "val": 4}
    assert any("fewer than the 100" in w for w in summary.warnings)
