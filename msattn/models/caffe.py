"""DeepLab's Caffe weights (``init.caffemodel``) -> LargeFOV, without Caffe.

A ``.caffemodel`` is a Caffe ``NetParameter`` protobuf, read without Caffe by
:mod:`msattn.models.caffe_wire`.

Layers are mapped by name (``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7`` and, when its
shape fits, a ``fc8*`` classifier) and every shape is checked. A caffemodel with DeepLab-v2's
ResNet layers (``res2a_branch2a``...) goes to :func:`msattn.models.caffe_resnet.convert_resnet_layers`. fc6/fc7 may be DeepLab's
decimated 1024-channel layers or VGG-16's 4096-wide ones (then decimated as in
:mod:`msattn.models.convert`).

**Input convention.** Caffe's VGG-16 takes BGR images in 0..255 minus the mean
(B 104.008, G 116.669, R 122.675). The converter reverses conv1_1's input channels, so
the converted network takes **RGB** images in 0..255 minus the same mean per colour:
exactly the same function of the image, with msattn's RGB loaders. The file records this
as ``input_norm = "caffe"``; training from it uses that normalisation (``data.mean`` =
the Caffe mean / 255, ``data.std`` = 1/255), and every checkpoint carries it on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from msattn.errors import CheckpointError, UsageError
from msattn.io import atomic_write, file_sha256
from msattn.models.caffe_resnet import convert_resnet_layers, is_resnet_caffemodel
from msattn.models.caffe_wire import CaffeLayer, read_caffemodel
from msattn.models.convert import LARGEFOV_CONV_NAMES, decimate_fc6, decimate_fc7
from msattn.outputs import check_output_file

FORMAT = "msattn-caffe-weights"
#: Caffe's VGG-16 / DeepLab mean, in BGR order as Caffe uses it
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def _pair(layer: CaffeLayer, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if len(layer.blobs) < 2:
        raise CheckpointError(f"{path}: layer {layer.name} has {len(layer.blobs)} blob(s), expected weight and bias")
    weight, bias = layer.blobs[0], layer.blobs[1].reshape(-1)
    if bias.shape[0] != weight.shape[0]:
        raise CheckpointError(
            f"{path}: layer {layer.name} has {weight.shape[0]} filters but {bias.shape[0]} biases"
        )
    return weight, bias


def _tensor(array: np.ndarray, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array if shape is None else array.reshape(shape)))


def _convs(by_name: dict[str, CaffeLayer], path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """conv1_1 ... conv5_3: 3x3 filters chaining 3 -> ... channels; returns the state and conv5's channels."""
    state: dict[str, torch.Tensor] = {}
    in_ch = 3
    for name in LARGEFOV_CONV_NAMES:
        weight, bias = _pair(by_name[name], path)
        if weight.ndim != 4 or weight.shape[1:] != (in_ch, 3, 3):
            raise CheckpointError(
                f"{path}: layer {name} has weight {tuple(weight.shape)}, expected (N, {in_ch}, 3, 3)"
            )
        if name == "conv1_1":
            weight = weight[:, ::-1]  # BGR -> RGB input channels
        state[f"features.{name}.weight"], state[f"features.{name}.bias"] = _tensor(weight), _tensor(bias)
        in_ch = weight.shape[0]
    return state, in_ch


def _fc_layers(by_name: dict[str, CaffeLayer], conv5: int, path: Path) -> dict[str, torch.Tensor]:
    """fc6/fc7: DeepLab's dilated 3x3 and 1x1 layers as they are, or VGG-16's 4096-wide ones decimated."""
    w6, b6 = _pair(by_name["fc6"], path)
    w7, b7 = _pair(by_name["fc7"], path)
    out: dict[str, torch.Tensor] = {}
    if w6.ndim == 4 and w6.shape[1:] == (conv5, 3, 3):  # DeepLab-LargeFOV's fc6 (3x3, dilation 12)
        out["fc6.weight"], out["fc6.bias"] = _tensor(w6), _tensor(b6)
        fc = w6.shape[0]
        if w7.size != fc * fc:
            raise CheckpointError(f"{path}: layer fc7 has weight {tuple(w7.shape)}, expected ({fc}, {fc}, 1, 1)")
        out["fc7.weight"], out["fc7.bias"] = _tensor(w7, (fc, fc, 1, 1)), _tensor(b7)
    elif w6.size == 4096 * 512 * 49 and w7.size == 4096 * 4096:  # VGG-16's fully connected fc6/fc7
        out["fc6.weight"], out["fc6.bias"] = decimate_fc6(_tensor(w6, (4096, 25088)), _tensor(b6))
        out["fc7.weight"], out["fc7.bias"] = decimate_fc7(_tensor(w7, (4096, 4096)), _tensor(b7))
    else:
        raise CheckpointError(
            f"{path}: layer fc6 has weight {tuple(w6.shape)}: neither DeepLab's (N, {conv5}, 3, 3) nor VGG-16's "
            "4096 x 25088"
        )
    return out


