"""prepare-data masks: index masks (8/16-bit, palette), RGB colour masks, split folders, ignore values, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import run_cli, tree_bytes, write_palette_png
from _import_helpers import one_line_error, read_label, write_image, write_json
from PIL import Image

from msattn.data.prepare.masks import prepare_masks
from msattn.errors import DataError

H, W = 12, 16


def _index_label(n: int) -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:6, n : n + 4] = 1
    label[8:, :] = 2
    label[0, 0] = 255
    return label


def test_index_masks_any_image_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    formats = [".jpg", ".png", ".webp", ".bmp", ".tif"]
    masks.mkdir()
    for n, suffix in enumerate(formats):
        write_image(images / f"im{n}{suffix}", H, W, n)
        label = _index_label(n)
        if n == 1:  # a palette PNG whose palette is not the class order: indices count, not colours
            write_palette_png(masks / f"im{n}.png", label, palette=[(255 - v) % 256 for v in range(768)])
        else:
            Image.fromarray(label).save(masks / f"im{n}.png")
    write_image(images / "lonely.jpg", H, W, 9)  # no mask: reported missing
    Image.fromarray(_index_label(0)).save(masks / "orphan.png")  # no image
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "masks", "--images", images, "--masks", masks, "--out", out,
                              "-j", "0", "--val-fraction", "0.2", "--seed", "1")  # fmt: skip
    assert code == 0, stderr
    for n in range(len(formats)):
        assert np.array_equal(read_label(out / "labels" / f"im{n}.png"), _index_label(n))
        assert Image.open(out / "images" / f"im{n}.jpg").format == "JPEG"
    assert os.path.samefile(out / "images" / "im0.jpg", images / "im0.jpg")
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert len((out / "val.txt").read_text().split()) == 1 and len((out / "train.txt").read_text().split()) == 4
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["missing"] == {"train/lonely": f"no mask for {images / 'lonely.jpg'}"}
    assert report["notes"] == [str(masks / "orphan.png")]


def test_sixteen_bit_masks_with_value_table_and_split_folders(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    values = np.zeros((H, W), dtype=np.uint16)
    values[:4] = 1000
    values[4:8] = 2000
    values[8:, :2] = 9
    for split, names in (("train", ["t1", "t2"]), ("val", ["v1"]), ("test", ["x1"])):
        for name in names:
            write_image(images / split / f"{name}.jpg", H, W, len(name))
            (masks / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(values).save(masks / split / f"{name}_mask.png")  # mode I;16
    classes = write_json(tmp_path / "classes.json", {"classes": [
        {"name": "background", "value": 0}, {"name": "tumour", "value": 1000}, {"name": "vessel", "value": [2000]},
        {"name": "__ignore__", "value": 9}]})  # fmt: skip
    summary = prepare_masks(images, masks, tmp_path / "out", classes=classes, mask_suffix="_mask", workers=0)
    assert summary.counts == {"train": 2, "val": 1, "test": 1}
    assert (tmp_path / "out" / "test.txt").read_text().split() == ["x1"]
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[:4], expected[4:8], expected[8:, :2] = 1, 2, 255
    assert np.array_equal(read_label(tmp_path / "out" / "labels" / "v1.png"), expected)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["classes"] == ["background", "tumour", "vessel"] and info["counts"]["test"] == 1
    values[0, 0] = 3000
    Image.fromarray(values).save(masks / "val" / "v1_mask.png")
    summary = prepare_masks(images, masks, tmp_path / "out2", classes=classes, mask_suffix="_mask", workers=0)
    assert [r.id for r in summary.errors] == ["v1"] and "mask value 3000 is not listed in --classes" in summary.errors[0].message


def test_rgb_colour_masks(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    colours = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0)}
    for n in range(3):
        label = _index_label(n)
        rgb = np.zeros((H, W, 3), dtype=np.uint8)
        for index, colour in colours.items():
            rgb[label == index] = colour
        rgb[label == 255] = (255, 255, 255)
        write_image(images / f"c{n}.png", H, W, n)
        masks.mkdir(exist_ok=True)
        Image.fromarray(rgb).save(masks / f"c{n}.png")
    classes = write_json(tmp_path / "classes.json", [
        {"name": "background", "color": [0, 0, 0]}, {"name": "red", "color": "#ff0000"}, {"name": "green", "color": "0,255,0"},
        {"name": "__ignore__", "color": [255, 255, 255]}])  # fmt: skip
    prepare_masks(images, masks, tmp_path / "out", classes=classes, workers=0)
    for n in range(3):
        assert np.array_equal(read_label(tmp_path / "out" / "labels" / f"c{n}.png"), _index_label(n))
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["palette"] == [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    with pytest.raises(DataError, match="RGB colour mask; give the class colours"):
        prepare_masks(images, masks, tmp_path / "out2", workers=0)


def test_binary_masks_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for n in range(4):
        write_image(images / f"b{n}.jpg", H, W, n)
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[n : n + 3, 2:9] = 255
        masks.mkdir(exist_ok=True)
        Image.fromarray(mask).save(masks / f"b{n}.png")
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "masks", "--images", images, "--masks", masks, "--out", out)
    assert code == 2
    one_line_error(stderr, "only 0 and the ignore value 255", "--classes")
    classes = write_json(tmp_path / "classes.json", [{"name": "background", "value": 0}, {"name": "object", "value": 255}])
    prepare_masks(images, masks, out, classes=classes, workers=0)
    assert read_label(out / "labels" / "b1.png")[1:4, 2:9].tolist() == [[1] * 7] * 3
    before = tree_bytes(out)
    (out / "labels" / "b2.png").unlink()
    summary = prepare_masks(images, masks, out, classes=classes, workers=0)
    assert summary.written == 1 and tree_bytes(out) == before


def test_mask_size_and_jpeg_masks_are_errors_naming_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for n in range(3):
        write_image(images / f"s{n}.jpg", H, W, n)
    masks.mkdir()
    Image.fromarray(_index_label(0)).save(masks / "s0.png")
    Image.fromarray(_index_label(0)[:, :10]).save(masks / "s1.png")
    Image.fromarray(_index_label(0)).save(masks / "s2.jpg")
    summary = prepare_masks(images, masks, tmp_path / "out", workers=0)
    errors = {r.id: r.message for r in summary.errors}
    assert str(masks / "s1.png") in errors["s1"] and str(images / "s1.jpg") in errors["s1"] and "10x12" in errors["s1"]
    assert "JPEG mask" in errors["s2"]
    code, _, stderr = run_cli(capsys, "prepare-data", "masks", "--images", images, "--masks", masks, "--out", tmp_path)
    assert code == 2
    one_line_error(stderr, "--images", "choose another --out")  # refused before any work (output_folder.check_sources)
