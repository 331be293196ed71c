"""Tiled prediction: plan (whole or tiles), run every tile through the full multi-scale model, stitch.

Two entry points:

- :func:`stitch_tiles`: the general loop. ``forward_tile(window)`` returns the class
  probabilities ``[C, h, w]`` and merge weights ``[S, h, w]`` (or None) of one window, computed
  by the whole model (every scale, the merge) on that window alone; the outputs are blended
  (:mod:`msattn.tiling.layout`) in a band (:mod:`msattn.tiling.stitch`) and handed to sinks:
  the label map, and image-size stores for probabilities / attention when they are wanted.
  ``msattn predict`` uses it with any backend (PyTorch or onnxruntime).
- :func:`predict_tiled`: the contract of :func:`msattn.engine.predict.predict_batch` (normalised
  batch in, probabilities and attention at image size out) for ``msattn evaluate``; and
  :func:`tiled_forward`, which picks between the two per batch (the one place that chooses).

Why tiled and whole predictions differ slightly: a pixel near a tile border sees less
context than in the whole image (LargeFOV's receptive field spans hundreds of pixels, twice
that at scale 0.5, and the tile is padded with the mean colour where the image goes on), and
each scale's resizing starts from the tile's corners. The blending weights fade tile borders
out, so with enough overlap the labels agree on all but a fraction of a percent of pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msattn.errors import UsageError
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


def predict_tiled(
    model: Any,
    images: Any,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    amp_dtype: Any = None,
    pad_to: int | None = None,
    *,
    tiling: Tiling,
) -> tuple[Any, Any]:
    """:func:`msattn.engine.predict.predict_batch`'s contract, one image at a time in tiles.

    images: normalised float [N,3,H,W]. Returns float32 probs [N,C,H,W] and attention
    [N,S,H,W] (or None) on the images' device. ``pad_to`` does not apply to tiles (every
    tile is padded to its own next 8k+1 side, as an image is).
    """
    import torch

    from msattn.engine.predict import predict_batch

    del pad_to
    num_classes, num_weights = _output_channels(model, scales)
    outputs, weights = [], []
    for image in images:
        def forward_tile(w: Window, image: Any = image) -> tuple[np.ndarray, np.ndarray | None]:
            window = image[None, :, w.y0 : w.y1, w.x0 : w.x1]
            probs, attention = predict_batch(model, window, scales=scales, flip=flip, amp_dtype=amp_dtype)
            return probs[0].float().cpu().numpy(), None if attention is None else attention[0].float().cpu().numpy()

        size = (int(image.shape[-2]), int(image.shape[-1]))
        result = stitch_tiles(size, tiling, forward_tile, num_classes, num_weights, keep=("probs", "attention"))
        outputs.append(torch.from_numpy(result.probs))
        weights.append(None if result.attention is None else torch.from_numpy(result.attention))
    probs = torch.stack(outputs).to(images.device)
    attention = None if any(w is None for w in weights) else torch.stack(weights).to(images.device)
    return probs, attention


def _output_channels(model: Any, scales: Sequence[float] | None) -> tuple[int, int]:
    """(C, S) of a model's outputs: classes and merge weights (0 for one scale)."""
    run = tuple(scales) if scales is not None else tuple(getattr(model, "scales", (1.0,)))
    return int(model.num_classes), len(run) if len(run) > 1 else 0


def tiled_forward(planner: Planner) -> Callable[..., tuple[Any, Any]]:
    """A function with predict_batch's contract that tiles the batches ``planner`` says must be tiled."""
    from msattn.engine.predict import predict_batch

    def forward(model: Any, images: Any, scales: Any = None, flip: bool = False, amp_dtype: Any = None,
                pad_to: int | None = None) -> tuple[Any, Any]:
        height, width = images.shape[-2:]
        tiling = planner.plan(int(height), int(width), batch=int(images.shape[0]))
        if tiling is None:
            return predict_batch(model, images, scales=scales, flip=flip, amp_dtype=amp_dtype, pad_to=pad_to)
        return predict_tiled(model, images, scales, flip, amp_dtype, pad_to, tiling=tiling)

    return forward


def scratch_folder(out: Path | None) -> Scratch:
    """Memory-mapped stores next to the outputs (same disk; ``.tmp-`` files are cleaned after a kill)."""
    return Scratch(out)


__all__ = [
    "Planner",
    "TiledResult",
    "TilingOptions",
    "predict_tiled",
    "scratch_folder",
    "stitch_tiles",
    "tiled_forward",
]
