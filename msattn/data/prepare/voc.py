"""PASCAL VOC 2012 + SBD ("train_aug"): 10,582 training and 1,449 validation images, 21 classes.

Labels: VOC ``SegmentationClass/<id>.png`` (palette PNGs whose *indices* are the class ids, 255 =
void; a ``SegmentationClassRaw/`` folder of mode-L index PNGs is accepted too) and SBD
``cls/<id>.mat`` (``GTcls.Segmentation``, 0..20). Where both exist the VOC label wins. Without
SBD the training split is the VOC ``train_aug`` ids that have a VOC label and are not in val
(VOC 2012 train, 1,464 images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from msattn.data.lists import split_ids
from msattn.data.prepare.common import MISSING, PrepareSummary, Result, Task, dedupe
from msattn.data.prepare.finish import RunInfo, finish
from msattn.data.prepare.output_folder import locked_output, prepare_output
from msattn.data.prepare.runner import run_tasks
from msattn.data.prepare.writer import StoredImage, Target, write_item
from msattn.errors import DataError
from msattn.images import open_image

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def find_voc_root(voc: Path) -> Path:
    """The folder holding ``JPEGImages/``: ``voc`` itself, ``voc/VOC2012`` or ``voc/VOCdevkit/VOC2012``."""
    for candidate in (voc, voc / "VOC2012", voc / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    if not voc.is_dir():
        raise DataError(f"{voc}: folder not found (--voc must be the VOC2012 folder)")
    raise DataError(f"{voc}: no JPEGImages/ folder here (--voc must be VOCdevkit/VOC2012)")


def find_voc_labels(root: Path) -> Path:
    """``SegmentationClass/`` (palette PNGs) or, failing that, ``SegmentationClassRaw/``."""
    for name in ("SegmentationClass", "SegmentationClassRaw"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no SegmentationClass/ folder here (--voc must be VOCdevkit/VOC2012)")


def find_sbd_cls(sbd: Path) -> Path:
    """SBD's ``cls/`` folder under ``sbd``, ``sbd/dataset`` or ``sbd/benchmark_RELEASE/dataset``."""
    for candidate in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate / "cls"
    if not sbd.is_dir():
        raise DataError(f"{sbd}: folder not found (--sbd must be SBD's benchmark_RELEASE/dataset)")
    raise DataError(f"{sbd}: no cls/ folder here (--sbd must be SBD's benchmark_RELEASE/dataset)")


def read_voc_label(path: Path) -> np.ndarray:
    """Class indices of a VOC label PNG: the raw palette indices (mode P) or grey values (mode L)."""
    img = open_image(path, mode=None, orient=False)  # labels are read as stored
    if img.mode not in ("P", "L"):
        raise DataError(f"{path}: label is a mode {img.mode} image; expected a palette (P) or grey (L) PNG of class indices")
    return np.array(img, dtype=np.uint8)


def read_sbd_label(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file as uint8."""
    try:
        seg = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        seg = np.asarray(seg)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises many types on corrupt files
        raise DataError(f"{path}: not a readable SBD GTcls file ({type(exc).__name__}: {exc})") from None
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise DataError(f"{path}: GTcls.Segmentation is not a 2-D integer map ({seg.dtype}, shape {seg.shape})")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise DataError(f"{path}: label values outside 0..255 (min {seg.min()}, max {seg.max()})")
    return seg.astype(np.uint8)


def _process(task: Task, target: Target) -> Result:
    jpg, voc_label, sbd_label = task.payload
    if voc_label is not None:
        source, label = Path(voc_label), read_voc_label(Path(voc_label))
    elif sbd_label is not None:
        source, label = Path(sbd_label), read_sbd_label(Path(sbd_label))
    else:
        return task.result(MISSING, "no label in VOC SegmentationClass/ or SBD cls/")
    return write_item(target, task, label, StoredImage(Path(jpg)), source)


def _stems(folder: Path | None, suffix: str) -> set[str]:
    if folder is None:
        return set()
    return {name[: -len(suffix)] for name in (p.name for p in folder.iterdir()) if name.endswith(suffix)}


@locked_output("voc", "sbd")
def prepare_voc(
    voc: Path,
    out: Path,
    sbd: Path | None = None,
    workers: int = 2,
    train_ids: Sequence[str] | None = None,
    val_ids: Sequence[str] | None = None,
) -> PrepareSummary:
    """Write VOC 2012 + SBD train_aug/val to ``out`` (``train_ids``/``val_ids`` replace the shipped lists)."""
    voc, out = Path(voc), Path(out)
    root = find_voc_root(voc)
    voc_labels = find_voc_labels(root)
    sbd_cls = find_sbd_cls(Path(sbd)) if sbd is not None else None
    images = root / "JPEGImages"
    sbd_images = sbd_cls.parent / "img" if sbd_cls is not None else None

    train, train_source = split_ids("voc", "train_aug", train_ids)
    val, val_source = split_ids("voc", "val", val_ids)
    voc_have, sbd_have = _stems(voc_labels, ".png"), _stems(sbd_cls, ".mat")
    warnings = []
    if sbd_cls is None:
        val_set = set(val)
        kept = [i for i in train if i in voc_have and i not in val_set]
        warnings.append(
            f"no --sbd: training on the {len(kept)} VOC-labelled train ids instead of the {len(train)} of "
            "train_aug; pass --sbd benchmark_RELEASE/dataset for the paper's setting"
        )
        train = kept

    prepare_output(out, "voc", {"sbd": sbd_cls is not None, "labels": voc_labels.name})

    def task(split: str, item_id: str) -> Task:
        jpg = images / f"{item_id}.jpg"
        if sbd_images is not None and not jpg.is_file() and (sbd_images / f"{item_id}.jpg").is_file():
            jpg = sbd_images / f"{item_id}.jpg"
        voc_label = str(voc_labels / f"{item_id}.png") if item_id in voc_have else None
        sbd_label = str(sbd_cls / f"{item_id}.mat") if sbd_cls is not None and item_id in sbd_have else None
        return Task(split, item_id, (str(jpg), voc_label, sbd_label))

    tasks = [task("train", i) for i in dedupe(train)] + [task("val", i) for i in dedupe(val)]
    target = Target("voc", out, CLASSES)
    results = run_tasks(_process, tasks, target, workers)
    sources = {"voc": str(root.resolve()), "sbd": str(sbd_cls.parent.resolve()) if sbd_cls else None,
               "lists": {"train": train_source, "val": val_source}}  # fmt: skip
    # the paper's Table 4 (test server) trains on train_aug + val
    return finish(target, results, RunInfo(voc, sources, warnings=warnings, unions={"trainval": ("train", "val")}))
