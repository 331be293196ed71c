"""Tiled prediction: plan (whole or tiles), run every tile through the full multi-scale model, stitch.

Two entry points:

- :func:`stitch_tiles`: the general loop. ``forward_tile(window)`` returns the class
  probabilities ``[C, h, w]`` and merge weights ``[S, h, w]`` (or None) of one window, computed
  by the whole model (every scale, the merge) on that window alone; the outputs are blended
  (:mod:`msattn.tiling.layout`) in a band (:mod:`msattn.tiling.stitch`) and handed to sinks:
  the label map, and image-size stores for probabilities / attention when they are wanted.
  ``msattn predict`` uses it with any backend (PyTorch or onnxruntime).
- :func:`msattn.infer.tiled.predict_tiled` builds the contract of the forward pass on it
  (normalised batch in, probabilities and attention at image size out) for ``msattn evaluate``.

Why tiled and whole predictions differ slightly: a pixel near a tile border sees less
context than in the whole image (LargeFOV's receptive field spans hundreds of pixels, twice
that at scale 0.5, and the tile is padded with the mean colour where the image goes on), and
each scale's resizing starts from the tile's corners. The blending weights fade tile borders
out, so with enough overlap the labels agree on all but a fraction of a percent of pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msattn.errors import UsageError
from msattn.geometry import STRIDE
from msattn.tiling.layout import Tiling, Window, axis_starts, make_tiling, scale_quantum, tile_weights, windows
from msattn.tiling.memory import MemoryModel, choose_tile, default_budget
from msattn.tiling.stitch import LabelSink, Scratch, Stitcher, StoreSink, new_store

TileForward = Callable[[Window], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class TilingOptions:
    """``--tile``, ``--overlap`` and ``--max-memory`` (bytes), as given (None: not given)."""

    tile: int | None = None
    overlap: int | None = None
    max_memory: int | None = None


class Planner:
    """Decides per image whether it is predicted whole or in tiles, and with which tiling.

    With ``--tile`` every image larger than the tile is tiled. Without it, an image is tiled
    when the estimated memory of predicting it whole exceeds the budget (``--max-memory``, by
    default a share of the device's free memory); the tile is then the largest that fits.
    """

    def __init__(self, options: TilingOptions, memory: MemoryModel, device: str = "cpu") -> None:
        self.options = options
        self.memory = memory
        if memory.stride != STRIDE:  # tiles are 8k+1 and start on multiples of 8: the geometry of every backbone
            raise UsageError(f"tiling needs a model of output stride {STRIDE}; this one has stride {memory.stride}")
        #: a remark for the user when tiles are blended approximately (a timm model off the 8k+1 grid), else None
        self.note = None if memory.grid_exact else (
            f"the {memory.backbone} backbone's outputs do not sit on the 8k+1 grid: tiled predictions are "
            "blended from approximately placed outputs and differ from whole ones more than for exact backbones"
        )  # fmt: skip
        quantum = scale_quantum(memory.scales)
        self.fixed = make_tiling(options.tile, options.overlap, quantum) if options.tile is not None else None
        if options.overlap is not None and options.overlap < 0:
            raise UsageError(f"--overlap: must be >= 0 pixels, got {options.overlap}")
        self.budget = options.max_memory if options.max_memory is not None else default_budget(device)

    def plan(self, height: int, width: int, batch: int = 1) -> Tiling | None:
        """None to predict whole, else the tiling to use."""
        if self.fixed is not None:
            return None if height <= self.fixed.tile and width <= self.fixed.tile else self.fixed
        if self.memory.forward_bytes(height, width, batch) <= self.budget:
            return None
        return choose_tile(self.memory, height, width, self.budget, self.options.overlap)

    def store_on_disk(self, nbytes: int) -> bool:
        """Image-size stores (probabilities, attention) go to memory-mapped files above a quarter of the budget."""
        return nbytes > self.budget // 4


@dataclass
class TiledResult:
    """One tiled image: labels uint8 [H, W]; probs [C, H, W] and attention [S, H, W] when kept."""

    labels: np.ndarray
    probs: np.ndarray | None
    attention: np.ndarray | None
    tiles: int


def stitch_tiles(
    size: tuple[int, int],
    tiling: Tiling,
    forward_tile: TileForward,
    num_classes: int,
    num_weights: int,
    keep: Sequence[str] = (),
    dtype: Any = np.float32,
    on_disk: bool = False,
    scratch: Scratch | None = None,
    on_tile: Callable[[], None] | None = None,
) -> TiledResult:
    """Run ``forward_tile`` on every window of an image of ``size`` and blend the outputs.

    ``num_weights`` is S (0 for a single-scale model). ``keep`` names the image-size maps to
    return besides the labels ("probs", "attention"), stored as ``dtype`` (float16 halves
    them), memory-mapped in ``scratch`` when ``on_disk``. ``on_tile()`` is called after each tile.
    """
    height, width = size
    channels = {"probs": num_classes, **({"attention": num_weights} if num_weights else {})}
    scratch = scratch or Scratch(None)
    stores = {
        name: new_store((channels[name], height, width), dtype, on_disk, scratch) for name in keep if name in channels
    }
    labels = LabelSink(height, width)
    sinks = [labels, StoreSink(stores)] if stores else [labels]
    stitcher = Stitcher(height, width, channels, sinks, band=min(tiling.tile, height))
    weights = tile_weights(height, width, tiling)
    row_starts = axis_starts(height, tiling)
    tiles = windows(height, width, tiling)
    for window in tiles:
        if window.row > 0 and window.x0 == 0:  # a new tile row: the rows above it are final
            stitcher.finish_rows(row_starts[window.row])
        probs, attention = forward_tile(window)
        maps = {"probs": probs}
        if num_weights and attention is not None:
            maps["attention"] = attention
        stitcher.add(window, maps, *weights[(window.y0, window.x0)])
        if on_tile is not None:
            on_tile()
    stitcher.finish()
    return TiledResult(labels.labels, stores.get("probs"), stores.get("attention"), len(tiles))
