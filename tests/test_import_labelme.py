"""prepare-data labelme: shapes, embedded imageData, class lists (file and first-seen), ignored shapes, errors."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import run_cli, tree_bytes
from _import_helpers import one_line_error, read_label, write_image, write_json
from PIL import Image

from msattn.data.prepare.labelme import prepare_labelme

H, W = 20, 24


def _shape(label: str, points: list, kind: str | None = "polygon", **extra) -> dict:
    return {"label": label, "points": points, "group_id": None, "description": "", "shape_type": kind, "flags": {}, **extra}


def _labelme(image_path: str | None, shapes: list, image_data: str | None = None) -> dict:
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": image_data,
            "imageHeight": H, "imageWidth": W}  # fmt: skip


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    root = tmp_path / "labelme"
    write_image(root / "images" / "one.jpg", H, W, 1)
    shapes = [
        _shape("dog", [[2, 2], [18, 2], [18, 16], [2, 16]]),  # polygon
        _shape("cat", [[6, 6], [10, 10]], "rectangle"),  # on top of the dog: painted later
        _shape("cat", [[20, 15], [22, 15]], "circle"),  # centre (20, 15), radius 2
        _shape("dog", [[0, 0], [5, 5]], "line"),
        _shape("dog", [[1, 1]], "point"),
        _shape("__ignore__", [[0, 18], [4, 18], [4, 20], [0, 20]]),
    ]
    write_json(root / "ann" / "one.json", _labelme("../images/one.jpg", shapes))
    # two: the image only embedded; an old-style shape without shape_type; a mask shape
    patch = np.zeros((3, 4), dtype=np.uint8)
    patch[1:, 1:] = 255
    shapes = [_shape("bird", [[0, 0], [24, 0], [24, 4], [0, 4]], None),
              _shape("cat", [[10, 10], [13, 12]], "mask", mask=_png_base64(patch))]  # fmt: skip
    buffer = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    write_json(root / "ann" / "sub" / "two.json", _labelme("gone.jpg", shapes, base64.b64encode(buffer.getvalue()).decode()))
    for i in range(3):  # plain background images so that there is something to split
        write_image(root / "ann" / f"bg{i}.jpg", H, W, 10 + i)
        write_json(root / "ann" / f"bg{i}.json", _labelme(f"bg{i}.jpg", []))
    return root


def _expected_one(cat: int, dog: int) -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:16, 2:18] = dog
    label[6:10, 6:10] = cat
    yy, xx = np.mgrid[0:H, 0:W]
    label[(xx + 0.5 - 20) ** 2 + (yy + 0.5 - 15) ** 2 <= 4] = cat
    label[18:20, 0:4] = 255
    return label


def test_first_seen_classes_and_shapes(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "prepare-data", "labelme", "--source", source, "--out", out, "-j", "0",
                                   "--val-fraction", "0.4")  # fmt: skip
    assert code == 0, stderr
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["background", "dog", "cat", "bird"]  # files sorted by path, shapes in file order
    assert "classes (in first-seen order): background, dog, cat, bird" in stdout
    assert (out / "labels.txt").read_text().split() == ["__ignore__", "_background_", "dog", "cat", "bird"]
    assert np.array_equal(read_label(out / "labels" / "ann_one.png"), _expected_one(cat=2, dog=1))
    two = read_label(out / "labels" / "ann_sub_two.png")
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[0:4, :] = 3
    expected[11:13, 11:14] = 2  # the mask patch's set pixels, placed at (10, 10)
    assert np.array_equal(two, expected)
    assert np.all(np.asarray(Image.open(out / "images" / "ann_sub_two.jpg")).astype(int) - 90 <= 2)
    assert "line shapes (no area) ignored" in stderr and "point shapes (no area) ignored" in stderr
    ids = (out / "train.txt").read_text().split() + (out / "val.txt").read_text().split()
    assert sorted(ids) == ["ann_bg0", "ann_bg1", "ann_bg2", "ann_one", "ann_sub_two"]
    assert len((out / "val.txt").read_text().split()) == 2


def test_labels_file_order_and_unknown_label(source: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\ncat\ndog\nbird\n")
    summary = prepare_labelme(source, tmp_path / "out", labels=labels, workers=0)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["classes"] == ["background", "cat", "dog", "bird"] and not summary.errors
    assert np.array_equal(read_label(tmp_path / "out" / "labels" / "ann_one.png"), _expected_one(cat=1, dog=2))
    labels.write_text("cat\ndog\n")  # no bird: that file is an error naming it; background is added first
    summary = prepare_labelme(source, tmp_path / "out2", labels=labels, workers=0)
    assert [r.id for r in summary.errors] == ["ann_sub_two"] and "'bird' is not in the class list" in summary.errors[0].message
    assert json.loads((tmp_path / "out2" / "dataset.json").read_text())["classes"] == ["background", "cat", "dog"]


def test_resume_is_byte_identical(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_labelme(source, out, workers=0)
    before = tree_bytes(out)
    for path in (out / "labels").glob("ann_o*"):
        path.unlink()
    summary = prepare_labelme(source, out, workers=0)
    assert summary.written == 1 and summary.already_done == 4 and tree_bytes(out) == before


def test_bad_files(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (source / "ann" / "broken.json").write_text("{")
    data = json.loads((source / "ann" / "bg0.json").read_text())
    data["imageWidth"] = 99
    write_json(source / "ann" / "bg0.json", data)
    summary = prepare_labelme(source, tmp_path / "out", workers=0)
    errors = {r.id: r.message for r in summary.errors}
    assert "not valid JSON" in errors["ann_broken"] and str(source / "ann" / "broken.json") in errors["ann_broken"]
    assert "99x20" in errors["ann_bg0"] and str(source / "ann" / "bg0.jpg") in errors["ann_bg0"]
    code, _, stderr = run_cli(capsys, "prepare-data", "labelme", "--source", source, "--out", source / "out")
    assert code == 2
    one_line_error(stderr, "inside the input folder")
    code, _, stderr = run_cli(capsys, "prepare-data", "labelme", "--source", tmp_path / "none", "--out", tmp_path / "o")
    assert code == 2
    one_line_error(stderr, "folder not found")


@pytest.mark.slow
def test_three_commands_from_labelme_to_a_trained_model(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's three commands: prepare-data labelme, check-data, train the demo recipe on the result."""
    data, run = tmp_path / "data" / "mine", tmp_path / "runs" / "mine"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"
    assert run_cli(capsys, "prepare-data", "labelme", "--source", source, "--out", data, "-j", "0")[0] == 0
    code, out, err = run_cli(capsys, "check-data", data, "-j", "0")
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", recipe, "--set", f"data.root={data}", "--set", "data.auto_prepare=none",
                             "--set", "train.iterations=2", "--set", "train.checkpoint_every=2", "--set", "data.workers=0",
                             "--out", run)  # fmt: skip
    assert code == 0, err
    assert (run / "last.pt").is_file() and "labelme val" in out
    assert json.loads((run / "config.json").read_text())["data"]["root"] == str(data)


def test_pixel_limit_covers_embedded_images(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "--max-pixels", "100", "prepare-data", "labelme", "--source", source, "--out", out, "-j", "0")
    assert code == 2
    report = json.loads((out / "prepare_report.json").read_text())
    errors = {key.split("/", 1)[1]: message for key, message in report["errors"].items()}
    assert "the embedded image has 24x20 pixels, over the limit of 100" in errors["ann_sub_two"]
