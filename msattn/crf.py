"""Fully connected CRF (Krähenbühl & Koltun) on saved class probabilities, as in DeepLab.

:class:`CRFParams` is also the recipe's ``[crf]`` section. :func:`dense_crf` refines one
image; the folder-level ``crf-refine`` (:func:`refine_folder`, :func:`grid_search`) lives in
:mod:`msattn.crf_folders` and is re-exported here.
``pydensecrf`` (package ``pydensecrf2``) is imported only when a CRF actually runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msattn.errors import ConfigError, DataError, DependencyError, UsageError

PROB_FLOOR = 1e-8  # probabilities are clipped to this before -log
SEARCH_FILE = "crf_search.json"

#: DeepLab's search ranges, trimmed to a grid small enough to run on a held-out subset.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "bi_w": (3.0, 4.0, 5.0),
    "bi_xy_std": (50.0, 80.0, 121.0),
    "bi_rgb_std": (3.0, 5.0, 10.0),
}


@dataclass
class CRFParams:
    """Dense CRF settings; defaults are DeepLab-LargeFOV's VOC values.

    bi_w / bi_xy_std / bi_rgb_std: bilateral (appearance) kernel weight, spatial and colour std;
    pos_w / pos_xy_std: Gaussian (smoothness) kernel weight and spatial std;
    iterations: mean-field iterations.
    """

    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`ConfigError` (naming ``crf.<key>`` and ``source``) for a non-positive or non-numeric value."""
        where = f"{source}: " if source is not None else ""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "iterations":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                want = "a positive integer"
            else:
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value > 0
                )
                want = "a positive number"
            if not ok:
                raise ConfigError(f"{where}crf.{field.name} must be {want}, got {value!r}")

    def replace(self, **changes: Any) -> CRFParams:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))


def crf_params_from_dict(values: Mapping[str, Any], source: str | os.PathLike[str] = "<crf>") -> CRFParams:
    """Build :class:`CRFParams` from a ``[crf]`` mapping; unknown keys and bad values raise :class:`ConfigError`."""
    unknown = sorted(set(values) - set(CRF_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key crf.{unknown[0]} (known: {', '.join(CRF_FIELDS)})")
    kwargs = {k: float(v) if k != "iterations" and _is_number(v) else v for k, v in values.items()}
    try:
        return CRFParams(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_crf_params(recipe: str | os.PathLike[str]) -> CRFParams:
    """Read the ``[crf]`` section of a recipe TOML file (defaults where absent)."""
    from msattn.config import read_toml

    path = Path(recipe)
    data = read_toml(path)  # missing, a folder, not TOML: ConfigError naming the file; a UTF-8 BOM is accepted
    section = data.get("crf", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: crf must be a table ([crf]), got {type(section).__name__}")
    return crf_params_from_dict(section, path)


# ----------------------------------------------------------------------------- one image


def _import_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise DependencyError(
            f"the dense CRF needs pydensecrf ({exc}); install it with: pip install pydensecrf2"
        ) from None
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine class probabilities with the fully connected CRF.

    image: uint8 [H,W,3] RGB; probs: float [C,H,W] (softmax output); returns float32 [C,H,W]
    (the mean-field marginals, summing to 1 over C).
    """
    params = params or CRFParams()
    dcrf = _import_densecrf()
    if probs.ndim != 3 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf wants image [H,W,3] and probs [C,H,W], got {image.shape} and {probs.shape}")
    num_classes, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but probabilities are {width}x{height}")
    unary = -np.log(np.clip(probs.astype(np.float32), PROB_FLOOR, 1.0)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(
        sxy=params.bi_xy_std,
        srgb=params.bi_rgb_std,
        rgbim=np.array(image, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf needs one
        compat=params.bi_w,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_classes, height, width)


# ----------------------------------------------------------------------------- files


def find_image(folder: Path, name: str) -> Path | None:
    """The image ``<name>.<suffix>`` in ``folder`` for any format Pillow reads (any case), or None."""
    from msattn.io import image_suffixes

    for suffix in image_suffixes():
        for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_probs(path: Path) -> dict[str, np.ndarray]:
    """Read a predict ``.npz``: "probs" float [C,H,W] plus optional "palette", "classes"; DataError if corrupt."""
    import zipfile

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


def _load_pair(image_path: Path, npz_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from msattn.io import open_image

    data = load_probs(npz_path)
    image = np.asarray(open_image(image_path, "RGB"))
    if image.shape[:2] != data["probs"].shape[1:]:
        h, w = data["probs"].shape[1:]
        raise DataError(
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but {npz_path.name} holds {w}x{h} probabilities"
        )
    return image, data


def _palette_of(data: Mapping[str, np.ndarray]) -> np.ndarray:
    from msattn.engine.visualize import voc_palette

    palette = data.get("palette")
    if palette is not None and palette.ndim == 2 and palette.shape[1] == 3:
        return palette.astype(np.uint8)
    return voc_palette()


def read_label(path: Path, num_classes: int, size: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """Read a ground-truth label PNG (palette or grey, value = class, ``ignore_index`` ignored) as int64 [H,W]."""
    from msattn.io import open_image

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
    """Confusion matrix [C,C] (rows = ground truth) via :class:`msattn.engine.metrics.ConfusionMatrix`."""
    import torch

    from msattn.engine.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(num_classes, ignore_index)
    matrix.update(
        torch.from_numpy(np.asarray(pred, dtype=np.int64)),
        torch.from_numpy(np.asarray(label, dtype=np.int64)),
    )
    return matrix.mat.numpy()


def mean_iou(confusion: np.ndarray) -> float:
    """mIoU of a [C,C] confusion matrix, as ``msattn evaluate`` computes it (absent classes left out)."""
    import torch

    from msattn.engine.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(confusion.shape[0])
    matrix.mat = torch.from_numpy(np.asarray(confusion, dtype=np.int64))
    return float(matrix.compute()["miou"])


# ----------------------------------------------------------------------------- CLI


def resolve_params(overrides: Mapping[str, Any] | None = None, recipe: Path | None = None) -> CRFParams:
    """Defaults, then the recipe's ``[crf]`` section, then explicit (non-None) CLI values."""
    params = load_crf_params(recipe) if recipe is not None else CRFParams()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(CRF_FIELDS))
    if unknown:
        raise UsageError(f"unknown CRF option {unknown[0]}")
    merged = params.to_dict() | overrides
    return crf_params_from_dict(merged, "command line")


def __getattr__(name: str) -> Any:
    """The folder-level functions live in :mod:`msattn.crf_folders` (imported on first use)."""
    if name in _FOLDER_API:
        from msattn import crf_folders

        return getattr(crf_folders, name)
    raise AttributeError(f"module 'msattn.crf' has no attribute {name!r}")


_FOLDER_API = ("crf_refine_command", "grid_search", "refine_folder", "refine_one")
