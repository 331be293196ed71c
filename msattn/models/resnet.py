"""DeepLab-v2's dilated ResNet-50/101: output stride 8 on msattn's corner-aligned 8k+1 grid.

The trunk is torchvision's ResNet (the same module and parameter names, ``conv1``, ``bn1``,
``layer1.0.conv1``... so torchvision's ImageNet files load as they are) with DeepLab-v2's
changes: layer3 and layer4 keep stride 1 and dilate their 3x3 convolutions by 2 and 4; the
stem's max pool is 3x3/2 with padding 1 in ceil mode (Caffe's pooling). BatchNorm follows
``batchnorm`` (:mod:`msattn.models.norm`; frozen by default, as DeepLab-v2 trains it).

**Stride layout.** torchvision puts a block's stride in its 3x3 convolution (``conv2``), Caffe's
ResNet (He et al.'s models and DeepLab-v2's) in the first 1x1 (``conv1``); ``stride_in_1x1``
chooses Caffe's, which its converted weights need (:mod:`msattn.models.caffe_resnet`). The
dilation of the first block of layer3/layer4 follows the layout, as an a-trous conversion must:
in Caffe's layout its 3x3 runs after the (removed) stride, so it is dilated like the rest of the
layer (DeepLab-v2: every ``res4*_branch2b`` has dilation 2); in torchvision's the 3x3 *was* the
strided convolution, so it keeps the previous dilation (as torchvision's own dilated ResNets).

**Geometry.** Every stride-2 layer has an odd kernel centred by its padding (7x7 pad 3,
3x3 pad 1, 1x1 pad 0), so output ``j`` of each sits on input pixel ``2j``: a side of ``8k + 1``
pixels gives ``k + 1`` outputs, output ``i`` on pixel ``8i``, as DeepLab-LargeFOV. Other sides
follow :meth:`ResNetTrunk.output_side` (the conv stem floors where LargeFOV's pools ceil, so an
even side may give one output less than :func:`msattn.geometry.output_side`).
"""

from __future__ import annotations

import torch
from torch import nn

from msattn.models.backbone import scaled
from msattn.models.norm import NormFactory, norm_factory

#: blocks per layer
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
EXPANSION = 4
#: (stride, dilation) of layer1..layer4 at output stride 8 (DeepLab-v2)
LAYER_STRIDES = ((1, 1), (2, 1), (1, 2), (1, 4))


def conv_side(side: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, ceil: bool = False) -> int:
    """Output side of a convolution or pool (PyTorch's rule, ceil mode included)."""
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= side + padding:  # the last window must start inside the input
        out -= 1
    return max(out, 0)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (dilated), 1x1 expand, plus the shortcut; torchvision's names."""

    def __init__(
        self, inplanes: int, planes: int, stride: int, dilation: int, first_dilation: int,
        downsample: nn.Module | None, norm: NormFactory, stride_in_1x1: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        d3 = dilation if stride_in_1x1 else first_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=d3, dilation=d3, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = norm(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """conv1 .. layer4 of a dilated ResNet at output stride 8; ``forward`` -> layer4's features."""

    grid_exact = True  # output i on input pixel 8i for 8k+1 sides

    def __init__(self, depth: str = "resnet101", width: float = 1.0, batchnorm: str = "frozen",
                 stride_in_1x1: bool = False) -> None:  # fmt: skip
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet {depth!r}: one of {', '.join(RESNET_LAYERS)}")
        norm = norm_factory(batchnorm)
        self.stride_in_1x1 = stride_in_1x1
        self.inplanes = scaled(64, width)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        previous = 1
        for index, (blocks, (stride, dilation)) in enumerate(zip(RESNET_LAYERS[depth], LAYER_STRIDES)):
            planes = scaled(64 * 2**index, width)
            self.add_module(f"layer{index + 1}", self._layer(planes, blocks, stride, dilation, previous, norm))
            previous = dilation
        self.out_channels = self.inplanes
        self._init_weights()

    def _layer(self, planes: int, blocks: int, stride: int, dilation: int, previous: int, norm: NormFactory) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * EXPANSION, 1, stride=stride, bias=False), norm(planes * EXPANSION)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, previous, downsample, norm, self.stride_in_1x1)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes, 1, dilation, dilation, None, norm, self.stride_in_1x1)
                   for _ in range(1, blocks)]  # fmt: skip
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @staticmethod
    def output_side(side: int) -> int:
        """Output side for an input side (``8k + 1 -> k + 1``)."""
        side = conv_side(side, 7, 2, 3)
        side = conv_side(side, 3, 2, 1, ceil=True)
        return conv_side(side, 1, 2, 0)  # layer2's stride (1x1 pad 0 and 3x3 pad 1 agree)


def resnet_layer_dilations(trunk: ResNetTrunk) -> list[tuple[str, int, int]]:
    """(name, stride, dilation) of every 3x3 convolution, for tests and documentation."""
    return [(name, m.stride[0], m.dilation[0]) for name, m in trunk.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]  # fmt: skip
