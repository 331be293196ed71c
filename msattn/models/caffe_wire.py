"""Reading a Caffe ``.caffemodel`` without Caffe: the protobuf wire format, and only the fields msattn needs.

- ``NetParameter``: ``layer`` (100, ``LayerParameter``) and the old ``layers``
  (2, ``V1LayerParameter``), as DeepLab's Caffe fork writes them;
- ``LayerParameter``: ``name`` (1), ``type`` (2), ``blobs`` (7), and of its parameters only
  ``convolution_param`` (106: ``stride`` 6, ``dilation`` 18) and ``batch_norm_param``
  (139: ``eps`` 3); ``V1LayerParameter``: ``name`` (4), ``type`` (5, an enum), ``blobs`` (6);
- ``BlobProto``: ``num``/``channels``/``height``/``width`` (1-4, legacy shape),
  ``data`` (5, float32, packed or not), ``shape`` (7, ``BlobShape.dim`` = 1),
  ``double_data`` (8).

The converters (:mod:`msattn.models.caffe` for VGG-16 LargeFOV, :mod:`msattn.models.caffe_resnet`
for DeepLab-v2's ResNets) map the layers this module reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msattn.errors import CheckpointError


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
