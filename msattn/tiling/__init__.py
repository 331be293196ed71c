"""Tiled inference for images larger than memory allows: layout, blending, memory budget, stitching.

- :mod:`msattn.tiling.layout`: tile windows (8k+1 sides, starts on the stride-8 grid) and
  smooth blending weights.
- :mod:`msattn.tiling.stitch`: band accumulation with bounded memory, label and store sinks.
- :mod:`msattn.tiling.memory`: device budgets and the per-pixel estimate.
- :mod:`msattn.tiling.run`: planning (whole or tiles) and :func:`msattn.tiling.run.stitch_tiles`.
- :mod:`msattn.tiling.images`: one uint8 image in tiles through any backend.
- :mod:`msattn.tiling.preview`: downscaled overlays and figures for huge images.

The PyTorch forward pass in tiles is :mod:`msattn.infer.tiled`.
"""
