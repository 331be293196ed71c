"""prepare-data voc: raw palette indices, SBD .mat labels, VOC-over-SBD, --sbd omitted, bad labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import fixtures_dir, pattern_image, run_cli, write_jpeg, write_palette_png, write_sbd_mat
from PIL import Image

from msattn.data.lists import shipped_ids
from msattn.data.prepare.voc import CLASSES, prepare_voc

H, W = 12, 16
TRAIN = shipped_ids("voc", "train_aug")[:3]
VAL = shipped_ids("voc", "val")[:2]


def _label(value: int, other: int = 0) -> np.ndarray:
    label = np.full((H, W), other, dtype=np.uint8)
    label[2:8, 3:11] = value
    label[0, :] = 255
    return label


@pytest.fixture()
def sources(tmp_path: Path) -> tuple[Path, Path]:
    """VOC: images for all ids, labels for TRAIN[0] and VAL; SBD: labels for TRAIN[0] and TRAIN[1]."""
    voc, sbd = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    for n, item_id in enumerate(TRAIN + VAL):
        write_jpeg(voc / "JPEGImages" / f"{item_id}.jpg", pattern_image(H, W, n))
    # a palette whose colours do not follow the indices: the output must keep the indices
    odd_palette = [v for i in range(256) for v in ((i * 7) % 256, (i * 13) % 256, 255 - i)]
    write_palette_png(voc / "SegmentationClass" / f"{TRAIN[0]}.png", _label(15), odd_palette)
    write_palette_png(voc / "SegmentationClass" / f"{VAL[0]}.png", _label(3, other=20))
    write_palette_png(voc / "SegmentationClass" / f"{VAL[1]}.png", _label(7))
    write_sbd_mat(sbd / "cls" / f"{TRAIN[0]}.mat", _label(9))  # loses against the VOC label
    write_sbd_mat(sbd / "cls" / f"{TRAIN[1]}.mat", _label(12))
    return voc, sbd


def _read(out: Path, item_id: str) -> np.ndarray:
    img = Image.open(out / "labels" / f"{item_id}.png")
    assert img.mode == "P"
    return np.array(img)


def test_cli_voc_with_sbd(sources: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    voc, sbd = sources
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "voc", "--voc", voc.parent, "--sbd", sbd.parent.parent,
                              "--out", out, "--workers", "0")  # fmt: skip
    assert code == 0, stderr
    assert (out / "train.txt").read_text().split() == TRAIN[:2]  # TRAIN[2] has no label anywhere
    assert (out / "val.txt").read_text().split() == VAL
    assert (out / "trainval.txt").read_text().split() == TRAIN[:2] + VAL  # Table 4: train_aug + val
    assert np.array_equal(_read(out, TRAIN[0]), _label(15))  # VOC wins, raw indices kept
    assert np.array_equal(_read(out, TRAIN[1]), _label(12))  # from SBD
    assert np.array_equal(_read(out, VAL[0]), _label(3, other=20))
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == list(CLASSES) and len(CLASSES) == 21
    assert info["counts"] == {"train": 2, "val": 2}
    assert info["palette"][15] == [192, 128, 128]  # VOC colour of person
    assert Image.open(out / "labels" / f"{VAL[0]}.png").getpalette()[3 * 255 : 3 * 256] == [224, 224, 192]
    missing = json.loads((out / "prepare_report.json").read_text())["missing"]
    assert f"train/{TRAIN[2]}" in missing and len(missing) == len(shipped_ids("voc", "train_aug")) - 2 + 1447


def test_without_sbd_trains_on_voc_train_only(sources: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    voc, _ = sources
    out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, "prepare-data", "voc", "--voc", voc, "--out", out, "-j", "0")
    assert code == 0, stderr
    assert "no --sbd" in stderr
    assert (out / "train.txt").read_text().split() == [TRAIN[0]]
    assert (out / "val.txt").read_text().split() == VAL
    assert json.loads((out / "dataset.json").read_text())["sources"]["sbd"] is None


def test_label_outside_the_class_range_is_reported(sources: tuple[Path, Path], tmp_path: Path) -> None:
    voc, sbd = sources
    write_palette_png(voc / "SegmentationClass" / f"{VAL[1]}.png", _label(30))
    rgb = voc / "SegmentationClass" / f"{TRAIN[0]}.png"
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(rgb)
    summary = prepare_voc(voc, tmp_path / "out", sbd=sbd, workers=0, train_ids=TRAIN, val_ids=VAL)
    assert summary.splits == {"train": [TRAIN[1]], "val": [VAL[0]]}
    messages = {r.id: r.message for r in summary.errors}
    assert f"{VAL[1]}.png" in messages[VAL[1]] and "30" in messages[VAL[1]]
    assert f"{TRAIN[0]}.png" in messages[TRAIN[0]] and "mode RGB" in messages[TRAIN[0]]
    assert not (tmp_path / "out" / "labels" / f"{VAL[1]}.png").exists()


def test_sbd_value_out_of_range(tmp_path: Path) -> None:
    voc, sbd = tmp_path / "voc", tmp_path / "sbd"
    for item_id in ("a", "b"):
        write_jpeg(voc / "JPEGImages" / f"{item_id}.jpg", pattern_image(H, W))
    (voc / "SegmentationClass").mkdir()
    write_sbd_mat(sbd / "cls" / "a.mat", _label(21))
    write_sbd_mat(sbd / "cls" / "b.mat", _label(4))
    summary = prepare_voc(voc, tmp_path / "out", sbd=sbd, workers=0, train_ids=["a"], val_ids=["b"])
    assert summary.counts == {"train": 0, "val": 1}
    assert "a.mat" in summary.errors[0].message and "21" in summary.errors[0].message


def test_real_voc_label_keeps_raw_indices(tmp_path: Path) -> None:
    voc = fixtures_dir() / "voc2012"  # SegmentationClassRaw/2007_000129.png, mode L: 0, 2, 15, 255
    out = tmp_path / "out"
    summary = prepare_voc(voc, out, workers=0)
    assert summary.splits == {"train": [], "val": ["2007_000129"]}
    raw = np.array(Image.open(voc / "SegmentationClassRaw" / "2007_000129.png"))
    got = _read(out, "2007_000129")
    assert np.array_equal(got, raw) and set(np.unique(got)) == {0, 2, 15, 255}
    assert any("train split is empty" in w for w in summary.warnings)


def test_missing_voc_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(capsys, "prepare-data", "voc", "--voc", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and stderr.startswith(f"msattn: error: {tmp_path / 'nope'}: folder not found")
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "VOC2012" / "SegmentationClass").mkdir()
    code, _, stderr = run_cli(capsys, "prepare-data", "voc", "--voc", tmp_path, "--sbd", tmp_path / "sbd", "--out", tmp_path / "o")
    assert code == 2 and "sbd: folder not found" in stderr and len(stderr.strip().splitlines()) == 1
