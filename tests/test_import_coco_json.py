"""prepare-data coco-json: any COCO instances file (polygons, RLE both ways, crowd), splits, EXIF, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import rect_polygon, run_cli, tree_bytes
from _import_helpers import compressed_rle, one_line_error, read_label, uncompressed_rle, write_image, write_json
from PIL import Image

from msattn.data.prepare.coco_json import prepare_coco_json
from msattn.errors import DataError, UsageError

H, W = 20, 24
CATEGORIES = [{"id": 9, "name": "bird"}, {"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}]  # -> cat 1, dog 2, bird 3


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _annotations() -> list[dict]:
    return [
        # a small cat given first (and with the lower id) still lies on the big dog
        {"id": 1, "image_id": 10, "category_id": 2, "iscrowd": 0, "segmentation": [rect_polygon(6, 6, 10, 10)]},
        {"id": 2, "image_id": 10, "category_id": 5, "iscrowd": 0, "segmentation": [rect_polygon(2, 2, 18, 16)]},
        {"id": 3, "image_id": 10, "category_id": 9, "iscrowd": 0, "segmentation": compressed_rle(_box(16, 20, 0, 4))},
        {"id": 4, "image_id": 10, "category_id": 2, "iscrowd": 1, "segmentation": uncompressed_rle(_box(12, 20, 14, 24))},
        {"id": 5, "image_id": 11, "category_id": 9, "iscrowd": 0, "segmentation": [rect_polygon(0, 0, 24, 20)]},
        {"id": 6, "image_id": 12, "category_id": 5, "iscrowd": 0, "bbox": [0, 0, 3, 3], "segmentation": []},
    ]


def _expected(crowd_as_class: bool) -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:16, 2:18] = 2  # dog
    label[6:10, 6:10] = 1  # cat, smaller, on top
    label[16:20, 0:4] = 3  # bird from compressed RLE
    if crowd_as_class:
        label[12:20, 14:24] = 1  # a cat crowd, smaller than the dog: on top
    else:
        label[_box(12, 20, 14, 24) & (label == 0)] = 255  # ignore where no instance
    return label


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    write_image(root / "images" / "a.jpg", H, W, 1)
    write_image(root / "images" / "sub" / "b.png", H, W, 2)  # PNG, in a sub-folder -> stored as JPEG
    write_image(root / "images" / "c.jpg", H, W, 3)
    write_image(root / "images" / "v.jpg", H, W, 4)
    images = [
        {"id": 10, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 11, "file_name": "sub/b.png", "width": W, "height": H},
        {"id": 12, "file_name": "/upload/1/c.jpg", "width": W, "height": H},  # absolute (Label Studio): bare name
    ]
    write_json(root / "train.json", {"images": images, "annotations": _annotations(), "categories": CATEGORIES})
    val = {"images": [{"id": 1, "file_name": "v.jpg", "width": W, "height": H}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 2, "segmentation": [rect_polygon(1, 1, 5, 5)]}],
           "categories": CATEGORIES}  # fmt: skip
    write_json(root / "val.json", val)
    return root


def _run(capsys, coco: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "prepare-data", "coco-json", "--annotations", coco / "train.json", "--images",
                   coco / "images", "--val-annotations", coco / "val.json", "--out", out, "-j", "0", *extra)  # fmt: skip


def test_labels_classes_and_lists(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, coco, out)
    assert code == 0, stderr
    assert np.array_equal(read_label(out / "labels" / "a.png"), _expected(False))
    assert np.all(read_label(out / "labels" / "b.png") == 3)
    assert np.all(read_label(out / "labels" / "c.png") == 0)  # only a box without segmentation
    val = read_label(out / "labels" / "v.png")
    assert val.sum() == 16 and np.all(val[1:5, 1:5] == 1)
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["background", "cat", "dog", "bird"]
    assert info["categories"]["class_of_category"] == {"2": 1, "5": 2, "9": 3}
    assert (out / "train.txt").read_text().split() == ["a", "b", "c"]
    assert (out / "val.txt").read_text().split() == ["v"]
    assert os.path.samefile(out / "images" / "a.jpg", coco / "images" / "a.jpg")  # JPEG: hard link
    png = Image.open(out / "images" / "b.jpg")
    assert png.format == "JPEG" and png.size == (W, H)
    report = json.loads((out / "prepare_report.json").read_text())
    assert any("without a segmentation" in w for w in report["warnings"])


def test_crowd_as_class(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _run(capsys, coco, out, "--crowd", "class")[0] == 0
    assert np.array_equal(read_label(out / "labels" / "a.png"), _expected(True))


def test_seeded_val_fraction_without_val_file(coco: Path, tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"p{i}.jpg", "width": W, "height": H} for i in range(10)]
    for i in range(10):
        write_image(coco / "many" / f"p{i}.jpg", H, W, i)
    write_json(coco / "many.json", {"images": images, "annotations": [], "categories": CATEGORIES})
    first = prepare_coco_json(coco / "many.json", coco / "many", tmp_path / "a", val_fraction=0.3, seed=4, workers=0)
    again = prepare_coco_json(coco / "many.json", coco / "many", tmp_path / "b", val_fraction=0.3, seed=4, workers=0)
    other = prepare_coco_json(coco / "many.json", coco / "many", tmp_path / "c", val_fraction=0.3, seed=5, workers=0)
    assert first.counts == {"train": 7, "val": 3} and first.splits == again.splits
    assert first.splits["val"] != other.splits["val"]
    ordered = sorted(f"p{i}" for i in range(10))
    expected = sorted(ordered[i] for i in np.random.default_rng([4, 2]).permutation(10)[:3])
    assert sorted(first.splits["val"]) == expected


def test_exif_rotated_image_is_stored_upright(coco: Path, tmp_path: Path) -> None:
    # stored 24 high x 20 wide with orientation 6 (turn 90 degrees clockwise to view): displayed 24 wide x 20 high
    write_image(coco / "rot" / "r.jpg", W, H, 7, orientation=6)
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [rect_polygon(0, 0, 6, 20)]}]
    write_json(coco / "rot.json", {"images": [{"id": 1, "file_name": "r.jpg", "width": W, "height": H}],
                                   "annotations": anns, "categories": CATEGORIES})  # fmt: skip
    out = tmp_path / "out"
    prepare_coco_json(coco / "rot.json", coco / "rot", out, val_fraction=0.5, workers=0)
    stored = Image.open(out / "images" / "r.jpg")
    assert stored.size == (W, H) and stored.getexif().get(0x0112, 1) == 1
    assert not os.path.samefile(out / "images" / "r.jpg", coco / "rot" / "r.jpg")
    assert read_label(out / "labels" / "r.png").shape == (H, W)


def test_size_mismatch_names_both_files(coco: Path, tmp_path: Path) -> None:
    data = json.loads((coco / "train.json").read_text())
    data["images"][0]["width"] = 30
    write_json(coco / "train.json", data)
    summary = prepare_coco_json(coco / "train.json", coco / "images", tmp_path / "out", coco / "val.json", workers=0)
    assert [r.id for r in summary.errors] == ["a"]
    message = summary.errors[0].message
    assert "train.json" in message and str(coco / "images" / "a.jpg") in message and "30x20" in message
    assert summary.counts == {"train": 2, "val": 1}


def test_resume_and_refusals(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _run(capsys, coco, out)[0] == 0
    before = tree_bytes(out)
    (out / "labels" / "b.png").unlink()
    code, stdout, _ = _run(capsys, coco, out)
    assert code == 0 and tree_bytes(out) == before
    assert "coco-json" in stdout
    code, _, stderr = _run(capsys, coco, coco / "images" / "..")  # --out is the export folder itself
    assert code == 2
    one_line_error(stderr, "--images", "choose another --out")  # refused before any work (output_folder.check_sources)
    with pytest.raises(UsageError, match="--crowd"):
        prepare_coco_json(coco / "train.json", coco / "images", tmp_path / "x", crowd="maybe")


def test_bad_inputs_are_one_line_errors(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (coco / "val.json").write_text('{"images": [')
    code, _, stderr = _run(capsys, coco, tmp_path / "out")
    assert code == 2
    one_line_error(stderr, str(coco / "val.json"), "not valid JSON")
    data = json.loads((coco / "train.json").read_text())
    data["annotations"].append({"id": 99, "image_id": 11, "category_id": 77, "segmentation": [[0, 0, 1, 0, 1, 1]]})
    write_json(coco / "train.json", data)
    summary = prepare_coco_json(coco / "train.json", coco / "images", tmp_path / "o2", val_fraction=0.5, workers=0)
    assert any("category_id 77" in r.message and r.id == "b" for r in summary.errors)
    with pytest.raises(DataError, match="annotation file not found"):
        prepare_coco_json(coco / "nope.json", coco / "images", tmp_path / "o3")
