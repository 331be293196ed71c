"""Where the tiles of an image go, and how much each tile's pixels count when blending.

- A **tile** is a window of ``tile`` x ``tile`` pixels, ``tile = 8k + 1`` (a grid side,
  :mod:`msattn.geometry`), so the network's stride-8 output grid is exact on every tile.
- Tiles start on multiples of a **quantum** (:func:`scale_quantum`: 8, or 16 with scale
  0.5, 32 with 0.75 and 0.5): every scale's output grid then sits on the same image pixels
  as in the whole-image prediction, so overlapping tiles and the whole image sample the
  same grids.
- Neighbouring tiles share at least ``overlap`` pixels, rounded up to a multiple of the
  quantum, plus the one grid pixel on which both sit. The last tile of a row (or column) ends at the image edge:
  it may overlap its neighbour by more, and may be narrower than ``tile``; the forward pass
  pads it to the next 8k+1 side with the mean colour exactly as it pads a whole image.
- **Weights**: along each axis a tile's weight is 1 inside; over the pixels it shares with
  the neighbour on a side it is almost 0 for the quarter nearest its own border (those
  pixels have the least context), rises as a raised cosine (``sin^2``) over the middle half
  and is 1 for the last quarter; the neighbour's weight falls as the mirror image over the
  same pixels, so the two sum to 1. At the image border there is no ramp. A tile's 2-D weight is the product of its
  row and column weights; the stitcher divides by the summed weight, so any constant (or
  smooth) field passes through blending unchanged: no seams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from msattn.errors import UsageError
from msattn.geometry import STRIDE, is_grid_side

#: smallest tile side accepted (the network's output is 9x9 there)
MIN_TILE = 65
MAX_TILE = 65537


@dataclass(frozen=True)
class Tiling:
    """A tile side (8k+1 pixels), the overlap between neighbouring tiles, and the grid
    ``quantum`` every tile start is a multiple of (8, or more for scales below 1, see
    :func:`scale_quantum`); the overlap is a multiple of the quantum."""

    tile: int
    overlap: int
    quantum: int = STRIDE

    @property
    def stride(self) -> int:
        """Distance between the starts of neighbouring tiles (a multiple of the quantum)."""
        return self.quantum * ((self.tile - 1 - self.overlap) // self.quantum)


@dataclass(frozen=True)
class Window:
    """One tile: rows ``y0:y1`` and columns ``x0:x1`` of the image; ``row`` counts tile rows."""

    y0: int
    y1: int
    x0: int
    x1: int
    row: int

    @property
    def size(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


#: the largest quantum used; scales whose grids would need more are tiled on the stride-8 grid
MAX_QUANTUM = 64


def scale_quantum(scales: Sequence[float]) -> int:
    """The smallest multiple of 8 whose scaled length is a multiple of 8 at every scale.

    A tile starting on a multiple of it sees every scale's output grid where the whole image
    does (8 for scales 1 and 2, 16 with 0.5, 32 with 0.75 and 0.5), so tiling only changes the
    context near tile borders. Scales without a small such multiple get 8.
    """
    lcm = 1
    for scale in scales:
        lcm = math.lcm(lcm, Fraction(float(scale)).limit_denominator(64).denominator)
    quantum = STRIDE * lcm
    return quantum if quantum <= MAX_QUANTUM else STRIDE


def default_overlap(tile: int, quantum: int = STRIDE) -> int:
    """About a quarter of the tile, in whole quanta (at least one, when the tile allows)."""
    quarter = quantum * ((tile - 1) // 4 // quantum)
    return max(quarter, min(quantum, tile - 1 - quantum))


def make_tiling(tile: int, overlap: int | None = None, quantum: int = STRIDE, what: str = "--tile") -> Tiling:
    """Check a tile side and overlap from the user; the overlap is rounded up to a multiple of ``quantum``.

    ``overlap=None`` takes :func:`default_overlap`. Problems raise :class:`UsageError` naming ``what``.
    """
    if not MIN_TILE <= tile <= MAX_TILE:
        raise UsageError(f"{what}: the tile side must be {MIN_TILE}..{MAX_TILE} pixels, got {tile}")
    if not is_grid_side(tile):
        lo = STRIDE * ((tile - 1) // STRIDE) + 1
        raise UsageError(
            f"{what}: the tile side must be 8k+1 pixels (so the stride-8 grid is exact on every tile), "
            f"got {tile}: use {lo} or {lo + STRIDE}"
        )
    if overlap is None:
        overlap = default_overlap(tile, quantum)
    if overlap < 0:
        raise UsageError(f"--overlap: must be >= 0 pixels, got {overlap}")
    rounded = quantum * math.ceil(overlap / quantum)
    if rounded > tile - 1 - quantum:
        most = quantum * ((tile - 1 - quantum) // quantum)
        raise UsageError(
            f"--overlap: {overlap} pixels leave no room between tiles of {tile} (tiles start on multiples of "
            f"{quantum} pixels for these scales); use at most {most} (or a larger --tile)"
        )
    return Tiling(tile, rounded, quantum)


def axis_starts(length: int, tiling: Tiling) -> list[int]:
    """Tile starts along an axis of ``length`` pixels: multiples of the quantum, the last tile ending
    at the edge (at most ``tile`` wide). One window (start 0) when the axis fits in a tile."""
    if length <= tiling.tile:
        return [0]
    q = tiling.quantum
    starts = list(range(0, length - tiling.tile, tiling.stride))
    last = q * math.ceil((length - tiling.tile) / q)
    if last > starts[-1]:
        starts.append(last)
    return starts


def axis_spans(length: int, tiling: Tiling) -> list[tuple[int, int]]:
    """(start, stop) of every tile along an axis; the last stops at ``length``."""
    starts = axis_starts(length, tiling)
    return [(s, min(s + tiling.tile, length)) for s in starts]


def windows(height: int, width: int, tiling: Tiling) -> list[Window]:
    """Every tile of an image, row by row (raster order)."""
    rows, cols = axis_spans(height, tiling), axis_spans(width, tiling)
    return [Window(y0, y1, x0, x1, r) for r, (y0, y1) in enumerate(rows) for x0, x1 in cols]


def count_tiles(height: int, width: int, tiling: Tiling) -> int:
    """Number of tiles :func:`windows` returns."""
    return len(axis_starts(height, tiling)) * len(axis_starts(width, tiling))


#: weight given to the pixels of a tile nearest to its border (never exactly 0: every pixel keeps a weight)
EDGE_WEIGHT = 1e-3


def _ramp(n: int) -> np.ndarray:
    """Rising weights over the n pixels a tile shares with its neighbour (pixel centres).

    About ``EDGE_WEIGHT`` over the first quarter (the pixels with the least context), a
    ``sin^2`` rise over the middle half, 1 over the last quarter. Mirrored, it is the
    neighbour's falling ramp over the same pixels, and the two sum to 1.
    """
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    u = np.clip(2.0 * (t - 0.25), 0.0, 1.0)
    return np.maximum(np.sin(0.5 * np.pi * u) ** 2, EDGE_WEIGHT)


def axis_weights(spans: Sequence[tuple[int, int]], index: int) -> np.ndarray:
    """float32 weights of tile ``index`` along one axis: 1 inside, sin^2 ramps over the shared pixels."""
    start, stop = spans[index]
    weights = np.ones(stop - start, dtype=np.float64)
    if index > 0:  # shared with the previous tile: [start, previous stop)
        shared = spans[index - 1][1] - start
        weights[:shared] = np.minimum(weights[:shared], _ramp(shared))
    if index + 1 < len(spans):  # shared with the next tile: [next start, stop)
        shared = stop - spans[index + 1][0]
        weights[len(weights) - shared :] = np.minimum(weights[len(weights) - shared :], _ramp(shared)[::-1])
    return weights.astype(np.float32)


def tile_weights(height: int, width: int, tiling: Tiling) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(row weights, column weights) of every tile, keyed by (y0, x0)."""
    rows, cols = axis_spans(height, tiling), axis_spans(width, tiling)
    row_w = [axis_weights(rows, i) for i in range(len(rows))]
    col_w = [axis_weights(cols, j) for j in range(len(cols))]
    return {(y0, x0): (row_w[i], col_w[j]) for i, (y0, _) in enumerate(rows) for j, (x0, _) in enumerate(cols)}
