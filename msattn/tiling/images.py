"""``msattn predict`` on one image in tiles, with any backend, and memory bounded end to end.

The image stays uint8 (3 bytes per pixel); every tile is cut out of it, normalised and run
through the backend on its own; the stitcher keeps a tile-high float32 band; the labels are
written as rows finish (1 byte per pixel). Probabilities and merge weights are kept at image
size only when they are saved (``--save-probs``, ``--save-attention``, ``--crf``): float16
(float32 for the CRF), memory-mapped in the output folder when they would take more than a
quarter of the memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from msattn.tiling.layout import Tiling
from msattn.tiling.run import Planner, TiledResult, stitch_tiles
from msattn.tiling.stitch import Scratch


def predict_image_tiled(
    backend: Any,
    image: np.ndarray,
    tiling: Tiling,
    planner: Planner,
    scratch: Scratch,
    keep_probs: bool = False,
    keep_attention: bool = False,
    exact_probs: bool = False,
    flip: bool = False,
    on_tile: Callable[[], None] | None = None,
) -> TiledResult:
    """Predict uint8 ``image`` [H, W, 3] tile by tile with ``backend`` (see :mod:`msattn.infer.backends`).

    ``keep_probs`` / ``keep_attention`` return image-size probabilities / merge weights
    (float16, or float32 with ``exact_probs``); labels are always returned.
    """
    height, width = image.shape[:2]
    num_weights = len(backend.scales) if len(backend.scales) > 1 else 0
    keep = (["probs"] if keep_probs else []) + (["attention"] if keep_attention and num_weights else [])
    dtype = np.float32 if exact_probs else np.float16
    itemsize = np.dtype(dtype).itemsize
    store_bytes = itemsize * height * width * ((backend.num_classes if keep_probs else 0) + (num_weights if keep_attention else 0))

    def forward_tile(w: Any) -> tuple[np.ndarray, np.ndarray | None]:
        window = np.ascontiguousarray(image[w.y0 : w.y1, w.x0 : w.x1])[None]  # [1, h, w, 3]
        probs, attention = backend.forward(window, flip=flip)
        return probs[0], None if attention is None else attention[0]

    return stitch_tiles(
        (height, width),
        tiling,
        forward_tile,
        backend.num_classes,
        num_weights,
        keep=keep,
        dtype=dtype,
        on_disk=planner.store_on_disk(store_bytes),
        scratch=scratch,
        on_tile=on_tile,
    )
