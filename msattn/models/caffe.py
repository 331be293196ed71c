"""DeepLab's Caffe weights (``init.caffemodel``) -> LargeFOV, without Caffe.

A ``.caffemodel`` is a Caffe ``NetParameter`` protobuf. This module reads the protobuf
wire format itself (varints, length-delimited fields, packed floats), and only the
fields it needs:

- ``NetParameter``: ``layer`` (100, ``LayerParameter``) and the old ``layers``
  (2, ``V1LayerParameter``), as DeepLab's Caffe fork writes them;
- ``LayerParameter``: ``name`` (1), ``type`` (2), ``blobs`` (7), and of its parameters only
  ``convolution_param`` (106: ``stride`` 6, ``dilation`` 18) and ``batch_norm_param``
  (139: ``eps`` 3), which the ResNet converter checks (:mod:`msattn.models.caffe_resnet`);
  ``V1LayerParameter``: ``name`` (4), ``type`` (5, an enum), ``blobs`` (6);
- ``BlobProto``: ``num``/``channels``/``height``/``width`` (1-4, legacy shape),
  ``data`` (5, float32, packed or not), ``shape`` (7, ``BlobShape.dim`` = 1),
  ``double_data`` (8).

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

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.errors import CheckpointError
from msattn.models.convert import LARGEFOV_CONV_NAMES, decimate_fc6, decimate_fc7

FORMAT = "msattn-caffe-weights"
#: Caffe's VGG-16 / DeepLab mean, in BGR order as Caffe uses it
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, type and blobs (float32 arrays in their Caffe shape)."""

    name: str
    type: str
    blobs: list[np.ndarray]
    stride: int | None = None  # convolution_param.stride, when the file records it
    dilation: int | None = None  # convolution_param.dilation, likewise
    eps: float | None = None  # batch_norm_param.eps, likewise


# ----------------------------------------------------------------------------- protobuf wire format


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field number, wire type, value)`` of a message: ints for varint/fixed, memoryviews for bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise WireError(f"field {number}: length {length} runs past the end")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise WireError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        out.append(value)
    return out


def parse_blob(buf: memoryview) -> np.ndarray:
    """A ``BlobProto`` as a float32 array in its Caffe shape."""
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    for number, wire, value in fields(buf):
        if number in legacy and wire == 0:
            legacy[number] = value
        elif number == 5:  # data: packed (wire 2) or one float per field (wire 5)
            chunks.append(np.frombuffer(bytes(value), dtype="<f4"))
        elif number == 8:
            chunks.append(np.frombuffer(bytes(value), dtype="<f8").astype(np.float32))
        elif number == 7 and wire == 2:
            shape = []
            for n, w, v in fields(value):
                if n == 1:
                    shape += _packed_varints(v) if w == 2 else [v]
    data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if shape is None:
        shape = [legacy[k] for k in (1, 2, 3, 4)]
        while len(shape) > 1 and shape[0] == 1 and int(np.prod(shape[1:])) == data.size:
            shape = shape[1:]  # legacy blobs are 4-D: 1 x 1 x 1 x n for a bias
    if int(np.prod(shape)) != data.size:
        raise WireError(f"blob of shape {shape} holds {data.size} values")
    return data.astype(np.float32, copy=False).reshape(shape)


_V1_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}


def _first_uint(buf: memoryview, number: int) -> int | None:
    """The first value of a (possibly packed) repeated uint32 field of a message, or None."""
    for n, wire, value in fields(buf):
        if n == number:
            return (_packed_varints(value) or [None])[0] if wire == 2 else int(value)
    return None


def _float_field(buf: memoryview, number: int) -> float | None:
    for n, wire, value in fields(buf):
        if n == number and wire == 5:
            return float(np.frombuffer(bytes(value), dtype="<f4")[0])
    return None


def parse_layer(buf: memoryview, v1: bool) -> CaffeLayer:
    """A ``LayerParameter`` (or ``V1LayerParameter`` with ``v1``)."""
    name_field, type_field, blob_field = (4, 5, 6) if v1 else (1, 2, 7)
    layer = CaffeLayer("", "", [])
    for number, wire, value in fields(buf):
        if number == name_field and wire == 2:
            layer.name = bytes(value).decode("utf-8", errors="replace")
        elif number == type_field:
            layer.type = _V1_TYPES.get(value, str(value)) if v1 else bytes(value).decode("utf-8", errors="replace")
        elif number == blob_field and wire == 2:
            layer.blobs.append(parse_blob(value))
        elif number == 106 and wire == 2 and not v1:  # ConvolutionParameter
            layer.stride, layer.dilation = _first_uint(value, 6), _first_uint(value, 18)
        elif number == 139 and wire == 2 and not v1:  # BatchNormParameter
            layer.eps = _float_field(value, 3)
    return layer


def read_caffemodel(path: str | Path) -> list[CaffeLayer]:
    """Every layer of a ``.caffemodel`` that has blobs; malformed files raise CheckpointError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: caffemodel not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    layers: list[CaffeLayer] = []
    try:
        for number, wire, value in fields(memoryview(data)):
            if number in (100, 2) and wire == 2:
                layer = parse_layer(value, v1=number == 2)
                if layer.blobs:
                    layers.append(layer)
    except WireError as exc:
        raise CheckpointError(f"{path}: not a Caffe model (malformed protobuf: {exc})") from None
    if not layers:
        raise CheckpointError(f"{path}: not a Caffe model with weights (no layer has blobs)")
    return layers


# ----------------------------------------------------------------------------- conversion


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
    from msattn.models.caffe_resnet import convert_resnet_layers, is_resnet_caffemodel

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
    from msattn.io import file_sha256

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
    from rich.console import Console

    from msattn.errors import UsageError
    from msattn.io import atomic_write

    source, out = Path(source), Path(out)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise UsageError(f"{out}: --out is the input caffemodel; choose another file")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out needs a file name such as init.pt")
    from msattn.outputs import check_output_file

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

