"""Pictures of huge predictions with bounded memory: downscaled overlays, heat maps and figures.

The label PNG and the ``.npz`` always keep the full resolution. The pictures meant for
looking at are made smaller when the image is large:

- ``<name>_overlay.jpg``: at most :data:`OVERLAY_MAX_SIDE` pixels on the long side, blended
  in bands of rows (a few bytes per pixel instead of three float32 copies of the image);
- the attention heat maps and the figure: at most :data:`FIGURE_MAX_SIDE` on the long side.

Downscaling is by an integer factor with Pillow's ``reduce`` (box average) for the image and
the merge weights, and by taking every factor-th pixel for labels and one-hot max-merge maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from msattn.visualize import overlay

OVERLAY_MAX_SIDE = 8192
FIGURE_MAX_SIDE = 2048
_BAND_ROWS = 256  # output rows blended or reduced at a time


def reduce_factor(height: int, width: int, max_side: int) -> int:
    """Smallest integer factor that brings the long side to at most ``max_side`` (1: keep)."""
    return max(1, math.ceil(max(height, width) / max_side))


def reduce_image(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [ceil(H/f), ceil(W/f), 3] box-averaged (Pillow's reduce)."""
    if factor == 1:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(factor))


def reduce_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Every ``factor``-th label (nearest), [ceil(H/f), ceil(W/f)]."""
    return labels if factor == 1 else np.ascontiguousarray(labels[::factor, ::factor])


def reduce_weights(weights: np.ndarray, factor: int, nearest: bool = False) -> np.ndarray:
    """Merge weights [S, H, W] (any float dtype, possibly memory-mapped) -> float32 [S, h, w], band by band."""
    if factor == 1:
        return np.asarray(weights, dtype=np.float32)
    if nearest:
        return np.ascontiguousarray(weights[:, ::factor, ::factor], dtype=np.float32)
    out = []
    step = _BAND_ROWS * factor  # a multiple of the factor: the boxes of consecutive bands line up
    for plane in weights:
        rows = [
            np.asarray(Image.fromarray(np.asarray(plane[r : r + step], dtype=np.float32), mode="F").reduce(factor))
            for r in range(0, plane.shape[0], step)
        ]
        out.append(np.concatenate(rows, axis=0))
    return np.stack(out)


def overlay_bands(image: np.ndarray, labels: np.ndarray, palette: Any) -> Any:
    """:func:`msattn.visualize.overlay` computed band by band into one PIL image (no float copy of the image)."""
    height, width = labels.shape
    picture = Image.new("RGB", (width, height))
    for r in range(0, height, _BAND_ROWS):
        picture.paste(overlay(image[r : r + _BAND_ROWS], labels[r : r + _BAND_ROWS], palette), (0, r))
    return picture


@dataclass
class Views:
    """Arrays for the pictures: the overlay's (image, labels) and the figures' (image, labels, weights)."""

    overlay_image: np.ndarray
    overlay_labels: np.ndarray
    figure_image: np.ndarray
    figure_labels: np.ndarray
    figure_weights: np.ndarray | None


def picture_views(image: np.ndarray, labels: np.ndarray, attention: np.ndarray | None, merge: str) -> Views:
    """Downscaled (when large) copies of the image, labels and merge weights for the pictures."""
    height, width = labels.shape
    f_overlay = reduce_factor(height, width, OVERLAY_MAX_SIDE)
    f_figure = reduce_factor(height, width, FIGURE_MAX_SIDE)
    weights = None
    if attention is not None:
        weights = reduce_weights(attention, f_figure, nearest=merge == "max")
    return Views(
        reduce_image(image, f_overlay),
        reduce_labels(labels, f_overlay),
        reduce_image(image, f_figure),
        reduce_labels(labels, f_figure),
        weights,
    )
