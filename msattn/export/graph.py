"""The whole multi-scale model as one traceable module: what ``msattn export`` turns into ONNX.

:class:`DeployGraph` takes RGB pixels and returns what ``msattn predict`` computes:

1. ``image`` uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` normalised with the
   checkpoint's mean and std (``(x / 255 - mean) / std``, as :func:`normalize_image`);
2. padded at the bottom/right with 0 (the mean colour) to the next 8k+1 side (the model's
   stride: 8 for every backbone);
3. for every scale: resized to ``8 * round(k * s) + 1`` pixels per side (the corner-aligned
   rule of :func:`msattn.geometry.scaled_side`), the shared backbone (VGG-16 LargeFOV, a
   DeepLab-v2 ResNet, EfficientNet-Lite0 or a timm model, with its classifier head);
4. every scale's score map (and the features before the classifier) resized to the grid of
   the largest scale;
5. the merge: max, average, or the attention head and its softmax over scales; for a
   hierarchical model (:mod:`msattn.models.hierarchical`) instead every scale's gate (but the
   highest's) and :func:`msattn.models.hierarchical.chain` with this module's resize, on the
   1.0 grid (the inference scales, any list holding 1.0, are built in);
6. the merged scores upsampled (corner-aligned) to the padded size, softmax, cropped to
   ``H x W``: ``probs`` ``[N, C, H, W]``; the merge weights the same way: ``attention``
   ``[N, S, H, W]`` (bilinear; nearest for max merging); optionally ``labels`` ``[N, H, W]``
   uint8, the argmax.

Sizes are computed from the input's height and width with integer arithmetic only (no
Python floats, no size comparisons), so ``torch.export`` keeps H and W symbolic and the
graph works for every image size. This is the one place outside :mod:`msattn.geometry`
that resizes with ``F.interpolate``: geometry's helpers compare and convert sizes to Python
ints, which would bake the example's size into the graph; :func:`scaled_grid_side` is
checked against :func:`msattn.geometry.scaled_side` by the tests.

Frozen BatchNorm (the default of the ResNet, EfficientNet and timm backbones) computes
``x * scale + shift`` from its constant statistics; the exported graph keeps those few
element-wise operations on constants, which onnxruntime's session optimisations (constant
folding, Conv-Mul/Add fusion) may fold into the convolutions; nothing is folded here (what
onnxruntime does with them was not inspected; ``msattn bench --mode onnx`` times the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msattn.errors import UsageError
from msattn.geometry import STRIDE
from msattn.models.hierarchical import chain
from msattn.models.spec import hierarchical_inference_problem

#: denominators allowed when turning a float scale into a fraction (0.75 -> 3/4)
MAX_DENOMINATOR = 10_000


def scale_fraction(scale: float) -> tuple[int, int]:
    """A scale as (numerator, denominator): 0.75 -> (3, 4), 0.5 -> (1, 2), 2.0 -> (2, 1)."""
    fraction = Fraction(float(scale)).limit_denominator(MAX_DENOMINATOR)
    return fraction.numerator, fraction.denominator


def grid_steps(side: Any, stride: int = STRIDE) -> Any:
    """k of the padded side ``8k + 1`` of an image side (``ceil((side - 1) / 8)``), integer arithmetic."""
    return (side + stride - 2) // stride


def scaled_grid_side(k: Any, scale: float, stride: int = STRIDE) -> Any:
    """Side of a grid side ``8k + 1`` at ``scale``: ``8 * round_half_up(k * scale) + 1``, in integers."""
    p, q = scale_fraction(scale)
    return stride * ((2 * k * p + q) // (2 * q)) + 1


def _resize(x: torch.Tensor, size: Any) -> torch.Tensor:
    """Corner-aligned bilinear resize to a (possibly symbolic) size."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _nearest(x: torch.Tensor, height: Any, width: Any) -> torch.Tensor:
    """Corner-aligned nearest resize (msattn.geometry.resize_nearest) with integer index arithmetic."""

    def positions(side_in: Any, side_out: Any) -> torch.Tensor:
        i = torch.arange(side_out, device=x.device)
        span = torch.sym_max(side_out - 1, 1)
        return (2 * i * (side_in - 1) + span) // (2 * span)  # round(i * (in - 1) / (out - 1)), half up

    rows = positions(x.shape[-2], height)
    cols = positions(x.shape[-1], width)
    return x.index_select(-2, rows).index_select(-1, cols)