def convert_caffemodel(path: str | Path) -> dict[str, Any]:
    """Read DeepLab's ``init.caffemodel`` (or any VGG-16 LargeFOV caffemodel, or a DeepLab-v2 ResNet
    caffemodel) into an msattn weights file dict.

    Returns ``{"format", "backbone", "input_norm": "caffe", "state_dict": backbone keys, "source",
    "sha256", "layers": mapped names, "ignored": other layers}`` (ResNets add ``stride_in_1x1`` and
    ``head``). conv1_1 (a ResNet's conv1) is stored for RGB input.
    Shapes are checked against each other (3 input channels, each layer taking the previous
    one's channels); the model they are loaded into checks them against its own.
    """
    path = Path(path)
    layers = read_caffemodel(path)
    if is_resnet_caffemodel(layers):
        return _weights_file(path, convert_resnet_layers(layers, path))
    by_name = {layer.name: layer for layer in layers}
    missing = [n for n in (*LARGEFOV_CONV_NAMES, "fc6", "fc7") if n not in by_name]
    if missing:
        raise CheckpointError(
            f"{path}: not a VGG-16 / DeepLab-LargeFOV caffemodel: no layer {missing[0]} "
            f"({len(missing)} of the 15 layers missing; found {', '.join(sorted(by_name)[:6])}...)"
        )
    state, conv5 = _convs(by_name, path)
    state.update(_fc_layers(by_name, conv5, path))
    mapped = [*LARGEFOV_CONV_NAMES, "fc6", "fc7"]
    fc = state["fc7.weight"].shape[0]
    classifier = next((n for n in by_name if n.startswith("fc8")), None)
    if classifier is not None:
        weight, bias = _pair(by_name[classifier], path)
        if weight.size == weight.shape[0] * fc:  # a LargeFOV classifier (e.g. fc8_voc12); ImageNet's fc8 is not
            state["fc8.weight"], state["fc8.bias"] = _tensor(weight, (weight.shape[0], fc, 1, 1)), _tensor(bias)
            mapped.append(classifier)
    converted = {"layers": mapped, "ignored": [n for n in by_name if n not in mapped], "state_dict": state}
    return _weights_file(path, converted)


def _weights_file(path: Path, converted: dict[str, Any]) -> dict[str, Any]:
    """The msattn weights file dict around a conversion's ``layers``/``ignored``/``state_dict`` (+ backbone keys)."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "backbone": "vgg16_largefov",
        "input_norm": "caffe",
        "input_mean_bgr": list(CAFFE_MEAN_BGR),
        "source": str(path),
        "sha256": file_sha256(path),
        **converted,
    }


def is_converted_weights(state: Any) -> bool:
    """True for a dict written by :func:`convert_caffemodel` (``msattn convert-weights``)."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def _converted_file(path: Path) -> bool:
    """Whether ``path`` is an earlier ``msattn convert-weights`` output (so it may be replaced)."""
    try:
        return is_converted_weights(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def convert_weights_command(source: Path, out: Path) -> dict[str, Any]:
    """``msattn convert-weights``: write the converted weights to ``out`` (atomically; never over ``source``)."""
    source, out = Path(source), Path(out)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UsageError(f"{out}: --out is the input caffemodel; choose another file")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out needs a file name such as init.pt")
    check_output_file(out, "--out", inputs=[source], ours=_converted_file)  # never over a file it did not write
    converted = convert_caffemodel(source)
    with atomic_write(out, "wb") as handle:
        torch.save(converted, handle)
    console = Console(highlight=False, soft_wrap=True)
    n = sum(v.numel() for v in converted["state_dict"].values())
    console.print(
        f"converted {len(converted['layers'])} layers ({n:,} values) of {source} -> {out} "
        f"(backbone {converted['backbone']})",
        markup=False,
    )
    if converted["ignored"]:
        console.print(f"not used: {', '.join(converted['ignored'])}", markup=False)
    first = "conv1_1" if converted["backbone"] == "vgg16_largefov" else "conv1"
    console.print(
        f'input convention: RGB, 0..255 minus the Caffe mean ({first} reordered from BGR); recipes using '
        f'model.pretrained = "{out}" normalise that way (model.input_norm = "caffe")',
        markup=False,
    )
    if converted["backbone"] != "vgg16_largefov":
        console.print(
            f'recipe: model.backbone = "{converted["backbone"]}" (Caffe layout: the stride in the 1x1 convolution, '
            "taken from the weights)",
            markup=False,
        )
    return converted

