"""prepare-data cvat: 'CVAT for images 1.1' XML (z_order, boxes, rotation, RLE masks) and 'Segmentation mask 1.1'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import run_cli
from _import_helpers import one_line_error, read_label, write_image
from PIL import Image

from msattn.data.prepare.cvat import prepare_cvat

H, W = 20, 24

XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>7</id><name>streets</name><size>3</size><mode>annotation</mode>
      <labels>
        <label><name>road</name><color>#804080</color><type>any</type><attributes/></label>
        <label><name>car</name><color>#0000ff</color><type>any</type><attributes/></label>
        <label><name>sign</name><color>#dcdc00</color><type>any</type><attributes/></label>
      </labels>
    </task>
  </meta>
  <image id="0" name="a.jpg" width="24" height="20" subset="Train">
    <box label="car" source="manual" occluded="1" xtl="4" ytl="4" xbr="12" ybr="10" z_order="2"/>
    <polygon label="road" source="manual" occluded="0" points="0,0;24,0;24,20;0,20" z_order="0"/>
    <polygon label="sign" source="manual" occluded="0" points="8,6;16,6;16,14;8,14" z_order="1"/>
    <polyline label="road" source="manual" occluded="0" points="0,0;5,5" z_order="3"/>
    <tag label="car" source="manual"/>
  </image>
  <image id="1" name="sub/b.png" width="24" height="20" subset="Validation">
    <mask label="car" source="manual" occluded="0" rle="1, 2, 1, 2" left="3" top="5" width="3" height="2" z_order="0"/>
    <box label="sign" source="manual" occluded="0" xtl="9" ytl="2" xbr="15" ybr="4" rotation="90" z_order="0"/>
    <ellipse label="road" source="manual" occluded="0" cx="20" cy="15" rx="3" ry="2" z_order="0"/>
  </image>
  <image id="2" name="c.jpg" width="24" height="20" subset="Train"/>
</annotations>
"""


@pytest.fixture()
def xml_export(tmp_path: Path) -> Path:
    root = tmp_path / "cvat_xml"
    root.mkdir()
    (root / "annotations.xml").write_text(XML)
    write_image(root / "images" / "a.jpg", H, W, 1)
    write_image(root / "images" / "sub" / "b.png", H, W, 2)
    write_image(root / "images" / "c.jpg", H, W, 3)
    return root


def test_xml_export(xml_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "cvat", "--source", xml_export, "--out", out, "-j", "0")
    assert code == 0, stderr
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["background", "road", "car", "sign"]
    assert info["palette"][1:] == [[128, 64, 128], [0, 0, 255], [220, 220, 0]]
    a = read_label(out / "labels" / "a.png")
    expected = np.full((H, W), 1, dtype=np.uint8)  # road under everything (z_order 0)
    expected[6:14, 8:16] = 3  # sign, z_order 1
    expected[4:10, 4:12] = 2  # car, z_order 2, though first in the file
    assert np.array_equal(a, expected)
    assert Image.open(out / "labels" / "a.png").getpalette()[3:12] == [128, 64, 128, 0, 0, 255, 220, 220, 0]
    b = read_label(out / "labels" / "sub_b.png")
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[5, 4:6] = 2  # RLE over the 3x2 box at (3, 5): 0 1 1 / 0 1 1
    expected[6, 4:6] = 2
    expected[0:6, 11:13] = 3  # the 6x2 box turned 90 degrees about its centre (12, 3): 2 wide, 6 high
    yy, xx = np.mgrid[0:H, 0:W]
    expected[((xx + 0.5 - 20) / 3) ** 2 + ((yy + 0.5 - 15) / 2) ** 2 <= 1] = 1
    assert np.array_equal(b, expected)
    assert (out / "train.txt").read_text().split() == ["a", "c"] and (out / "val.txt").read_text().split() == ["sub_b"]
    assert "<polyline> shapes (no area) ignored" in stderr and "<tag> shapes" in stderr


def test_xml_errors(xml_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = XML.replace('rle="1, 2, 1, 2"', 'rle="1, 2"').replace('name="a.jpg" width="24"', 'name="a.jpg" width="30"')
    text = text.replace("</annotations>", '<image id="3" name="d.jpg" width="24" height="20"/></annotations>')
    (xml_export / "annotations.xml").write_text(text)
    summary = prepare_cvat(xml_export, tmp_path / "out", workers=0)
    errors = {r.id: r.message for r in summary.errors}
    assert "malformed <mask>" in errors["sub_b"] and "annotations.xml" in errors["sub_b"]
    assert "30x20" in errors["a"] and str(xml_export / "images" / "a.jpg") in errors["a"]
    assert [r.id for r in summary.missing] == ["d"] and summary.counts == {"train": 1, "val": 0}
    (xml_export / "annotations.xml").write_text("<annotations><image")
    code, _, stderr = run_cli(capsys, "prepare-data", "cvat", "--source", xml_export, "--out", tmp_path / "o2")
    assert code == 2
    one_line_error(stderr, "annotations.xml", "not valid XML")


def _colour_mask(path: Path, label: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> None:
    rgb = np.zeros((*label.shape, 3), dtype=np.uint8)
    for index, colour in colours.items():
        rgb[label == index] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_segmentation_mask_export(tmp_path: Path) -> None:
    root = tmp_path / "cvat_masks"
    root.mkdir()
    (root / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\ncar:0,0,255::\n"
    )
    colours = {0: (0, 0, 0), 1: (128, 64, 128), 2: (0, 0, 255)}
    labels = {}
    for n, name in enumerate(["f1", "f2", "f3", "f4"]):
        label = np.zeros((H, W), dtype=np.uint8)
        label[n : n + 5, :] = 1
        label[10:14, 2 * n : 2 * n + 6] = 2
        labels[name] = label
        _colour_mask(root / "SegmentationClass" / f"{name}.png", label, colours)
        write_image(root / "JPEGImages" / f"{name}.jpg", H, W, n)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "default.txt").write_text("f1\nf2\nf3\nf4\n")
    summary = prepare_cvat(root, tmp_path / "out", val_fraction=0.25, workers=0)
    assert summary.counts == {"train": 3, "val": 1} and not summary.errors
    for name, label in labels.items():
        assert np.array_equal(read_label(tmp_path / "out" / "labels" / f"{name}.png"), label)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["classes"] == ["background", "road", "car"] and info["palette"][2] == [0, 0, 255]
    bad = labels["f2"].copy()
    _colour_mask(root / "SegmentationClass" / "f2.png", bad, {**colours, 2: (1, 2, 3)})
    summary = prepare_cvat(root, tmp_path / "out2", val_fraction=0.25, workers=0)
    assert len(summary.errors) == 1 and "colour 1,2,3 (24 pixels) is not in the colour table" in summary.errors[0].message
    assert "f2.png" in summary.errors[0].message
