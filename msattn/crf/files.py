"""The files ``crf-refine`` reads: images, saved probabilities, ground-truth labels; scores and settings."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.config.crf import CRF_FIELDS, CRFParams, crf_params_from_dict
from msattn.config.recipe import read_toml
from msattn.errors import ConfigError, DataError, UsageError
from msattn.images import image_suffixes, open_image
from msattn.runtime.metrics import ConfusionMatrix
from msattn.visualize import voc_palette

SEARCH_FILE = "crf_search.json"

#: DeepLab's search ranges, trimmed to a grid small enough to run on a held-out subset.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "bi_w": (3.0, 4.0, 5.0),
    "bi_xy_std": (50.0, 80.0, 121.0),
    "bi_rgb_std": (3.0, 5.0, 10.0),
}


def find_image(folder: Path, name: str) -> Path | None:
    """The image ``<name>.<suffix>`` in ``folder`` for any format Pillow reads (any case), or None."""
    for suffix in image_suffixes():
        for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_probs(path: Path) -> dict[str, np.ndarray]:
    """Read a predict ``.npz``: "probs" float [C,H,W] plus optional "palette", "classes"; DataError if corrupt."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read probabilities ({exc})") from None
    probs = data.get("probs")
    if probs is None or probs.ndim != 3 or probs.shape[0] < 1:
        raise DataError(f"{path}: no 'probs' array of shape [C,H,W]")
    if not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
        raise DataError(f"{path}: 'probs' must hold finite floating-point probabilities")
    return data


def load_pair(image_path: Path, npz_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An RGB image and its saved probabilities, checked to be the same size."""
    data = load_probs(npz_path)
    image = np.asarray(open_image(image_path, "RGB"))
    if image.shape[:2] != data["probs"].shape[1:]:
        h, w = data["probs"].shape[1:]
        raise DataError(
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but {npz_path.name} holds {w}x{h} probabilities"
        )
    return image, data


def palette_of(data: Mapping[str, np.ndarray]) -> np.ndarray:
    """The palette a predict ``.npz`` carries, else the VOC palette."""
    palette = data.get("palette")
    if palette is not None and palette.ndim == 2 and palette.shape[1] == 3:
        return palette.astype(np.uint8)
    return voc_palette()


def read_label(path: Path, num_classes: int, size: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """Read a ground-truth label PNG (palette or grey, value = class, ``ignore_index`` ignored) as int64 [H,W]."""
    img = open_image(path, mode=None, orient=False)
    if img.mode not in {"P", "L"}:
        raise DataError(f"{path}: label must be a palette or greyscale PNG of class indices, got mode {img.mode}")
    label = np.asarray(img, dtype=np.int64)
    if label.shape != tuple(size):
        raise DataError(f"{path}: label is {label.shape[1]}x{label.shape[0]}, probabilities are {size[1]}x{size[0]}")
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        value = int(label[bad][0])
        raise DataError(f"{path}: label value {value} is not a class (0..{num_classes - 1}) or {ignore_index}")
    return label


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix [C,C] (rows = ground truth) via :class:`msattn.runtime.metrics.ConfusionMatrix`."""
    matrix = ConfusionMatrix(num_classes, ignore_index)
    matrix.update(
        torch.from_numpy(np.asarray(pred, dtype=np.int64)),
        torch.from_numpy(np.asarray(label, dtype=np.int64)),
    )
    return matrix.mat.numpy()


def mean_iou(confusion: np.ndarray) -> float:
    """mIoU of a [C,C] confusion matrix, as ``msattn evaluate`` computes it (absent classes left out)."""
    matrix = ConfusionMatrix(confusion.shape[0])
    matrix.mat = torch.from_numpy(np.asarray(confusion, dtype=np.int64))
    return float(matrix.compute()["miou"])


def load_crf_params(recipe: str | os.PathLike[str]) -> CRFParams:
    """Read the ``[crf]`` section of a recipe TOML file (defaults where absent)."""
    path = Path(recipe)
    data = read_toml(path)  # missing, a folder, not TOML: ConfigError naming the file; a UTF-8 BOM is accepted
    section = data.get("crf", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: crf must be a table ([crf]), got {type(section).__name__}")
    return crf_params_from_dict(section, path)



def resolve_params(overrides: Mapping[str, Any] | None = None, recipe: Path | None = None) -> CRFParams:
    """Defaults, then the recipe's ``[crf]`` section, then explicit (non-None) CLI values."""
    params = load_crf_params(recipe) if recipe is not None else CRFParams()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(CRF_FIELDS))
    if unknown:
        raise UsageError(f"unknown CRF option {unknown[0]}")
    merged = params.to_dict() | overrides
    return crf_params_from_dict(merged, "command line")
