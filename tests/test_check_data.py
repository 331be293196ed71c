"""check-data: every error and suspicious case through the real CLI (exit 1 on errors, 0 with warnings), the API."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import pattern_image, run_cli, write_palette_png
from _import_helpers import one_line_error, write_image
from PIL import Image

from msattn.data.check import check_dataset, label_problems
from msattn.data.palette import voc_colormap

H, W = 40, 48
CLASSES = ["background", "cat", "dog"]


def _label(n: int, classes: tuple[int, ...] = (1, 2)) -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    for k, cls in enumerate(classes):
        label[4 + 10 * k : 10 + 10 * k, n : n + 8] = cls
        label[30:34, 2 + 12 * k : 6 + 12 * k] = cls  # a second, small object of each class
    label[0, :] = 255
    return label


def make_dataset(root: Path, splits: dict[str, list[str]] | None = None) -> Path:
    """A clean dataset folder: 4 train and 2 val pairs, both classes everywhere."""
    splits = splits or {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1"]}
    for split, ids in splits.items():
        for n, item_id in enumerate(ids):
            write_image(root / "images" / f"{item_id}.jpg", H, W, seed=hash(item_id) % 1000)
            write_palette_png(root / "labels" / f"{item_id}.png", _label(n))
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"name": "mine", "classes": CLASSES, "ignore_index": 255, "palette": voc_colormap(len(CLASSES))}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_clean_dataset_passes_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "data")
    code, out, err = run_cli(capsys, "check-data", root, "--report", tmp_path / "report", "--json", tmp_path / "c.json",
                             "-j", "0")  # fmt: skip
    assert code == 0, err
    assert "0 error(s), 0 warning(s) in 6 image(s)" in out
    assert "classes" in out and "48x40 (6)" in out and "objects (connected components" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["ok"] and data["checked"] == {"train": 4, "val": 2}
    assert data["class_images"]["train"] == [4, 4, 4]
    assert data["class_pixels"]["val"][1] == 2 * (6 * 8 + 16)
    cat_objects = data["object_sizes"]["per_class"][1]
    assert sum(cat_objects) == 12 and cat_objects[4] == 6 and cat_objects[5] == 6  # 16 px -> bin 4, 48 px -> bin 5
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<script" not in page
    png = base64.b64decode(page.split("data:image/png;base64,")[1].split("'")[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "report.json").read_text())["ok"]


def _codes(report) -> dict[str, str]:
    return {f.code: f.level for f in report.findings}


def test_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "data")
    bad = _label(0)
    bad[5, 5] = 7
    write_palette_png(root / "labels" / "t0.png", bad)  # value 7 with 3 classes
    write_palette_png(root / "labels" / "t1.png", _label(1)[:, :40])  # size mismatch
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(root / "labels" / "t2.png")  # RGB label
    (root / "labels" / "v1.png").unlink()  # missing label
    Image.fromarray(_label(0)).save(root / "labels" / "t3.png", format="JPEG")  # a JPEG under .png
    code, out, err = run_cli(capsys, "check-data", root, "-j", "0")
    assert code == 1
    one_line_error(err, "error(s)", str(root))
    for code_name in ("values-out-of-range", "size-mismatch", "label-rgb", "missing-label", "label-not-png"):
        assert code_name in out
    report = check_dataset(root)
    assert {c for c, level in _codes(report).items() if level == "error"} == {
        "values-out-of-range", "size-mismatch", "label-rgb", "missing-label", "label-not-png"}  # fmt: skip
    assert not report.ok


def test_warnings_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "data", {"train": ["t0", "t1", "t2", "t3", "t4"], "val": ["v0", "v1", "t4"]})
    (root / "train.txt").write_text("t0\nt1\nt2\nt3\nt4\nt1\n")  # duplicate id
    for item_id in ("t0", "t1", "t2", "t3"):  # no dog in train: class in val but not in train
        write_palette_png(root / "labels" / f"{item_id}.png", _label(0, classes=(1,)))
    binary = np.zeros((H, W), dtype=np.uint8)
    binary[10:20, 10:20] = 255
    write_palette_png(root / "labels" / "t4.png", binary)  # only 0 and 255 with 3 classes
    (root / "images" / "v1.jpg").write_bytes((root / "images" / "t0.jpg").read_bytes())  # same image in train and val
    write_image(root / "images" / "v0.jpg", H, W, 5, orientation=3)  # EXIF-rotated (180 degrees)
    Image.fromarray(_label(0)).save(root / "labels" / "v1.png")  # grey, no palette
    write_palette_png(root / "labels" / "t3.png", _label(0, classes=(1,)), palette=[(v * 7) % 256 for v in range(768)])
    code, out, err = run_cli(capsys, "check-data", root, "-j", "0")
    assert code == 0, err
    report = check_dataset(root)
    assert report.ok and not report.errors
    codes = _codes(report)
    for name in ("duplicate-id", "id-in-two-splits", "binary-mask", "duplicate-content", "exif-rotated",
                 "label-no-palette", "palette-differs", "class-val-not-train"):  # fmt: skip
        assert codes.get(name) == "warning", (name, codes)
        assert name in out
    assert "0 error(s)" in out


def test_class_never_present_tiny_huge_and_sample(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    info = json.loads((root / "dataset.json").read_text())
    info["classes"].append("bird")
    info["palette"] = voc_colormap(4)
    (root / "dataset.json").write_text(json.dumps(info))
    Image.fromarray(pattern_image(8, 4100)).save(root / "images" / "t3.jpg")
    write_palette_png(root / "labels" / "t3.png", np.zeros((8, 4100), dtype=np.uint8))
    report = check_dataset(root)
    codes = _codes(report)
    assert codes["class-never-present"] == "warning" and "bird" in str(report.findings)
    assert codes["tiny-image"] == codes["huge-image"] == "warning"
    sampled = check_dataset(root, sample=2, num_classes=4)
    assert sampled.checked == {"train": 2, "val": 2} and sampled.sampled
    assert "class-never-present" not in _codes(sampled)
    again = check_dataset(root, sample=2, num_classes=4)
    assert again.to_dict()["class_pixels"] == sampled.to_dict()["class_pixels"]


def test_label_problems() -> None:
    assert label_problems(np.array([0, 1, 255]), 3) == []
    (problem,) = label_problems(np.array([0, 3, 9]), 3)
    assert problem.level == "error" and "3, 9" in problem.message
    (problem,) = label_problems(np.array([[0, 255], [255, 0]]), 5)
    assert problem.code == "binary-mask" and problem.level == "warning"
    assert label_problems(np.array([0, 255]), 2)[0].code == "binary-mask"  # the classic 0/255 binary mask
    assert label_problems(np.array([255]), 3)[0].code == "all-ignore"


def test_missing_lists_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "data")
    (root / "val.txt").write_text("")
    (root / "train.txt").write_text("t0\n../etc\n")
    report = check_dataset(root)
    assert _codes(report)["empty-list"] == "error" and _codes(report)["bad-id"] == "error"
    code, _, err = run_cli(capsys, "check-data", tmp_path / "nowhere")
    assert code == 2
    one_line_error(err, "dataset folder not found")


def test_report_without_matplotlib(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    root = make_dataset(tmp_path / "data")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(capsys, "check-data", root, "--report", tmp_path / "r")
    assert code == 1
    one_line_error(err, 'pip install "msattn[report]"')
    assert not (tmp_path / "r").exists()
