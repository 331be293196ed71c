"""Objects in a label map: connected components of each class, and their size bins.

An *object* is a connected component (4-connectivity, :func:`scipy.ndimage.label`) of the
pixels of one class in the ground truth; its *size* is its area as a share of the image
(pixels / (H x W)). Size bins are given by their edges on that share, e.g. the default
``(0.005, 0.02, 0.08, 0.32)`` makes the five bins <0.5%, 0.5-2%, 2-8%, 8-32% and >=32%.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from msattn.errors import UsageError

#: edges of the default size bins (area share of the image)
DEFAULT_BINS: tuple[float, ...] = (0.005, 0.02, 0.08, 0.32)


def check_bins(edges: Sequence[float]) -> tuple[float, ...]:
    """Validate bin edges: strictly increasing shares in (0, 1); returns them as a tuple."""
    edges = tuple(float(e) for e in edges)
    if not edges:
        raise UsageError("--bins: give at least one edge (area shares of the image, e.g. 0.005 0.02 0.08 0.32)")
    if any(not (0.0 < e < 1.0) for e in edges):
        raise UsageError(f"--bins: edges are area shares of the image and must lie in (0, 1), got {list(edges)}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UsageError(f"--bins: edges must increase strictly, got {list(edges)}")
    return edges


def _pct(value: float) -> str:
    return f"{100 * value:g}%"


def bin_labels(edges: Sequence[float]) -> list[str]:
    """Human names of the bins: ``['<0.5%', '0.5-2%', ..., '>=32%']``."""
    names = [f"<{_pct(edges[0])}"]
    names += [f"{100 * a:g}-{_pct(b)}" for a, b in zip(edges, edges[1:])]
    names.append(f">={_pct(edges[-1])}")
    return names


def bin_index(shares: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin of every area share: 0 below the first edge, ``len(edges)`` at or above the last."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), shares, side="right")


@dataclass
class Objects:
    """The objects of one image.

    ``pixel_object`` int64[H, W]: object index of every pixel (-1: no object: background when
    skipped, ignored pixels); ``classes`` int64[K], ``pixels`` int64[K] (area in pixels).
    """

    pixel_object: np.ndarray
    classes: np.ndarray
    pixels: np.ndarray


def find_objects(label: np.ndarray, num_classes: int, skip_classes: Sequence[int] = ()) -> Objects:
    """Connected components of every class of ``label`` [H, W] (values >= num_classes, e.g. 255, are not objects)."""
    label = np.asarray(label)
    pixel_object = np.full(label.shape, -1, dtype=np.int64)
    classes: list[np.ndarray] = []
    pixels: list[np.ndarray] = []
    count = 0
    for c in np.unique(label):
        c = int(c)
        if c >= num_classes or c < 0 or c in skip_classes:
            continue
        components, n = ndimage.label(label == c)  # 4-connectivity; components numbered 1..n
        inside = components > 0
        pixel_object[inside] = components[inside] - 1 + count
        classes.append(np.full(n, c, dtype=np.int64))
        pixels.append(np.bincount(components[inside] - 1, minlength=n).astype(np.int64))
        count += n
    if not classes:
        return Objects(pixel_object, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return Objects(pixel_object, np.concatenate(classes), np.concatenate(pixels))
