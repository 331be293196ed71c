"""Reading dataset folders: ``images/<id>.jpg``, ``labels/<id>.png``, ``<split>.txt``, ``dataset.json``.

Any folder in this shape works, so users can bring their own data. Labels are single-channel PNGs
(palette or grey) whose values are class indices; ``ignore_index`` (255) marks pixels to ignore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from msattn.data.info import read_dataset_info
from msattn.data.labels import (
    bad_label_values,
    dedupe_ids,
    distinct_values,
    duplicate_warning,
    label_warnings,
    orient_to_label,
    palette_warning,
)  # fmt: skip
from msattn.data.transforms import EvalTransform
from msattn.errors import DataError
from msattn.images import open_image, to_rgb
from msattn.io import check_id, read_id_list


def read_label(path: Path, num_classes: int, ignore_index: int = 255, max_pixels: int | None = None) -> np.ndarray:
    """A label PNG as ``uint8[H, W]``; other modes or values outside the classes raise :class:`DataError`.

    ``max_pixels``: see :func:`msattn.io.open_image` (None: the default limit).
    """
    return read_label_image(path, num_classes, ignore_index, max_pixels)[0]


def read_label_image(
    path: Path, num_classes: int, ignore_index: int = 255, max_pixels: int | None = None
) -> tuple[np.ndarray, Any, list[int]]:
    """:func:`read_label`, the PIL image it came from (for its palette) and its distinct values.

    Labels are read as stored: never turned by an EXIF orientation.
    """
    img = open_image(path, mode=None, max_pixels=max_pixels, orient=False)
    if img.mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"{path}: label is a mode {img.mode} image; expected single-channel class indices (P or L PNG)")
    label = np.asarray(img)
    values = distinct_values(label)
    bad = bad_label_values(values, num_classes, ignore_index)
    if bad:
        raise DataError(
            f"{path}: label values {', '.join(str(v) for v in bad[:5])} outside 0..{num_classes - 1} "
            f"(ignore: {ignore_index})"
        )
    return label.astype(np.uint8), img, values


class SegmentationFolder(Dataset):
    """Items of one split of a dataset folder: ``{"image": float[3, H, W], "label": int64[H, W], "id": str}``.

    ``transform(image, label, rng)`` gets the PIL RGB image, the PIL label (mode L, values checked)
    and a generator seeded from ``(seed, epoch, index)``: call :meth:`set_epoch` each epoch for new
    augmentations that stay reproducible whatever the number of loader workers (with
    ``persistent_workers=True`` the workers keep the epoch they were started with). The default
    transform is :class:`msattn.data.transforms.EvalTransform` with ImageNet statistics.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        transform: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        max_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.info = read_dataset_info(self.root)
        self.split = check_id(split, self.root / "dataset.json")
        list_path = self.root / f"{split}.txt"
        self.ids, repeated = dedupe_ids(read_id_list(list_path))
        if not self.ids:
            raise DataError(f"{list_path}: lists no ids")
        #: problems found while opening the split (repeated ids); items carry their own in "warnings"
        self.warnings = [w for w in [duplicate_warning(repeated, list_path)] if w]
        missing = [i for i in self.ids if not self.image_path(i).is_file() or not self.label_path(i).is_file()]
        if missing:
            first = missing[0]
            which = self.image_path(first) if not self.image_path(first).is_file() else self.label_path(first)
            raise DataError(f"{which}: file not found ({len(missing)} of the {len(self.ids)} ids in {list_path} lack files)")
        self.transform = transform if transform is not None else EvalTransform()
        self.max_pixels = max_pixels
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, item_id: str) -> Path:
        return self.root / "images" / f"{item_id}.jpg"

    def label_path(self, item_id: str) -> Path:
        return self.root / "labels" / f"{item_id}.png"

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of ``epoch`` (items are reproducible from ``(seed, epoch, index)``)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator handed to the transform for item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def read_pair(self, index: int) -> tuple[Any, Any]:
        """The raw PIL RGB image and PIL label (mode L) of item ``index``, checked for size and values."""
        image, label, _ = self.read_checked(index)
        return image, label

    def read_checked(self, index: int) -> tuple[Any, Any, list[tuple[Path, str]]]:
        """:meth:`read_pair` plus the warnings about this item's files: [(file, message)].

        The image is turned by its EXIF orientation when the label matches the turned image
        (:func:`msattn.data.labels.orient_to_label`); labels are read as stored.
        """
        item_id = self.ids[index]
        image_path, label_path = self.image_path(item_id), self.label_path(item_id)
        info = self.info
        label, label_img, values = read_label_image(label_path, info.num_classes, info.ignore_index, self.max_pixels)
        stored = open_image(image_path, mode=None, max_pixels=self.max_pixels, orient=False)
        image, orientation_note = orient_to_label(stored, (label.shape[1], label.shape[0]))
        image = to_rgb(image)
        if (label.shape[1], label.shape[0]) != image.size:
            raise DataError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]}, image is {image.size[0]}x{image.size[1]}"
            )
        warnings = [(label_path, m) for m in label_warnings(values, info.num_classes, info.ignore_index)]
        if label_img.mode == "P" and info.palette_declared:
            note = palette_warning(label_img.getpalette(), info.palette[: info.num_classes])
            warnings += [(label_path, note)] if note else []
        warnings += [(image_path, orientation_note)] if orientation_note else []
        return image, Image.fromarray(label), warnings

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label, warnings = self.read_checked(index)
        image_t, label_t = self.transform(image, label, self.rng(index))
        return {"image": image_t, "label": label_t, "id": self.ids[index], "warnings": warnings}


def pad_collate(batch: Sequence[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Stack items of different sizes: images padded with 0 (the mean), labels with ``ignore_index``.

    Returns ``{"image": [N, 3, H, W], "label": [N, H, W], "id": [str], "size": [(h, w)]}``.
    """
    height = max(item["image"].shape[-2] for item in batch)
    width = max(item["image"].shape[-1] for item in batch)
    images = torch.zeros(len(batch), 3, height, width, dtype=batch[0]["image"].dtype)
    labels = torch.full((len(batch), height, width), ignore_index, dtype=torch.int64)
    sizes = []
    for n, item in enumerate(batch):
        h, w = item["image"].shape[-2:]
        images[n, :, :h, :w] = item["image"]
        labels[n, :h, :w] = item["label"]
        sizes.append((int(h), int(w)))
    return {"image": images, "label": labels, "id": [item["id"] for item in batch], "size": sizes}
