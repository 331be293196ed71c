"""Tiled inference for images larger than memory allows: layout, blending, memory budget, stitching.

- :mod:`msattn.tiling.layout`: tile windows (8k+1 sides, starts on the stride-8 grid) and
  smooth blending weights.
- :mod:`msattn.tiling.stitch`: band accumulation with bounded memory, label and store sinks.
- :mod:`msattn.tiling.memory`: ``--max-memory`` parsing, device defaults, the per-pixel estimate.
- :mod:`msattn.tiling.run`: planning (whole or tiles), :func:`stitch_tiles`, :func:`predict_tiled`.
- :mod:`msattn.tiling.preview`: downscaled overlays and figures for huge images.
"""

from msattn.tiling.layout import Tiling, Window, default_overlap, make_tiling, windows
from msattn.tiling.memory import MemoryModel, default_budget, format_bytes, parse_memory
from msattn.tiling.run import Planner, TiledResult, TilingOptions, predict_tiled, stitch_tiles, tiled_forward

__all__ = [
    "MemoryModel",
    "Planner",
    "TiledResult",
    "Tiling",
    "TilingOptions",
    "Window",
    "default_budget",
    "default_overlap",
    "format_bytes",
    "make_tiling",
    "parse_memory",
    "predict_tiled",
    "stitch_tiles",
    "tiled_forward",
    "windows",
]
