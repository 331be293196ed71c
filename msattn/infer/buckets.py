"""Size buckets: few input shapes for captured inference graphs.

A CUDA graph replays one fixed input shape, so images are padded (bottom/right, with the
mean colour, like :func:`msattn.geometry.pad_to_grid`) to a **bucket**: per axis the
smallest side of ``step * k + 1`` pixels that holds the image's own padded side. With
``step`` a multiple of 8 every bucket side is a grid side (8k+1), so the output grid stays
exact; with ``step`` a multiple of 32 the 0.75 and 0.5 scales of a bucket are exact grid
sides too, sampled at steps of exactly 1/s pixels (:func:`msattn.geometry.scaled_side`; an
unbucketed side 8k+1 is exact at scale s only when 8k*s is a multiple of 8).

What bucket padding changes: only context. Pixels near the bottom/right edge see more
mean-colour padding (instead of the convolutions' zero padding a few pixels further
out), exactly as with ``--pad-to 513``; predictions are cropped back to the image. With
``step = 0`` the bucket is the image's own padded size (``pad_to`` or the next 8k+1 side):
the eager path of earlier versions, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from msattn.geometry import STRIDE, Size, padded_size

#: default bucket step in pixels: sides 65, 129, ..., 513, 577, ... (64k + 1)
DEFAULT_BUCKET = 64

T = TypeVar("T")


def check_bucket(step: int) -> int:
    """``step`` if it is 0 (no buckets) or a positive multiple of 8; ValueError otherwise."""
    if step < 0 or step % STRIDE:
        raise ValueError(f"a bucket step must be 0 (none) or a multiple of {STRIDE} pixels, got {step}")
    return step


def bucket_side(side: int, step: int) -> int:
    """The smallest side of ``step * k + 1`` pixels that is >= ``side`` (``side`` itself when ``step`` is 0)."""
    check_bucket(step)
    if step == 0:
        return side
    return step * max(1, math.ceil((side - 1) / step)) + 1


def bucket_size(size: Sequence[int], step: int = DEFAULT_BUCKET, pad_to: int | None = None) -> Size:
    """The padded input size for an image of ``size`` = (H, W): its grid size (see
    :func:`msattn.geometry.padded_size`, with ``pad_to``) rounded up per axis to a bucket side."""
    h, w = padded_size(size, pad_to)
    return bucket_side(h, step), bucket_side(w, step)


def pad_to_size(x: torch.Tensor, size: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad ``[..., H, W]`` at the bottom/right to ``size`` (>= (H, W)) with ``value`` (images: 0, the mean)."""
    h, w = x.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if th < h or tw < w:
        raise ValueError(f"cannot pad {h}x{w} to the smaller {th}x{tw}")
    if (th, tw) == (h, w):
        return x
    return F.pad(x, (0, tw - w, 0, th - h), value=value)


def group_by_key(items: Iterable[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """Items grouped by ``key`` (groups in first-seen order, items in input order)."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())
