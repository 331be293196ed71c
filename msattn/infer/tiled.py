"""The forward pass in tiles: :func:`msattn.infer.forward.predict_batch`'s contract over :mod:`msattn.tiling`.

``msattn evaluate`` sends the images its planner says are too large through :func:`predict_tiled`;
``msattn predict`` tiles uint8 images with any backend (:func:`msattn.tiling.images.predict_image_tiled`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from msattn.infer.forward import predict_batch
from msattn.tiling.layout import Tiling, Window
from msattn.tiling.run import stitch_tiles


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
    """:func:`msattn.infer.forward.predict_batch`'s contract, one image at a time in tiles.

    images: normalised float [N,3,H,W]. Returns float32 probs [N,C,H,W] and attention
    [N,S,H,W] (or None) on the images' device. ``pad_to`` does not apply to tiles (every
    tile is padded to its own next 8k+1 side, as an image is).
    """
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
