"""Every backbone of the share-net, built from a :class:`~msattn.models.spec.ModelSpec`.

A backbone maps an image to ``(features, logits)`` at output stride 8: ``features`` feed the
attention head (the layer before the classifier), ``logits`` the merge. Each has
``feature_channels``, ``stride`` (8: msattn's one geometry, for tiling and export) and
``output_side(side)`` (``8k + 1 -> k + 1``), and its ``name`` (the spec's ``backbone``).

- ``vgg16_largefov``: DeepLab-LargeFOV (:class:`msattn.models.backbone.LargeFOV`), the paper's.
- ``resnet101``, ``resnet50``: DeepLab-v2's dilated ResNet (:mod:`msattn.models.resnet`).
- ``efficientnet_lite0``: EfficientNet-Lite0 at stride 8 (:mod:`msattn.models.efficientnet`).
- ``timm:<name>``: a timm features model (:mod:`msattn.models.timm_backbone`).

All but VGG-16 are a trunk (``backbone.trunk``) and a classifier head: ``"aspp"`` (DeepLab-v2's
ASPP-L, ``backbone.aspp.c0..c3``: 3x3 convolutions with dilation 6/12/18/24 from the trunk's
features straight to the classes, summed; the features before it are the trunk's) or
``"largefov"`` (``backbone.fc6``/``fc7``/``fc8``, as VGG-16's: the features are fc7's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msattn import geometry
from msattn.models.backbone import FC_CHANNELS, LargeFOV, scaled
from msattn.models.efficientnet import EfficientNetLiteTrunk
from msattn.models.resnet import ResNetTrunk
from msattn.models.spec import DEFAULT_BACKBONE, RESNETS, TIMM_PREFIX, ModelSpec, check_backbone
from msattn.models.timm_backbone import TimmTrunk, timm_name

#: parameter-name prefixes of the classifier (DeepLab's lr x10 group), under ``backbone.``
CLASSIFIER_PREFIXES = ("fc8.", "aspp.")


class ASPP(nn.Module):
    """DeepLab-v2's ASPP-L: one 3x3 convolution per dilation, features -> classes, summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.dilations = tuple(dilations)
        for index, d in enumerate(self.dilations):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d)
            nn.init.normal_(conv.weight, std=0.01)  # DeepLab-v2's fc1_* filler
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{index}", conv)

    def branches(self) -> list[nn.Conv2d]:
        return [getattr(self, f"c{i}") for i in range(len(self.dilations))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self.branches()
        out = convs[0](x)
        for conv in convs[1:]:
            out = out + conv(x)
        return out


class SegmentationBackbone(nn.Module):
    """A stride-8 trunk and a classifier head; ``forward`` -> ``(features, logits)``."""

    stride = geometry.STRIDE

    def __init__(self, name: str, trunk: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.head_kind = spec.head
        channels = int(trunk.out_channels)
        if spec.head == "aspp":
            self.aspp = ASPP(channels, spec.num_classes, spec.aspp_dilations)
            self.feature_channels = channels
        else:  # DeepLab-LargeFOV's fc6 (3x3, dilated) / fc7 (1x1) / fc8 on the trunk
            fc = scaled(FC_CHANNELS, spec.width)
            d = spec.fc6_dilation
            self.fc6 = nn.Conv2d(channels, fc, 3, padding=d, dilation=d)
            self.fc7 = nn.Conv2d(fc, fc, 1)
            self.drop6 = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
            self.drop7 = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
            self.fc8 = nn.Conv2d(fc, spec.num_classes, 1)
            for conv in (self.fc6, self.fc7):
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            nn.init.normal_(self.fc8.weight, std=0.01)
            nn.init.zeros_(self.fc8.bias)
            self.feature_channels = fc

    @property
    def grid_exact(self) -> bool:
        """Whether output i sits on input pixel 8i for 8k+1 sides (timm models may not)."""
        return bool(getattr(self.trunk, "grid_exact", True))

    def classifier(self) -> list[nn.Conv2d]:
        """The layers that produce the logits (re-drawn for another class count)."""
        return self.aspp.branches() if self.head_kind == "aspp" else [self.fc8]

    def output_side(self, side: int) -> int:
        return int(self.trunk.output_side(side))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(x)
        if self.head_kind == "aspp":
            return feats, self.aspp(feats)
        x = self.drop6(torch.relu(self.fc6(feats)))
        feats = self.drop7(torch.relu(self.fc7(x)))
        return feats, self.fc8(feats)


def build_trunk(spec: ModelSpec, timm_module: Any = None) -> nn.Module:
    """The trunk of a non-VGG backbone (``timm_module`` stands in for timm, e.g. in tests)."""
    if spec.backbone in RESNETS:
        return ResNetTrunk(spec.backbone, spec.width, spec.batchnorm, spec.stride_in_1x1)
    if spec.backbone == "efficientnet_lite0":
        return EfficientNetLiteTrunk(spec.width, spec.batchnorm)
    if spec.backbone.startswith(TIMM_PREFIX):
        return TimmTrunk(timm_name(spec.backbone), spec.batchnorm, timm_module)
    check_backbone(spec.backbone)  # raises for unknown names
    raise ValueError(f"the {spec.backbone} backbone has no trunk")


def build_backbone(spec: ModelSpec, timm_module: Any = None) -> nn.Module:
    """The backbone a spec describes (``timm_module``: a stand-in for timm, for ``timm:`` backbones)."""
    if spec.backbone == DEFAULT_BACKBONE:
        return LargeFOV(spec.num_classes, width=spec.width, dropout=spec.dropout, pool5a=spec.pool5a,
                        fc6_dilation=spec.fc6_dilation)  # fmt: skip
    return SegmentationBackbone(spec.backbone, build_trunk(spec, timm_module), spec)


def classifier_layers(backbone: nn.Module) -> list[nn.Conv2d]:
    """The classifier convolutions of any backbone (VGG-16's fc8; ASPP's branches; a LargeFOV head's fc8)."""
    if isinstance(backbone, SegmentationBackbone):
        return backbone.classifier()
    return [backbone.fc8]
