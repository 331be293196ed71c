"""A stand-in for timm (imported by the timm and backbone-matrix tests): ``create_model`` of a few tiny
features models with timm's signature, ``feature_info`` and BatchNorm layers."""

from __future__ import annotations

import torch
from torch import nn


class FeatureInfo:
    def __init__(self, channels: list[int], reductions: list[int]) -> None:
        self._channels, self._reductions = channels, reductions

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)


class FakeFeatures(nn.Module):
    """Stands in for timm's FeatureListNet: a list of feature maps, ``feature_info``, BatchNorm layers."""

    def __init__(self, strides: tuple[int, ...] = (2, 2, 2), stem: tuple[int, int] = (3, 1)) -> None:
        super().__init__()
        channels, layers, in_ch = [4, 6, 8], [], 3
        for index, (ch, stride) in enumerate(zip(channels, strides)):
            kernel, pad = stem if index == 0 else (3, 1)
            layers.append(nn.Sequential(nn.Conv2d(in_ch, ch, kernel, stride, pad, bias=False), nn.BatchNorm2d(ch),
                                        nn.ReLU()))  # fmt: skip
            in_ch = ch
        self.stages = nn.ModuleList(layers)
        reductions, r = [], 1
        for s in strides:
            r *= s
            reductions.append(r)
        self.feature_info = FeatureInfo(channels, reductions)
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "tag": "fake_in1k"}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class FakeTimm:
    """A module-like object with ``create_model`` (timm's signature, the few models below)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def create_model(self, name: str, pretrained: bool = False, **kwargs) -> nn.Module:
        self.calls.append({"name": name, "pretrained": pretrained, **kwargs})
        if name == "vit_like":
            raise RuntimeError("features_only not implemented for Vision Transformer models.")
        model = {"small": lambda: FakeFeatures(), "no_dilation": lambda: FakeFeatures((2, 2, 4)),
                 "patchify": lambda: FakeFeatures((4, 2, 1), stem=(4, 0))}[name]()  # fmt: skip
        if pretrained:
            torch.manual_seed(123)
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.uniform_(0.5, 1.5)
        return model