class DeployGraph(nn.Module):
    """uint8 RGB images [N, H, W, 3] -> probs [N, C, H, W] (+ attention [N, S, H, W], labels [N, H, W])."""

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float],
        mean: Sequence[float],
        std: Sequence[float],
        argmax: bool = False,
    ) -> None:
        super().__init__()
        scales = tuple(float(s) for s in scales)
        trained = tuple(getattr(model, "scales", scales))
        if getattr(model, "head", None) is not None and sorted(scales) == sorted(trained):
            scales = trained  # the attention head's channels follow the training order (as ScaleNet does)
        self.gate = getattr(model, "gate", None) if len(scales) > 1 else None  # hierarchical: the gate head
        if getattr(model, "gate", None) is not None and hierarchical_inference_problem(scales):
            raise UsageError(f"--scales: {hierarchical_inference_problem(scales)}; add 1.0 (e.g. 2.0, 1.0, 0.5)")
        self.backbone = model.backbone
        self.num_classes = int(model.num_classes)
        self.stride = int(getattr(model, "stride", STRIDE))  # 8 for every backbone msattn builds
        self.head = getattr(model, "head", None) if len(scales) > 1 else None
        self.merge = getattr(model, "merge", "attention") if len(scales) > 1 else "none"
        self.scales = scales
        self.argmax = argmax
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def output_names(self) -> list[str]:
        """Names of the graph's outputs, in order."""
        return ["probs"] + (["attention"] if len(self.scales) > 1 else []) + (["labels"] if self.argmax else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std)  # [N, 3, H, W]
        height, width = x.shape[-2], x.shape[-1]
        kh, kw = grid_steps(height, self.stride), grid_steps(width, self.stride)
        full_h, full_w = self.stride * kh + 1, self.stride * kw + 1
        x = F.pad(x, (0, full_w - width, 0, full_h - height))  # mean colour below and right
        feats, logits = [], []
        for scale in self.scales:
            size = (scaled_grid_side(kh, scale, self.stride), scaled_grid_side(kw, scale, self.stride))
            xs = x if scale == 1.0 else _resize(x, size)
            f, score = self.backbone(xs)
            feats.append(f)
            logits.append(score)
        if self.gate is not None:
            top = self.scales.index(max(self.scales))  # its gate is never used (as the model's eval forward)
            # contiguous: the graph runs channels-last (the input is NHWC), and a channels-last map of one
            # channel (the gate) has strides that torch.export can only order by guarding the width != 1
            gates = [None if i == top else self.gate(f.contiguous()) for i, f in enumerate(feats)]
            out, weights = chain(logits, gates, self.scales, resize=_resize)  # on the 1.0 grid
        else:
            out, weights = self._merge(feats, logits)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        probs = torch.softmax(_resize(out, (full_h, full_w)), dim=1).index_select(2, rows).index_select(3, cols)
        outputs = [probs]
        if weights is not None:
            if self.merge == "max":
                weights = _nearest(weights, full_h, full_w)
            else:
                weights = _resize(weights, (full_h, full_w))
            outputs.append(weights.index_select(2, rows).index_select(3, cols))
        if self.argmax:
            labels = probs.argmax(dim=1)
            outputs.append(labels.to(torch.uint8 if probs.shape[1] <= 256 else torch.int32))
        return tuple(outputs)

    def _merge(
        self, feats: list[torch.Tensor], logits: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ScaleNet's merge on the grid of the largest scale: (merged scores [N,C,h,w], weights [N,S,h,w])."""
        if len(logits) == 1:
            return logits[0], None
        ref = self.scales.index(max(self.scales))
        ref_size = logits[ref].shape[-2:]

        def to_ref(t: torch.Tensor, i: int) -> torch.Tensor:
            return t if i == ref else _resize(t, ref_size)

        stacked = torch.stack([to_ref(s, i) for i, s in enumerate(logits)], dim=1)  # [N, S, C, h, w]
        if self.merge == "max":
            winner = stacked.amax(dim=2).argmax(dim=1, keepdim=True)  # [N, 1, h, w]
            weights = torch.zeros_like(stacked[:, :, 0]).scatter_(1, winner, 1.0)
            return stacked.max(dim=1).values, weights
        if self.merge == "avg" or self.head is None:
            weights = torch.full_like(stacked[:, :, 0], 1.0 / len(logits))
            return stacked.mean(dim=1), weights
        cat = torch.cat([to_ref(f, i) for i, f in enumerate(feats)], dim=1)  # [N, S*F, h, w]
        weights = self.head(cat)  # [N, S, h, w], softmax over scales
        return (stacked * weights.unsqueeze(2)).sum(dim=1), weights
