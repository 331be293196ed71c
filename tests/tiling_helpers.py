"""Helpers for the tiling and export tests: a tiny model with confident, local predictions and a scene."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from msattn.models.scale import build_model

#: normalised colours of the three classes of :func:`scene` (background, "red", "green")
COLOURS = torch.tensor([[0.0, 0.0, 0.0], [1.5, -1.0, -1.0], [-1.0, 1.5, -1.0]])


@torch.no_grad()
def local_model(scales=(1.0, 0.5), merge: str = "attention", gain: float = 4.0) -> nn.Module:
    """A width-1/16 model whose scores depend on local colour only (3 classes).

    Every convolution is zero except centre taps that carry relu(R - G) in channel 0 and
    relu(G - R) in channel 1 from conv1_1 to fc7; fc8 reads them (class 0 wins elsewhere).
    Only the pooling layers spread information (about +-31 pixels at scale 1), so its labels
    are confident and a tile with a few dozen pixels of context reproduces them, unlike a
    random network whose near-uniform scores flip with any change of context. The attention
    head keeps its random weights.
    """
    torch.manual_seed(0)
    model = build_model(3, scales=scales, merge=merge, width=0.0625, dropout=0.0, attention_dropout=0.0).eval()
    convs = [m for m in model.backbone.features if isinstance(m, nn.Conv2d)] + [model.backbone.fc6, model.backbone.fc7]
    for conv in convs:
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        if conv is convs[0]:
            conv.weight[0, 0, k, k], conv.weight[0, 1, k, k] = 1.0, -1.0
            conv.weight[1, 0, k, k], conv.weight[1, 1, k, k] = -1.0, 1.0
        else:
            conv.weight[0, 0, k, k] = conv.weight[1, 1, k, k] = 1.0
    fc8 = model.backbone.fc8
    fc8.weight.zero_()
    fc8.bias.zero_()
    fc8.bias[0] = gain
    fc8.weight[1, 0, 0, 0] = fc8.weight[2, 1, 0, 0] = gain
    return model


def scene(height: int, width: int, rectangles: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image [1, 3, H, W] of coloured rectangles with a little noise, and its labels [H, W]."""
    rng = np.random.default_rng(seed)
    labels = torch.zeros(height, width, dtype=torch.long)
    for _ in range(rectangles):
        h, w = rng.integers(20, max(21, height // 2), 2)
        top, left = rng.integers(0, max(1, height - h)), rng.integers(0, max(1, width - w))
        labels[top : top + h, left : left + w] = int(rng.integers(1, 3))
    noise = torch.from_numpy(rng.normal(size=(3, height, width))).float()
    image = COLOURS[labels].permute(2, 0, 1) + 0.1 * noise
    return image[None], labels
