"""Blend tile outputs into image-size maps with memory bounded by a band of rows.

Tiles arrive in raster order (:func:`msattn.tiling.layout.windows`). The stitcher keeps a
float32 **band** of weighted sums and weights for the rows that tiles still touch; once a
tile row is done, the rows above the next tile row are final: they are divided by their
summed weight and handed to a **sink**, and the band moves down. So the running buffer is
``(channels + 1) x (tile height) x (image width)`` float32, not the image.

Sinks receive ``(r0, r1, maps)`` with ``maps[name]`` float32 ``[c, r1 - r0, W]``:

- :class:`LabelSink`: the argmax of ``"probs"`` into a uint8 label map (1 byte per pixel);
- :class:`StoreSink`: the maps into image-size arrays, float32 or float16, in memory or
  memory-mapped on disk (see :func:`new_store`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from msattn.tiling.layout import Window

Sink = Callable[[int, int, Mapping[str, np.ndarray]], None]


class Stitcher:
    """Weighted running sums of named maps (e.g. probs [C], attention [S]) over a band of rows."""

    def __init__(self, height: int, width: int, channels: Mapping[str, int], sinks: list[Sink], band: int) -> None:
        self.height, self.width = height, width
        self.channels = dict(channels)
        self.sinks = sinks
        self.band_rows = min(band, height)
        self.top = 0  # image row of the band's first row; rows above are final and handed out
        self.sums = {k: np.zeros((c, self.band_rows, width), np.float32) for k, c in self.channels.items()}
        self.weight = np.zeros((self.band_rows, width), np.float32)

    def add(self, window: Window, maps: Mapping[str, np.ndarray], row_w: np.ndarray, col_w: np.ndarray) -> None:
        """Add one tile's maps (``[c, h, w]`` for ``window``) weighted by ``row_w[:, None] * col_w[None, :]``."""
        if window.y0 < self.top:
            raise ValueError(f"tile at row {window.y0} arrives after rows up to {self.top} were handed out")
        self._grow_to(window.y1)
        r0, r1 = window.y0 - self.top, window.y1 - self.top
        w2d = row_w[:, None] * col_w[None, :]  # [h, w]
        self.weight[r0:r1, window.x0 : window.x1] += w2d
        for name, values in maps.items():
            self.sums[name][:, r0:r1, window.x0 : window.x1] += values * w2d

    def finish_rows(self, upto: int) -> None:
        """Hand rows ``top:upto`` (no later tile touches them) to the sinks and drop them from the band."""
        upto = min(upto, self.height)
        if upto <= self.top:
            return
        n = upto - self.top
        weight = self.weight[:n]
        if np.any(weight <= 0):
            raise ValueError(f"rows {self.top}..{upto} are not covered by any tile")
        maps = {}
        for name, s in self.sums.items():
            s[:, :n] /= weight  # in place: the band is dropped right after
            maps[name] = s[:, :n]
        for sink in self.sinks:
            sink(self.top, upto, maps)
        self._shift(n)
        self.top = upto

    def finish(self) -> None:
        """Hand out every remaining row."""
        self.finish_rows(self.height)

    def _shift(self, n: int) -> None:
        """Move the band up by n rows (its rows n.. become rows 0..; the freed rows at the bottom are zeroed)."""
        arrays = [*self.sums.values(), self.weight[None]]  # [c, rows, W] views
        for a in arrays:
            if n < a.shape[1]:
                a[:, :-n] = a[:, n:].copy()
            a[:, max(0, a.shape[1] - n) :] = 0

    def _grow_to(self, bottom: int) -> None:
        needed = bottom - self.top
        if needed <= self.band_rows:
            return
        grow = needed - self.band_rows  # only if tiles are taller than the band was sized for
        self.sums = {k: np.concatenate([s, np.zeros((s.shape[0], grow, self.width), np.float32)], 1)
                     for k, s in self.sums.items()}
        self.weight = np.concatenate([self.weight, np.zeros((grow, self.width), np.float32)], 0)
        self.band_rows = needed


class LabelSink:
    """argmax over classes of the finished ``"probs"`` rows -> uint8 labels [H, W]."""

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), np.uint8)

    def __call__(self, r0: int, r1: int, maps: Mapping[str, np.ndarray]) -> None:
        self.labels[r0:r1] = maps["probs"].argmax(axis=0)


class StoreSink:
    """Copies the finished rows of the named maps into image-size stores (``[c, H, W]`` arrays)."""

    def __init__(self, stores: Mapping[str, np.ndarray]) -> None:
        self.stores = dict(stores)

    def __call__(self, r0: int, r1: int, maps: Mapping[str, np.ndarray]) -> None:
        for name, store in self.stores.items():
            store[:, r0:r1] = maps[name]


class Scratch:
    """Memory-mapped stores in one folder, removed (with the folder's files) on :meth:`close`."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.paths: list[str] = []

    def new(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A zeroed memory-mapped array in a temporary file (``.tmp-`` name: cleaned after a kill)."""
        folder = self.folder if self.folder is not None else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".tmp-tiles-", suffix=".npy", dir=folder)
        os.close(fd)
        self.paths.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def close(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()


def new_store(shape: tuple[int, ...], dtype: Any, on_disk: bool, scratch: Scratch) -> np.ndarray:
    """An image-size store: in memory, or memory-mapped in ``scratch`` when ``on_disk``."""
    if on_disk:
        return scratch.new(shape, dtype)
    return np.zeros(shape, dtype)
