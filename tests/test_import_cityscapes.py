"""prepare-data cityscapes: labelIds -> 19 train ids, official splits, the polygons fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import run_cli
from _import_helpers import one_line_error, read_label, write_image, write_json
from PIL import Image

from msattn.data.prepare.cityscapes import CLASSES, train_id_table

H, W = 16, 32


def _label_ids() -> np.ndarray:
    ids = np.zeros((H, W), dtype=np.uint8)  # unlabeled
    ids[0:4] = 23  # sky -> 10
    ids[4:8] = 11  # building -> 2
    ids[8:12, :16] = 26  # car -> 13
    ids[8:12, 16:] = 9  # parking -> 255
    ids[12:] = 7  # road -> 0
    ids[12:, 30:] = 33  # bicycle -> 18
    return ids


@pytest.fixture()
def cityscapes(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for split, city, frame in (("train", "aachen", "000000_000019"), ("train", "bochum", "000001_000019"),
                               ("val", "frankfurt", "000000_000294"), ("test", "berlin", "000000_000019")):  # fmt: skip
        stem = f"{city}_{frame}"
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", H, W, len(stem))
        if city != "bochum":
            gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_label_ids()).save(gt)
    polygons = {"imgHeight": H, "imgWidth": W, "objects": [
        {"label": "road", "polygon": [[0, 8], [32, 8], [32, 16], [0, 16]]},
        {"label": "cargroup", "polygon": [[4, 10], [12, 10], [12, 14], [4, 14]]},  # -> car, on top of the road
        {"label": "person", "polygon": [[20, 0], [24, 0], [24, 4], [20, 4]], "deleted": 1},
        {"label": "out of roi", "polygon": [[0, 14], [32, 14], [32, 16], [0, 16]]},  # -> 255, last: on top
    ]}  # fmt: skip
    write_json(root / "gtFine" / "train" / "bochum" / "bochum_000001_000019_gtFine_polygons.json", polygons)
    return root


def test_train_ids_splits_and_polygons(cityscapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "cityscapes", "--source", cityscapes, "--out", out, "-j", "0")
    assert code == 0, stderr
    expected = np.full((H, W), 255, dtype=np.uint8)
    expected[0:4], expected[4:8], expected[8:12, :16], expected[12:], expected[12:, 30:] = 10, 2, 13, 0, 18
    assert np.array_equal(read_label(out / "labels" / "aachen_000000_000019.png"), expected)
    assert np.array_equal(read_label(out / "labels" / "frankfurt_000000_000294.png"), expected)
    from_polygons = np.full((H, W), 255, dtype=np.uint8)
    from_polygons[8:14] = 0
    from_polygons[10:14, 4:12] = 13
    assert np.array_equal(read_label(out / "labels" / "bochum_000001_000019.png"), from_polygons)
    assert (out / "train.txt").read_text().split() == ["aachen_000000_000019", "bochum_000001_000019"]
    assert (out / "val.txt").read_text().split() == ["frankfurt_000000_000294"]
    assert not (out / "test.txt").exists()
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == list(CLASSES) and len(CLASSES) == 19 and CLASSES[0] == "road" and CLASSES[18] == "bicycle"
    assert info["palette"][0] == [128, 64, 128] and info["palette"][13] == [0, 0, 142]
    assert Image.open(out / "images" / "aachen_000000_000019.jpg").format == "JPEG"
    assert "rasterised from _gtFine_polygons.json" in stderr


def test_label_table() -> None:
    table = train_id_table()
    evaluated = {int(i): int(t) for i, t in enumerate(table) if t != 255}
    assert evaluated == {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                         26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip


def test_unknown_polygon_label_is_an_error_naming_the_file(cityscapes: Path, tmp_path: Path) -> None:
    from msattn.data.prepare.cityscapes import prepare_cityscapes

    path = cityscapes / "gtFine" / "train" / "bochum" / "bochum_000001_000019_gtFine_polygons.json"
    write_json(path, {"imgHeight": H, "imgWidth": W, "objects": [{"label": "spaceship", "polygon": [[0, 0], [1, 0], [1, 1]]}]})
    summary = prepare_cityscapes(cityscapes, tmp_path / "out", workers=0)
    assert len(summary.errors) == 1 and str(path) in summary.errors[0].message and "spaceship" in summary.errors[0].message


def test_a_val_only_source_imports_val_and_warns_once_about_train(
    cityscapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 26: a folder holding only val (a toolkit's test fixture, a val download) is imported.

    The convention of every prepare-data command stays: ``train.txt`` and ``val.txt`` are always
    written, so the missing split is an empty ``train.txt`` (and ``counts["train"] == 0``).
    """
    for top in ("leftImg8bit", "gtFine"):
        shutil.rmtree(cityscapes / top / "train")
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "cityscapes", "--source", cityscapes, "--out", out, "-j", "0")
    assert code == 0, stderr
    assert (out / "val.txt").read_text().split() == ["frankfurt_000000_000294"]
    assert (out / "train.txt").read_text() == ""
    assert json.loads((out / "dataset.json").read_text())["counts"] == {"train": 0, "val": 1}
    missing = [line for line in stderr.splitlines() if "leftImg8bit/train" in line]
    assert len(missing) == 1 and missing[0].startswith("warning:"), stderr
    assert "Traceback" not in stderr
    report = json.loads((out / "prepare_report.json").read_text())
    assert any("leftImg8bit/train" in warning for warning in report["warnings"])


@pytest.mark.parametrize("removed", [("leftImg8bit/train", "leftImg8bit/val"), ("leftImg8bit",)])
def test_a_source_without_train_or_val_is_one_error_naming_the_folder(
    removed: tuple[str, ...], cityscapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in removed:  # only leftImg8bit/test (no public labels) is left, or no leftImg8bit/ at all
        shutil.rmtree(cityscapes / folder)
    code, _, stderr = run_cli(capsys, "prepare-data", "cityscapes", "--source", cityscapes, "--out", tmp_path / "out")
    assert code != 0
    one_line_error(stderr, f"{cityscapes / 'leftImg8bit'}:", "train/", "val/")
