"""Hierarchical multi-scale attention (Tao, Sapra & Catanzaro 2020) on the share-net.

The method:

- **Gate head** (:class:`GateHead`): on the features the classifier reads (the backbone's
  ``(features, logits)`` pair: LargeFOV's fc7), 3x3 conv + BN + ReLU, 3x3 conv + BN + ReLU,
  1x1 conv to one channel, sigmoid: one gate ``a_s`` in (0, 1) per position of each scale's
  output grid. The head is shared by all scales, like the backbone.
- **Chain** (:func:`chain`): the scales are taken from high to low. The highest scale's
  scores start the prediction; each next scale ``s`` mixes in as
  ``pred = a_s * p_s + (1 - a_s) * pred``, on ``s``'s own grid for ``s >= 1`` (``pred`` is
  resized down to it first) and on the 1.0 grid for ``s < 1`` (``a_s * p_s`` and ``a_s`` are
  resized up to ``pred``'s grid, as two maps). The highest scale's gate is never used. The
  result lies on the 1.0 grid, so 1.0 must be among the scales.
- **Training** runs exactly two scales, one of them 1.0 (the paper: {1.0, 0.5}); the chain is then
  the published ``joint = up(a_lo * p_lo) + (1 - up(a_lo)) * p_1x``. The loss is
  :func:`msattn.models.loss.segmentation_loss` unchanged: cross-entropy of the joint prediction
  plus ``extra_supervision_weight`` times each scale's own (NVIDIA's recipes: 0.05). Inference
  takes any list of scales that holds 1.0 (the paper: {0.5, 1.0, 2.0}).

**Effective weights.** The chain is linear in the score maps: ``out = sum_s L_s(p_s)``, where
``L_s`` multiplies by the later steps' ``(1 - a_t)`` (and its own ``a_s``, unless ``s`` is the
highest scale) and resizes between the grids on the way. :func:`chain` returns
``W_s = L_s(1)``, the chain run with scale ``s``'s scores replaced by ones and every other
scale's by zeros; on the output grid and up to the resizes this is
``W_s = a_s * prod_{t after s} (1 - a_t)`` (``a`` of the highest scale taken as 1). The
``W_s`` are >= 0 and sum to 1 at every position (a telescoping product; bilinear resizing keeps
sums of 1). Wherever the resizes commute with the products (constant regions, positions of one
grid that lie on another, every resize between nested grids such as 2.0 -> 1.0) ``out`` is
exactly ``sum_s W_s * p_s``; elsewhere the two differ by the bilinear interpolation of a
product against the product of interpolations. They are the ``"attention"`` maps that
:class:`msattn.models.scale.ScaleNet` returns, read like the paper's softmax weights.

**Geometry.** Every resize is :func:`msattn.geometry.resize_bilinear` (corner-aligned) between
output grids that span the same image (every scale's input is :func:`msattn.geometry.scaled_size`
of it), so on an image of 8k+1 pixels a side, grid positions that coincide are copied exactly
(the 2.0 grid's even positions are the 1.0 grid).

**Where this differs from NVIDIA's ``network/mscale.py``** (semantic-segmentation, 2020):

- NVIDIA upsamples every scale's scores and gate to that scale's *input pixels* and chains
  there (``pred`` ends at full image resolution); msattn chains on the stride-8 *output
  grids* (``pred`` ends on the 1.0 grid; callers upsample it to the image, as for the other
  merges), so the products are taken before, not after, the final upsampling.
- NVIDIA resizes inputs by ``scale_factor`` and maps with ``align_corners=False`` (its default
  ``MODEL.ALIGN_CORNERS``); msattn uses the corner-aligned 8k+1 geometry of DeepLab.
- NVIDIA's per-scale terms score the low scale's scores upsampled to the 1x size; msattn's
  loss scores each scale on its own grid (``label_mode = "downsample"``, the paper of Chen et
  al.) or upsampled to the labels (``"upsample"``).
- Initialisation: NVIDIA leaves the gate head at PyTorch's default init (its ``init_attn`` is
  commented out); msattn draws the 3x3 convs Kaiming-normal (like the backbone) and the final
  1x1 conv from N(0, 0.01) (like fc8 and the softmax head), so every gate starts near 0.5.
- NVIDIA's head may add dropout (``MSCALE_DROPOUT``, off by default) and uses synchronised BN
  under distributed training; msattn's has no dropout and plain ``BatchNorm2d``.
- In eval mode msattn skips the highest scale's gate (never used; eval-mode BN has no side
  effects); in training mode it computes it as NVIDIA does, so the BN running statistics see
  the 1.0 features too (they serve the 1.0 gate at inference over {2.0, 1.0, 0.5}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from msattn.geometry import resize_bilinear, scaled_size
from msattn.models.spec import hierarchical_inference_problem

#: hidden channels of the gate head (NVIDIA's ``MODEL.SEGATTN_BOT_CH``), before the width multiplier
GATE_HIDDEN = 256

Resize = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


class GateHead(nn.Module):
    """NVIDIA's scale-attention head: 3x3 conv + BN + ReLU, 3x3 conv + BN + ReLU, 1x1 conv, sigmoid.

    ``feats`` [N, F, h, w] -> gates [N, 1, h, w] in (0, 1). The convolutions have no bias
    (batch norm follows the first two; NVIDIA's last one has none either).
    """

    def __init__(self, feature_channels: int, hidden: int = GATE_HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(feature_channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.score = nn.Conv2d(hidden, 1, 1, bias=False)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(self.score.weight, std=0.01)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The gate before the sigmoid, [N, 1, h, w]."""
        x = torch.relu(self.bn1(self.conv1(feats)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.score(x)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(feats))


def chain(
    per_scale: Sequence[torch.Tensor],
    gates: Sequence[torch.Tensor | None],
    scales: Sequence[float],
    resize: Resize = resize_bilinear,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hierarchical merge: (scores [N, C, h, w] on the 1.0 grid, effective weights [N, S, h, w]).

    ``per_scale[i]`` [N, C, h_i, w_i] and ``gates[i]`` [N, 1, h_i, w_i] belong to ``scales[i]``,
    given in any order; the highest scale's gate is not read (it may be None). Weights come
    back in the order of ``scales`` (see the module docstring for what they are). ``resize``
    is the corner-aligned bilinear resize (export passes its own, for symbolic sizes). Python
    control flow depends only on ``scales``, never on tensor values.
    """
    scales = tuple(float(s) for s in scales)
    problem = hierarchical_inference_problem(scales)
    if problem:
        raise ValueError(problem)
    if not len(per_scale) == len(gates) == len(scales):
        raise ValueError(
            f"{len(scales)} scales need as many score maps and gates, got {len(per_scale)} and {len(gates)}"
        )
    order = sorted(range(len(scales)), key=lambda i: -scales[i])  # high to low
    pred = per_scale[order[0]]
    weights = torch.ones_like(pred[:, :1])  # [N, k, h, w]: the weights of the k scales chained so far
    for i in order[1:]:
        p, a = per_scale[i], gates[i]
        if a is None:
            raise ValueError(f"scale {scales[i]:g} is not the highest: its gate is needed")
        if scales[i] >= 1.0:  # down: the chain so far moves to this scale's (coarser) grid
            size = p.shape[-2:]
            pred = a * p + (1 - a) * resize(pred, size)
            weights = torch.cat([(1 - a) * resize(weights, size), a], dim=1)
        else:  # up: this scale's gated scores move to the chain's grid (the 1.0 grid)
            size = pred.shape[-2:]
            a_up = resize(a, size)
            pred = resize(a * p, size) + (1 - a_up) * pred
            weights = torch.cat([(1 - a_up) * weights, a_up], dim=1)
    position = {scale_index: k for k, scale_index in enumerate(order)}
    weights = torch.cat([weights[:, position[i] : position[i] + 1] for i in range(len(scales))], dim=1)
    return pred, weights


def hierarchical_forward(
    backbone: nn.Module, gate: GateHead, images: torch.Tensor, scales: Sequence[float], training: bool
) -> dict:
    """Run the shared backbone and gate head on every scale and chain them (see :class:`ScaleNet`).

    Returns ``{"out", "per_scale", "attention", "gates", "scales"}``: ``out`` on the 1.0 grid,
    ``attention`` the effective weights [N, S, h, w] on that grid (None for one scale),
    ``gates`` each scale's own sigmoid map [N, 1, h_s, w_s] on its own grid, None for the
    highest scale (unused by the chain), all in the order of ``scales``.
    """
    scales = tuple(float(s) for s in scales)
    problem = hierarchical_inference_problem(scales)
    if problem:
        raise ValueError(problem)
    top = scales.index(max(scales))
    per_scale: list[torch.Tensor] = []
    gates: list[torch.Tensor | None] = []
    for i, s in enumerate(scales):
        x = images if s == 1.0 else resize_bilinear(images, scaled_size(images.shape[-2:], s))
        feats, logits = backbone(x)
        per_scale.append(logits)
        if i != top:
            gates.append(gate(feats))
        else:
            if training and len(scales) > 1:  # unused, but its BN statistics are kept, as NVIDIA's are
                gate(feats)
            gates.append(None)
    if len(scales) == 1:
        return {"out": per_scale[0], "per_scale": per_scale, "attention": None, "gates": gates, "scales": scales}
    out, weights = chain(per_scale, gates, scales)
    return {"out": out, "per_scale": per_scale, "attention": weights, "gates": gates, "scales": scales}
