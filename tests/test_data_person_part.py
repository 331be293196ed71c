"""prepare-data person-part: the merge rule on real Pascal-Part files, splits, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import box, fixtures_dir, run_cli, tree_bytes, write_pascal_part_mat
from PIL import Image

from msattn.data.prepare.person_part import (
    CLASSES,
    PART_TO_CLASS,
    load_pascal_part,
    person_part_label,
    prepare_person_part,
)
from msattn.errors import DataError

PERSON_IDS = ["2008_000652", "2008_000700", "2008_000726", "2008_000939",
              "2008_003228", "2009_001103", "2010_002526", "2010_005243"]  # fmt: skip
TRAIN_WITH_PERSON = ["2008_000726", "2009_001103"]  # in the shipped train list
VAL_WITH_PERSON = ["2008_000652", "2008_000700", "2008_000939", "2008_003228", "2010_002526", "2010_005243"]


def _only_part_pixels(objects: list[dict], name: str) -> np.ndarray:
    """Pixels covered by the part ``name`` of some person and by no other person part at all."""
    persons = [o for o in objects if o["class_ind"] == 15]
    count = sum(m.astype(int) for p in persons for _, m in p["parts"])
    named = sum(m.astype(int) for p in persons for n, m in p["parts"] if n == name)
    return (named > 0) & (count == 1)


def test_real_annotation_parts_map_to_the_published_classes() -> None:
    objects = load_pascal_part(fixtures_dir() / "pascal_part" / "Annotations_Part" / "2008_000700.mat")
    label = person_part_label(objects)
    assert label is not None and label.dtype == np.uint8
    for part, expected in [("lhand", "lower_arms"), ("neck", "torso"), ("hair", "head"), ("luarm", "upper_arms"),
                           ("lfoot", "lower_legs"), ("luleg", "upper_legs"), ("torso", "torso")]:  # fmt: skip
        only = _only_part_pixels(objects, part)
        assert only.sum() > 0, f"fixture has no pixel covered only by {part}"
        assert np.all(label[only] == CLASSES.index(expected)), part
    person = objects[0]["mask"].astype(bool)
    any_part = np.any([m.astype(bool) for _, m in objects[0]["parts"]], axis=0)
    assert (person & ~any_part).sum() > 0
    assert np.all(label[person & ~any_part] == 0)  # person pixels with no part are background
    assert np.all(label[~person] == 0)


def test_real_non_person_and_table_files() -> None:
    root = fixtures_dir() / "pascal_part" / "Annotations_Part"
    assert person_part_label(load_pascal_part(root / "2008_001978.mat")) is None  # one bird, bare struct
    assert person_part_label(load_pascal_part(root / "2010_001199.mat")) is None  # chairs and a 'table'
    # a person next to objects without parts (0x0) and with a single part (bare struct)
    label = person_part_label(load_pascal_part(root / "2010_002526.mat"))
    assert label is not None and set(np.unique(label)) <= set(range(7)) and label.max() > 0


def test_parts_and_persons_paint_in_file_order(tmp_path: Path) -> None:
    h, w = 8, 10
    torso, hand = box(h, w, 0, 4, 0, 5), box(h, w, 2, 6, 0, 3)
    person = {"class": "person", "class_ind": 15, "mask": box(h, w, 0, 8, 0, 6)}
    write_pascal_part_mat(tmp_path / "a.mat", [{**person, "parts": [("torso", torso), ("lhand", hand)]}])
    write_pascal_part_mat(tmp_path / "b.mat", [{**person, "parts": [("lhand", hand), ("torso", torso)]}])
    later_person = {**person, "parts": [("ruleg", box(h, w, 3, 4, 0, 10))]}
    write_pascal_part_mat(tmp_path / "c.mat", [{**person, "parts": [("torso", torso)]}, later_person,
                                              {"class": "table", "class_ind": 11, "mask": box(h, w, 0, 8, 0, 10), "parts": []}])  # fmt: skip
    a = person_part_label(load_pascal_part(tmp_path / "a.mat"))
    b = person_part_label(load_pascal_part(tmp_path / "b.mat"))
    c = person_part_label(load_pascal_part(tmp_path / "c.mat"))
    assert a[3, 1] == PART_TO_CLASS["lhand"] == 4  # hand painted after torso wins
    assert b[3, 1] == PART_TO_CLASS["torso"] == 2  # torso painted after hand wins
    assert a[0, 0] == b[0, 0] == 2 and a[5, 1] == b[5, 1] == 4 and a[7, 0] == 0  # person pixel without part
    assert c[3, 1] == 5 and c[3, 8] == 5 and c[0, 0] == 2  # the later person overwrites the earlier one


def test_unknown_person_part_is_an_error(tmp_path: Path) -> None:
    write_pascal_part_mat(tmp_path / "x.mat", [{"class": "person", "class_ind": 15, "mask": box(4, 4, 0, 4, 0, 4),
                                                "parts": [("wing", box(4, 4, 0, 2, 0, 2))]}])  # fmt: skip
    with pytest.raises(DataError, match="x.mat.*wing"):
        person_part_label(load_pascal_part(tmp_path / "x.mat"), tmp_path / "x.mat")


def test_cli_prepares_the_fixtures_with_the_shipped_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = fixtures_dir() / "pascal_part"
    out = tmp_path / "pp"
    code, stdout, stderr = run_cli(capsys, "prepare-data", "person-part", "--source", source, "--out", out, "--workers", "0")
    assert code == 0, stderr
    assert (out / "train.txt").read_text().split() == TRAIN_WITH_PERSON
    assert (out / "val.txt").read_text().split() == VAL_WITH_PERSON
    assert sorted(p.stem for p in (out / "labels").iterdir()) == PERSON_IDS
    assert sorted(p.stem for p in (out / "images").iterdir()) == PERSON_IDS
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "person_part" and info["classes"] == list(CLASSES)
    assert info["counts"] == {"train": 2, "val": 6} and info["ignore_index"] == 255
    assert len(info["palette"]) == 7 and info["msattn_version"]
    assert "3539 id(s)" in stderr  # listed ids absent from the source are counted, not fatal
    report = json.loads((out / "prepare_report.json").read_text())
    assert len(report["missing"]) == 3539 and not report["errors"]

    label = Image.open(out / "labels" / "2008_000700.png")
    assert label.mode == "P"
    expected = person_part_label(load_pascal_part(source / "Annotations_Part" / "2008_000700.mat"))
    assert np.array_equal(np.array(label), expected)
    assert (out / "images" / "2008_000700.jpg").read_bytes() == (source / "JPEGImages" / "2008_000700.jpg").read_bytes()


def test_non_person_images_are_skipped_and_reported(tmp_path: Path) -> None:
    source = fixtures_dir() / "pascal_part"
    out = tmp_path / "pp"
    summary = prepare_person_part(source, out, workers=0, train_ids=["2008_001978", "2008_000726"],
                                  val_ids=["2010_000145", "2008_000652", "2099_000001"])  # fmt: skip
    assert summary.counts == {"train": 1, "val": 1}
    assert {r.id for r in summary.skipped} == {"2008_001978", "2010_000145"}
    assert [r.id for r in summary.missing] == ["2099_000001"]
    assert not (out / "labels" / "2008_001978.png").exists() and not (out / "images" / "2010_000145.jpg").exists()
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["skipped"]["train/2008_001978"] == "no person in the annotation"


def test_interrupted_run_resumes_to_identical_output(tmp_path: Path) -> None:
    source = fixtures_dir() / "pascal_part"
    ids = dict(train_ids=TRAIN_WITH_PERSON, val_ids=VAL_WITH_PERSON[:3])
    out = tmp_path / "pp"
    prepare_person_part(source, out, workers=0, **ids)
    before = tree_bytes(out)
    (out / "labels" / "2008_000652.png").unlink()
    (out / "images" / "2009_001103.jpg").unlink()
    (out / "dataset.json").unlink()
    leftover = out / "labels" / ".tmp-2008_000939.png.abc123"
    leftover.write_bytes(b"half a png")
    summary = prepare_person_part(source, out, workers=0, **ids)
    assert summary.written == 2 and summary.already_done == 3
    assert not leftover.exists()
    assert tree_bytes(out) == before


def _copy_source(tmp_path: Path, ids: list[str]) -> Path:
    src = fixtures_dir() / "pascal_part"
    dst = tmp_path / "src"
    for sub, suffix in (("Annotations_Part", ".mat"), ("JPEGImages", ".jpg")):
        (dst / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(src / sub / f"{i}{suffix}", dst / sub / f"{i}{suffix}")
    return dst


def test_corrupt_files_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _copy_source(tmp_path, TRAIN_WITH_PERSON + ["2008_000652"])
    (source / "Annotations_Part" / "2009_001103.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage" * 10)
    jpg = source / "JPEGImages" / "2008_000652.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated JPEG
    out = tmp_path / "pp"
    code, _, stderr = run_cli(capsys, "prepare-data", "person-part", "--source", source, "--out", out, "-j", "0")
    assert code == 0, stderr
    assert (out / "train.txt").read_text().split() == ["2008_000726"]
    assert (out / "val.txt").read_text().split() == []
    assert "2009_001103.mat" in stderr and "2008_000652.jpg" in stderr
    assert "Traceback" not in stderr


def test_nothing_usable_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _copy_source(tmp_path, ["2008_000726"])
    (source / "Annotations_Part" / "2008_000726.mat").write_bytes(b"not a mat file")
    code, _, stderr = run_cli(capsys, "prepare-data", "person-part", "--source", source, "--out", tmp_path / "o", "-j", "0")
    assert code == 2
    error_lines = [line for line in stderr.splitlines() if line.startswith("msattn: error:")]
    assert len(error_lines) == 1 and "nothing usable" in error_lines[0] and "2008_000726.mat" in error_lines[0]
    assert not (tmp_path / "o" / "dataset.json").exists()
    assert "Traceback" not in stderr


def test_missing_source_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run_cli(capsys, "prepare-data", "person-part", "--source", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2
    assert stderr.strip().splitlines() == [f"msattn: error: {tmp_path / 'nope' / 'Annotations_Part'}: folder not found "
                                           "(--source must hold Annotations_Part/ and JPEGImages/)"]  # fmt: skip
