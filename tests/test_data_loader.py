"""SegmentationFolder, read_dataset_info, pad_collate and the shipped id lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import FIXTURES, write_palette_png
from PIL import Image

from msattn.data.datasets import SegmentationFolder, pad_collate
from msattn.data.info import read_dataset_info
from msattn.data.lists import lists_root, shipped_ids, shipped_list_path
from msattn.data.prepare.demo import prepare_demo
from msattn.data.transforms import EvalTransform, TrainTransform
from msattn.errors import DataError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "d"
    prepare_demo(root, num_train=4, num_val=2, image_size=32, seed=0, workers=0)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_items_hold_normalised_images_and_integer_labels(demo_root: Path) -> None:
    info = read_dataset_info(demo_root)
    assert info.name == "demo" and info.num_classes == 5 and info.ignore_index == 255 and info.root == demo_root
    data = SegmentationFolder(demo_root, "train")
    assert len(data) == 4 and data.ids[0] == "train_00000"
    item = data[1]
    assert item["id"] == "train_00001"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    png = np.array(Image.open(demo_root / "labels" / "train_00001.png"))
    assert torch.equal(item["label"], torch.from_numpy(png.astype(np.int64)))
    jpg = np.asarray(Image.open(demo_root / "images" / "train_00001.jpg").convert("RGB"), dtype=np.float32) / 255
    expected = (jpg[3, 4] - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(item["image"][:, 3, 4].numpy(), expected, atol=1e-5)


def test_epochs_reseed_the_augmentation_reproducibly(demo_root: Path) -> None:
    transform = TrainTransform(crop_size=24, scale_range=(0.5, 1.5), flip=True)
    data = SegmentationFolder(demo_root, "train", transform=transform, seed=3)
    first = data[0]["label"]
    assert torch.equal(first, data[0]["label"])
    data.set_epoch(1)
    assert not torch.equal(first, data[0]["label"])
    data.set_epoch(0)
    assert torch.equal(first, data[0]["label"])
    other = SegmentationFolder(demo_root, "train", transform=transform, seed=4)
    assert not torch.equal(first, other[0]["label"])
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 3, 24, 24) and batch["label"].shape == (2, 24, 24) and batch["id"][1] == "train_00001"


def test_pad_collate_pads_with_zero_and_ignore() -> None:
    items = [
        {"image": torch.ones(3, 4, 5), "label": torch.zeros(4, 5, dtype=torch.int64), "id": "a"},
        {"image": torch.ones(3, 6, 3), "label": torch.ones(6, 3, dtype=torch.int64), "id": "b"},
    ]
    batch = pad_collate(items)
    assert batch["image"].shape == (2, 3, 6, 5) and batch["size"] == [(4, 5), (6, 3)] and batch["id"] == ["a", "b"]
    assert torch.all(batch["image"][0, :, 4:, :] == 0) and torch.all(batch["label"][0, 4:, :] == 255)
    assert torch.all(batch["label"][1, :, 3:] == 255) and torch.all(batch["label"][1, :, :3] == 1)


def test_label_value_outside_the_classes_names_the_file(demo_root: Path, tmp_path: Path) -> None:
    root = _copy(demo_root, tmp_path)
    bad = root / "labels" / "val_00001.png"
    label = np.array(Image.open(bad))
    label[0, 0] = 9
    write_palette_png(bad, label)
    data = SegmentationFolder(root, "val")
    data[0]
    with pytest.raises(DataError, match=r"val_00001\.png: label values 9 outside 0\.\.4"):
        data[1]


def test_bad_folders_and_files_raise_data_errors(demo_root: Path, tmp_path: Path) -> None:
    root = _copy(demo_root, tmp_path)
    (root / "val.txt").write_text("val_00000\n../../etc/passwd\n")
    with pytest.raises(DataError, match=r"val\.txt: invalid id '\.\./\.\./etc/passwd'"):
        SegmentationFolder(root, "val")
    (root / "val.txt").write_text("val_00000\nval_00009\n")
    with pytest.raises(DataError, match=r"images/val_00009\.jpg: file not found"):
        SegmentationFolder(root, "val")
    with pytest.raises(DataError, match=r"test\.txt: id list not found"):
        SegmentationFolder(root, "test")
    (root / "val.txt").write_text("val_00000\n")
    with pytest.raises(DataError, match="over the limit"):
        SegmentationFolder(root, "val", max_pixels=100)[0]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "labels" / "val_00000.png")
    with pytest.raises(DataError, match=r"val_00000\.png: label is a mode RGB image"):
        SegmentationFolder(root, "val")[0]
    write_palette_png(root / "labels" / "val_00000.png", np.zeros((20, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"val_00000\.png: label is 32x20, image is 32x32"):
        SegmentationFolder(root, "val")[0]

    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "classes": "head"}))
    with pytest.raises(DataError, match=r"dataset\.json: 'classes' must be"):
        read_dataset_info(root)
    (root / "dataset.json").write_text("{")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        SegmentationFolder(root, "val")
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset\.json: file not found"):
        read_dataset_info(root)


def test_user_dataset_without_palette_gets_voc_colours(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((6, 7, 3), 200, dtype=np.uint8)).save(root / "images" / "x.jpg")
    (root / "labels").mkdir()
    Image.fromarray(np.array([[0, 1, 255] * 2 + [1]] * 6, dtype=np.uint8)).save(root / "labels" / "x.png")  # mode L
    (root / "train.txt").write_text("x\n")
    (root / "dataset.json").write_text(json.dumps({"name": "mine", "classes": ["bg", "thing"]}))
    item = SegmentationFolder(root, "train", transform=EvalTransform())[0]
    assert item["label"][0].tolist() == [0, 1, 255, 0, 1, 255, 1]
    assert read_dataset_info(root).palette[1] == [128, 0, 0]


def test_shipped_lists() -> None:
    assert len(shipped_ids("person_part", "train")) == 1716
    assert len(shipped_ids("person_part", "val")) == 1831
    assert len(shipped_ids("voc", "train_aug")) == 10582
    assert len(shipped_ids("voc", "val")) == 1449
    assert not set(shipped_ids("voc", "train_aug")) & set(shipped_ids("voc", "val"))
    assert (lists_root() / "voc" / "README.md").is_file() and (lists_root() / "person_part" / "README.md").is_file()
    if FIXTURES.is_dir():
        for dataset, split, name in [("person_part", "train", "person_part_train_id.txt"),
                                     ("person_part", "val", "person_part_val_id.txt"),
                                     ("voc", "train_aug", "voc_train_aug.txt"), ("voc", "val", "voc_val.txt")]:  # fmt: skip
            assert shipped_list_path(dataset, split).read_text().split() == (FIXTURES / "lists" / name).read_text().split()
