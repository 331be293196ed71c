"""The image <-> output-grid geometry of DeepLab-LargeFOV (Caffe's corner-aligned rule).

Every place that resizes between image pixels and the stride-8 output grid calls these
functions: the share-net's scale resizing, the loss's label shrinking, evaluation and
prediction (pad, upsample, crop), tiling and export.

The rules, as in DeepLab's Caffe models:

- A **grid side** is ``8k + 1`` pixels (321, 513). LargeFOV turns it into ``k + 1``
  outputs (three 3x3/2 pools with padding 1, ceil mode), and output ``i`` sits exactly on
  input pixel ``8i``: the first output on the first pixel, the last on the last.
- **Shrinking labels** to the grid reads the label at pixels ``0, 8, ..., 8k``
  (:func:`shrink_labels`); for any other pair of sizes, at the nearest pixel of the
  corner-aligned position ``i * (H - 1) / (h - 1)``.
- **Resizing** images, score maps, features and attention maps is bilinear and
  corner-aligned (``align_corners=True``, :func:`resize_bilinear`): with grid sides at both
  ends, every output position lands on its exact pixel.
- **Scales**: the scale-``s`` input of a grid side ``H`` has ``round((H - 1) s) + 1``
  pixels (:func:`scaled_side`: 321 at 0.75 is 241, at 0.5 161; 513 at 0.5 is 257). When
  ``(H - 1) s`` is not a multiple of 8, the side is rounded to the nearest grid side so the
  scale's output grid still spans exactly the same image as the reference grid.
- **Any image size**: :func:`pad_to_grid` pads the bottom/right to the next grid side (or to
  a fixed side such as DeepLab's 513), images with 0 (the mean colour after normalisation)
  and labels with the ignore index; :func:`crop_to` cuts the result back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: output stride of DeepLab-LargeFOV
STRIDE = 8

Size = tuple[int, int]


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def is_grid_side(side: int) -> bool:
    """True for sides of ``8k + 1`` pixels (k >= 0)."""
    return side >= 1 and (side - 1) % STRIDE == 0


def grid_side(side: int) -> int:
    """The smallest grid side (``8k + 1``) that is at least ``side``."""
    if side < 1:
        raise ValueError(f"a side must be >= 1 pixel, got {side}")
    return STRIDE * math.ceil((side - 1) / STRIDE) + 1


def output_side(side: int) -> int:
    """LargeFOV output side for an input side: ``8k + 1 -> k + 1`` (three ceil-mode 3x3/2 pools)."""
    for _ in range(3):
        side = side // 2 + 1  # ceil((side + 2 - 3) / 2) + 1
    return side


def output_size(size: Sequence[int]) -> Size:
    """:func:`output_side` of (H, W)."""
    return output_side(int(size[0])), output_side(int(size[1]))


def scaled_side(side: int, scale: float) -> int:
    """Input side of scale ``scale`` for an image side ``side``: ``round((side - 1) * scale) + 1``.

    For a grid side the result is moved to the nearest grid side when ``(side - 1) * scale``
    is not a multiple of 8 (it is for 321 and 513 at 0.75 and 0.5), so that the scale's
    output grid covers exactly the same image as the reference grid.
    """
    if scale == 1.0:
        return side
    extent = (side - 1) * scale
    if is_grid_side(side):
        return max(1, STRIDE * _round_half_up(extent / STRIDE) + 1)
    return max(1, _round_half_up(extent) + 1)


def scaled_size(size: Sequence[int], scale: float) -> Size:
    """:func:`scaled_side` of (H, W)."""
    return scaled_side(int(size[0]), scale), scaled_side(int(size[1]), scale)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Corner-aligned bilinear resize of ``[N, C, H, W]`` to ``size`` (a no-op when already that size).

    Used for images (to each scale), score maps, features and attention weights (to the
    reference grid and to the image). Weights that sum to 1 keep summing to 1.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Score maps [N, C, h, w] on the output grid -> image size (H, W), corner-aligned bilinear."""
    return resize_bilinear(logits, size)


def sample_positions(side_in: int, side_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Input pixel read for each of ``side_out`` corner-aligned samples of a side of ``side_in`` pixels.

    ``round(i * (side_in - 1) / (side_out - 1))`` (half up): ``0, 8, 16, ..., 8k`` for
    ``side_in = 8k + 1`` and ``side_out = k + 1``.
    """
    if side_out == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    i = torch.arange(side_out, dtype=torch.float64, device=device)
    return torch.floor(i * (side_in - 1) / (side_out - 1) + 0.5).long()


def shrink_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest, corner-aligned resize of integer labels [N, H, W] to ``size`` (see :func:`sample_positions`)."""
    h, w = int(size[0]), int(size[1])
    if tuple(labels.shape[-2:]) == (h, w):
        return labels
    rows = sample_positions(labels.shape[-2], h, labels.device)
    cols = sample_positions(labels.shape[-1], w, labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def resize_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest, corner-aligned resize of [N, C, H, W] (e.g. one-hot winner maps) to ``size``."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    rows = sample_positions(x.shape[-2], h, x.device)
    cols = sample_positions(x.shape[-1], w, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def padded_size(size: Sequence[int], pad_to: int | None = None) -> Size:
    """The size an image of ``size`` = (H, W) is padded to: the next grid side per axis, or
    ``pad_to`` (a grid side, e.g. 513) when the image fits in it."""
    h, w = int(size[0]), int(size[1])
    if pad_to is not None:
        if not is_grid_side(pad_to):
            raise ValueError(f"pad_to must be a grid side (8k + 1, e.g. 321 or 513), got {pad_to}")
        return max(pad_to, grid_side(h)), max(pad_to, grid_side(w))
    return grid_side(h), grid_side(w)


def pad_to_grid(x: torch.Tensor, pad_to: int | None = None, value: float = 0.0) -> torch.Tensor:
    """Pad ``[..., H, W]`` at the bottom/right to :func:`padded_size` with ``value``.

    Images are padded with 0 (the mean colour once normalised), labels with the ignore index.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size((h, w), pad_to)
    if (ph, pw) == (h, w):
        return x
    if x.dtype.is_floating_point:
        return F.pad(x, (0, pw - w, 0, ph - h), value=value)
    out = x.new_full((*x.shape[:-2], ph, pw), int(value))
    out[..., :h, :w] = x
    return out


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The top-left ``size`` = (H, W) of ``[..., H', W']`` (undoes :func:`pad_to_grid`)."""
    return x[..., : int(size[0]), : int(size[1])]
