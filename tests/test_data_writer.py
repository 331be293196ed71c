"""The one writer of a prepared item (``msattn.data.prepare.writer.write_item``), as every source uses it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import pattern_image
from _import_helpers import read_label
from PIL import Image

from msattn.data.prepare.common import MISSING, WRITTEN, Task
from msattn.data.prepare.writer import DecodedImage, StoredImage, Target, write_item
from msattn.errors import DataError

H, W = 12, 20
CLASSES = ("background", "thing", "other")


def _label(value: int = 1) -> np.ndarray:
    label = np.zeros((H, W), dtype=np.uint8)
    label[2:6, 3:9] = value
    return label


@pytest.fixture()
def target(tmp_path: Path) -> Target:
    return Target("test", tmp_path / "out", list(CLASSES), [[10, 20, 30], [40, 50, 60], [70, 80, 90]])


def test_a_stored_jpeg_is_checked_linked_and_its_label_written(target: Target, tmp_path: Path) -> None:
    jpg = tmp_path / "a.jpg"
    Image.fromarray(pattern_image(H, W, 1)).save(jpg, quality=95)
    result = write_item(target, Task("val", "a"), _label(), StoredImage(jpg), "a.png")
    assert (result.split, result.id, result.status) == ("val", "a", WRITTEN)
    assert os.path.samefile(jpg, target.out / "images" / "a.jpg")  # a hard link on one file system
    assert np.array_equal(read_label(target.out / "labels" / "a.png"), _label())
    assert Image.open(target.out / "labels" / "a.png").getpalette()[:6] == [10, 20, 30, 40, 50, 60]
    assert target.classes == CLASSES and target.palette == ((10, 20, 30), (40, 50, 60), (70, 80, 90))


def test_a_missing_stored_image_is_a_missing_result(target: Target, tmp_path: Path) -> None:
    result = write_item(target, Task("train", "gone"), _label(), StoredImage(tmp_path / "nowhere" / "gone.jpg"), "x")
    assert result.status == MISSING and str(tmp_path / "nowhere") in result.message
    assert not (target.out / "labels" / "gone.png").exists()


def test_decoded_pixels_become_a_jpeg_of_their_quality(target: Target) -> None:
    image = DecodedImage(Image.fromarray(pattern_image(H, W, 2)), "generated", quality=80)
    assert write_item(target, Task("train", "g"), _label(2), image, "generated").status == WRITTEN
    written = Image.open(target.out / "images" / "g.jpg")
    assert written.format == "JPEG" and written.size == (W, H)


@pytest.mark.parametrize(
    ("label", "image", "needles"),
    [
        (_label(3), (H, W), ("ann.png", "label values 3", "0..2")),  # a value past the classes
        (_label(), (H + 1, W), ("ann.png", "img.jpg", f"{W}x{H}", f"{W}x{H + 1}")),  # sizes differ
    ],
)
def test_bad_items_raise_one_line_naming_the_files(
    target: Target, label: np.ndarray, image: tuple[int, int], needles: tuple[str, ...]
) -> None:
    decoded = DecodedImage(Image.fromarray(pattern_image(*image, 3)), "img.jpg")
    with pytest.raises(DataError) as caught:
        write_item(target, Task("train", "bad"), label, decoded, "ann.png")
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message
    assert not (target.out / "labels" / "bad.png").exists() and not (target.out / "images" / "bad.jpg").exists()
