"""DeepLab-LargeFOV: VGG-16, fully convolutional, output stride 8.

Layer names follow the Caffe prototxt (conv1_1 ... fc8) so that weight conversion
and inspection read naturally. pool1-3 are 3x3/2 with padding 1 in ceil mode (a
321x321 input gives a 41x41 output, as in DeepLab); pool4/pool5 are 3x3/1; conv5
uses dilation 2; pool5a, a 3x3/1 average pool (padding 1, the padding counted as in
Caffe), follows pool5; fc6 is a 3x3 convolution with dilation 12 and 1024 channels. On a
side of 8k+1 pixels the output has k+1 positions, output i on input pixel 8i
(:mod:`msattn.geometry`).
"""

from __future__ import annotations

import torch
from torch import nn

from msattn import geometry
from msattn.models.spec import FC6_DILATION

#: (block name, number of 3x3 convs, output channels, dilation, pool stride)
VGG16_BLOCKS: tuple[tuple[str, int, int, int, int], ...] = (
    ("conv1", 2, 64, 1, 2),
    ("conv2", 2, 128, 1, 2),
    ("conv3", 3, 256, 1, 2),
    ("conv4", 3, 512, 1, 1),
    ("conv5", 3, 512, 2, 1),
)
FC_CHANNELS = 1024


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


class LargeFOV(nn.Module):
    """VGG-16 DeepLab-LargeFOV (backbone ``vgg16_largefov``). ``forward`` returns ``(fc7 features, fc8 logits)``.

    ``fc6_dilation`` (12 in DeepLab-LargeFOV: a field of view of 12 output cells = 96 pixels either
    side) can be lowered for images much smaller than DeepLab's 321-513 pixels, where the
    dilated taps would fall outside the output grid (see ``recipes/demo.toml``).
    """

    name = "vgg16_largefov"
    stride = geometry.STRIDE
    grid_exact = True

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        dropout: float = 0.5,
        pool5a: bool = True,
        fc6_dilation: int = FC6_DILATION,
    ) -> None:
        super().__init__()
        if fc6_dilation < 1:
            raise ValueError(f"fc6_dilation must be >= 1, got {fc6_dilation}")
        layers: dict[str, nn.Module] = {}
        in_ch = 3
        for name, n_convs, out_ch, dilation, stride in VGG16_BLOCKS:
            out_ch = scaled(out_ch, width)
            for i in range(1, n_convs + 1):
                layers[f"{name}_{i}"] = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
                layers[f"relu{name[4:]}_{i}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{name[4:]}"] = nn.MaxPool2d(3, stride=stride, padding=1, ceil_mode=True)
        if pool5a:  # DeepLab-LargeFOV's 3x3/1 average pool before fc6 (no parameters)
            layers["pool5a"] = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.features = nn.Sequential()
        for key, layer in layers.items():
            self.features.add_module(key, layer)
        fc_ch = scaled(FC_CHANNELS, width)
        self.fc6 = nn.Conv2d(in_ch, fc_ch, 3, padding=fc6_dilation, dilation=fc6_dilation)
        self.fc7 = nn.Conv2d(fc_ch, fc_ch, 1)
        self.drop6 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop7 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc8 = nn.Conv2d(fc_ch, num_classes, 1)
        self.feature_channels = fc_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    @staticmethod
    def output_side(side: int) -> int:
        """Output side for an input side (:func:`msattn.geometry.output_side`)."""
        return geometry.output_side(side)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(x)  # [N, 512w, H/8, W/8]
        x = self.drop6(torch.relu(self.fc6(x)))
        feats = self.drop7(torch.relu(self.fc7(x)))  # [N, 1024w, H/8, W/8]
        return feats, self.fc8(feats)  # logits [N, C, H/8, W/8]

