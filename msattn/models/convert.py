"""ImageNet initialisation: torchvision-layout VGG-16 weights -> DeepLab-LargeFOV.

Convolutions are copied. fc6 (4096 x 25088) is viewed as 4096 filters of 512x7x7 and
*decimated* to 1024 filters of 512x3x3 by keeping every 4th filter and the spatial taps
0, 3, 6 (which, with dilation 12, see the same field of view as the 7x7 kernel on the
stride-32 grid). fc7 (4096 x 4096) keeps every 4th row and column. fc8 and the
attention head are freshly initialised (normal, std 0.01, zero bias).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from msattn.errors import CheckpointError
from msattn.models.weights_files import download_weights, read_state_file

TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

#: indices of the 13 convolutions in torchvision's ``vgg16().features``
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
LARGEFOV_CONV_NAMES = (
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3",
)  # fmt: skip
FC6_FILTER_STEP = 4
FC6_TAPS = (0, 3, 6)
FC7_STEP = 4


def decimate_fc6(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc6 [4096, 25088] -> conv weight [1024, 512, 3, 3] and bias [1024]."""
    w = weight.reshape(4096, 512, 7, 7)[::FC6_FILTER_STEP]
    taps = torch.tensor(FC6_TAPS)
    w = w.index_select(2, taps).index_select(3, taps)
    return w.contiguous(), bias[::FC6_FILTER_STEP].contiguous()


def decimate_fc7(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc7 [4096, 4096] -> conv weight [1024, 1024, 1, 1] and bias [1024]."""
    w = weight[::FC7_STEP, ::FC7_STEP]
    return w.reshape(*w.shape, 1, 1).contiguous(), bias[::FC7_STEP].contiguous()


def convert_vgg16(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision VGG-16 state dict to LargeFOV backbone keys (everything but fc8)."""
    required = [f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")]
    required += [f"classifier.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointError(f"not a torchvision VGG-16 state dict: missing {missing[0]} ({len(missing)} keys missing)")
    out: dict[str, torch.Tensor] = {}
    for index, name in zip(TORCHVISION_CONV_INDICES, LARGEFOV_CONV_NAMES):
        out[f"features.{name}.weight"] = state_dict[f"features.{index}.weight"]
        out[f"features.{name}.bias"] = state_dict[f"features.{index}.bias"]
    out["fc6.weight"], out["fc6.bias"] = decimate_fc6(state_dict["classifier.0.weight"], state_dict["classifier.0.bias"])
    out["fc7.weight"], out["fc7.bias"] = decimate_fc7(state_dict["classifier.3.weight"], state_dict["classifier.3.bias"])
    return out


def load_vgg16_state_dict(source: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load ImageNet VGG-16 weights from a local ``.pth`` file, or (``None``/``"torchvision"``) from the
    torchvision URL, downloaded once into the torch hub cache."""
    if source is None or str(source) == "torchvision":
        return download_weights(TORCHVISION_VGG16_URL, "VGG-16")
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: VGG-16 weights not found (download {TORCHVISION_VGG16_URL} there)")
    return read_state_file(path, "VGG-16")


def init_from_vgg16(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Initialise a ScaleNet (or LargeFOV) from torchvision VGG-16 weights; fc8 and the head are re-drawn."""
    init_from_largefov(model, convert_vgg16(state_dict), "VGG-16", keep_classifier=False)


def init_from_largefov(
    model: nn.Module, converted: dict[str, torch.Tensor], source: str = "weights", keep_classifier: bool = False
) -> None:
    """Initialise from LargeFOV backbone keys (e.g. ``msattn convert-weights`` output); fc8 and the head
    are re-drawn unless ``keep_classifier`` and fc8's shape fits."""
    backbone = getattr(model, "backbone", model)
    own = backbone.state_dict()
    converted = {k: v for k, v in converted.items() if keep_classifier or not k.startswith("fc8.")}
    unknown = sorted(k for k in converted if k not in own)
    if unknown:
        raise CheckpointError(f"{source}: weight {unknown[0]} has no place in DeepLab-LargeFOV")
    for key, value in converted.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: weight {key} has shape {tuple(value.shape)} but the model needs {tuple(own[key].shape)} "
                "(ImageNet initialisation needs width = 1)"
            )
    backbone.load_state_dict(converted, strict=False)
    fresh = [] if "fc8.weight" in converted else [backbone.fc8]
    fresh += [model.head.conv1, model.head.conv2] if getattr(model, "head", None) else []
    for conv in fresh:
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
