"""DeepLab-v2's ResNet caffemodels -> msattn's ``resnet101``/``resnet50`` backbone, without Caffe.

Reads the ImageNet ``init.caffemodel`` of DeepLab-v2's ResNet-101 and its released VOC/COCO
models (the protobuf reader of :mod:`msattn.models.caffe`). Layers are mapped by name, every
shape is checked against the network the file describes:

- ``conv1``, ``bn_conv1``/``scale_conv1`` -> ``trunk.conv1``, ``trunk.bn1``;
- ``res{S}{B}_branch{X}`` and its ``bn``/``scale`` pair -> ``trunk.layer{S-1}.{block}``: ``X`` = 1
  is the projection shortcut (``downsample.0``/``.1``), ``2a``/``2b``/``2c`` are
  ``conv1``/``conv2``/``conv3`` (``bn1``...); blocks are letters (``res2a``, ``res2b``...) or
  ``b1``, ``b2``... after ``a`` (ResNet-101's ``res4b22``);
- ``fc1_*_c0`` .. ``c3`` (``fc1_voc12_c0``, COCO's ``fc1_c0``...) -> the ASPP-L branches
  ``aspp.c0..c3`` (their class count is the file's);
- MSC prototxts share weights over scales under suffixed names (``res2a_branch2a_res075``,
  ``fc1_voc12_c0_res05``...): a name maps by its base name, and every copy must equal the first;
- anything else (ImageNet's ``fc1000``, layers without blobs) is listed as ignored.

**BatchNorm + Scale -> frozen BatchNorm.** Caffe's BatchNorm layer stores the running sums
``mean * f`` and ``var * f`` and the factor ``f`` (a 1-element blob; 0 means no statistics):
mean and variance are the first two blobs divided by the third. The Scale layer after it holds
gamma and beta. Caffe adds ``eps`` (``batch_norm_param.eps``, default 1e-5) to the variance; an
eps other than msattn's 1e-5 is folded into the stored variance, which is exact for frozen BatchNorm.

**Layout and input.** Caffe's ResNet strides in the first 1x1 convolution of a block
(``stride_in_1x1 = True``, read from ``res3a_branch2a``'s stride where the file records it),
and takes BGR 0..255 minus the mean: conv1's input channels are reversed so the converted
network takes RGB with the same mean subtracted (``input_norm = "caffe"``), as for VGG-16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.errors import CheckpointError
from msattn.models.caffe_wire import CaffeLayer
from msattn.models.resnet import RESNET_LAYERS, ResNetTrunk

#: msattn's BatchNorm epsilon (Caffe's default)
BN_EPS = 1e-5
_MSC_SUFFIX = re.compile(r"_res\d+$")
_BRANCH = re.compile(r"^(res|bn|scale)([2-5])([a-z])(\d*)_branch(1|2[abc])$")
_ASPP = re.compile(r"^fc1(?:_[A-Za-z0-9]+)*_c(\d)$")
_BRANCH_MODULES = {"1": ("downsample.0", "downsample.1"), "2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"),
                   "2c": ("conv3", "bn3")}  # fmt: skip


def base_name(name: str) -> str:
    """A layer's name without the MSC scale suffix: ``res2a_branch2a_res075`` -> ``res2a_branch2a``."""
    return _MSC_SUFFIX.sub("", name)


def is_resnet_caffemodel(layers: list[CaffeLayer]) -> bool:
    """Whether the layers are a ResNet's (Caffe naming: ``res2a_branch2a``)."""
    return any(base_name(layer.name) == "res2a_branch2a" for layer in layers)


def _block_index(letter: str, number: str) -> int:
    """``a`` -> 0, ``b`` -> 1, ``c`` -> 2 ...; ``b1`` -> 1, ``b22`` -> 22 (ResNet-101's numbering after ``a``)."""
    return int(number) if number else ord(letter) - ord("a")


def target_module(name: str) -> tuple[str, str] | None:
    """(msattn module under the backbone, kind) for a Caffe layer's base name: kind is conv, bn or scale."""
    if name == "conv1":
        return "trunk.conv1", "conv"
    if name in ("bn_conv1", "scale_conv1"):
        return "trunk.bn1", name.split("_")[0]
    match = _BRANCH.match(name)
    if match:
        kind, stage, letter, number, branch = match.groups()
        if number and letter != "b":
            return None
        conv, bn = _BRANCH_MODULES[branch]
        block = f"trunk.layer{int(stage) - 1}.{_block_index(letter, number)}"
        return (f"{block}.{conv}", "conv") if kind == "res" else (f"{block}.{bn}", kind)
    match = _ASPP.match(name)
    if match:
        return f"aspp.c{match.group(1)}", "aspp"
    return None


def _unique_layers(layers: list[CaffeLayer], path: Path) -> dict[str, CaffeLayer]:
    """Layers by base name; MSC copies must hold the same values as the first."""
    by_name: dict[str, CaffeLayer] = {}
    for layer in layers:
        base = base_name(layer.name)
        first = by_name.get(base)
        if first is None:
            by_name[base] = layer
            continue
        same = len(first.blobs) == len(layer.blobs) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first.blobs, layer.blobs)
        )
        if not same:
            raise CheckpointError(f"{path}: layers {first.name} and {layer.name} differ: not shared MSC weights")
    return by_name


def _depth(by_name: dict[str, CaffeLayer], path: Path) -> str:
    blocks = {(m.group(2), m.group(3), m.group(4)) for n in by_name if (m := _BRANCH.match(n)) and m.group(1) == "res"}
    res4 = sum(1 for stage, _, _ in blocks if stage == "4")
    for depth, layers in RESNET_LAYERS.items():
        if res4 == layers[2]:
            return depth
    raise CheckpointError(
        f"{path}: a ResNet caffemodel with {res4} res4 blocks: msattn has "
        + ", ".join(f"{d} ({n[2]} res4 blocks)" for d, n in RESNET_LAYERS.items())
    )


def _bn_values(bn: CaffeLayer, scale: CaffeLayer | None, path: Path, channels: int) -> dict[str, torch.Tensor]:
    if len(bn.blobs) < 2:
        raise CheckpointError(f"{path}: BatchNorm layer {bn.name} has {len(bn.blobs)} blob(s), expected mean, "
                              "variance and the scale factor")  # fmt: skip
    factor = float(bn.blobs[2].reshape(-1)[0]) if len(bn.blobs) > 2 else 1.0
    factor = 0.0 if factor == 0 else 1.0 / factor  # Caffe: a zero factor means no statistics
    mean = bn.blobs[0].reshape(-1).astype(np.float64) * factor
    var = bn.blobs[1].reshape(-1).astype(np.float64) * factor
    eps = BN_EPS if bn.eps is None else float(bn.eps)
    var = var + (eps - BN_EPS)  # exact for frozen BatchNorm: only var + eps is used
    if scale is None or not scale.blobs:
        raise CheckpointError(f"{path}: BatchNorm layer {bn.name} has no Scale layer (gamma, beta) after it")
    gamma = scale.blobs[0].reshape(-1)
    beta = scale.blobs[1].reshape(-1) if len(scale.blobs) > 1 else np.zeros_like(gamma)
    for what, array in (("mean", mean), ("variance", var), ("gamma", gamma), ("beta", beta)):
        if array.shape != (channels,):
            raise CheckpointError(
                f"{path}: {bn.name if what in ('mean', 'variance') else scale.name} has {array.size} {what} values, "
                f"the convolution before it {channels} channels"
            )
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return {"running_mean": as_tensor(mean), "running_var": as_tensor(var), "weight": as_tensor(gamma),
            "bias": as_tensor(beta)}  # fmt: skip


def _expected_shapes(depth: str, width: float) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        trunk = ResNetTrunk(depth, width=width, batchnorm="frozen", stride_in_1x1=True)
    return {f"trunk.{k}": tuple(v.shape) for k, v in trunk.state_dict().items()}


def _stride_in_1x1(by_name: dict[str, CaffeLayer]) -> bool:
    """Caffe's layout unless the file records the stride of res3a in its 3x3 (branch2b) instead."""
    first, second = by_name.get("res3a_branch2a"), by_name.get("res3a_branch2b")
    if first is not None and first.stride == 2:
        return True
    return not (second is not None and second.stride == 2)


def convert_resnet_layers(layers: list[CaffeLayer], path: str | Path) -> dict[str, Any]:
    """Map a DeepLab-v2 ResNet caffemodel's layers to the backbone's state dict (see the module doc).

    Returns ``{"backbone", "stride_in_1x1", "head", "layers", "ignored", "state_dict"}``.
    """
    path = Path(path)
    by_name = _unique_layers(layers, path)
    depth = _depth(by_name, path)
    if "conv1" not in by_name or not by_name["conv1"].blobs:
        raise CheckpointError(f"{path}: ResNet caffemodel without a conv1 layer")
    stem = by_name["conv1"].blobs[0]
    if stem.ndim != 4 or stem.shape[1:] != (3, 7, 7):
        raise CheckpointError(f"{path}: layer conv1 has weight {tuple(stem.shape)}, expected (N, 3, 7, 7)")
    width = stem.shape[0] / 64
    expected = _expected_shapes(depth, width)
    state, mapped = _map_layers(by_name, expected, path)
    aspp = _check_state(state, expected, path, depth, width)
    return {
        "backbone": depth,
        "stride_in_1x1": _stride_in_1x1(by_name),
        "head": "aspp",
        "aspp_branches": len(aspp),
        "width": width,
        "layers": mapped,
        "ignored": [layer.name for layer in layers if base_name(layer.name) not in mapped],
        "state_dict": state,
    }


def _map_layers(
    by_name: dict[str, CaffeLayer], expected: dict[str, tuple[int, ...]], path: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone tensors of every mapped Caffe layer (BatchNorm + Scale pairs together), and their names."""
    state: dict[str, torch.Tensor] = {}
    mapped: list[str] = []
    for name, layer in by_name.items():
        target = target_module(name)
        if target is None or target[1] == "scale":  # a Scale layer is read with its BatchNorm
            continue
        module, kind = target
        if kind == "bn":
            channels = expected.get(f"{module}.running_mean", (0,))[0]
            scale_name = "scale_conv1" if name == "bn_conv1" else "scale" + name[2:]
            values = _bn_values(layer, by_name.get(scale_name), path, channels)
            state.update({f"{module}.{k}": v for k, v in values.items()})
            mapped += [name] + ([scale_name] if scale_name in by_name else [])
            continue
        if not layer.blobs:
            continue
        weight = layer.blobs[0]
        if kind == "conv":
            if name == "conv1":
                weight = weight[:, ::-1]  # BGR -> RGB input channels
            state[f"{module}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        else:  # an ASPP branch: weight and bias, 3x3 from the trunk's channels to the classes
            state.update(_aspp_branch(name, module, layer, expected["trunk.layer4.0.conv3.weight"][0], path))
        mapped.append(name)
    return state, mapped


def _aspp_branch(name: str, module: str, layer: CaffeLayer, channels: int, path: Path) -> dict[str, torch.Tensor]:
    """An ASPP branch's weight [classes, channels, 3, 3] and bias, checked."""
    weight = layer.blobs[0]
    if weight.ndim != 4 or weight.shape[1:] != (channels, 3, 3) or len(layer.blobs) < 2:
        raise CheckpointError(
            f"{path}: layer {name} has weight {tuple(weight.shape)} and {len(layer.blobs)} blob(s), expected "
            f"(classes, {channels}, 3, 3) and a bias"
        )
    return {
        f"{module}.weight": torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        f"{module}.bias": torch.from_numpy(np.ascontiguousarray(layer.blobs[1].reshape(-1), dtype=np.float32)),
    }


def _check_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, depth: str, width: float
) -> list[str]:
    """Every expected tensor present with its shape, and the ASPP branches c0, c1... alike; returns their keys."""
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(f"{path}: no weights for {missing[0]} in this {depth} caffemodel ({len(missing)} "
                              f"tensors missing; Caffe layer {caffe_name(missing[0])})")  # fmt: skip
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{path}: layer {caffe_name(key)} has {key} of shape {tuple(state[key].shape)}, "
                                  f"expected {shape} (a {depth} of width {width:g})")  # fmt: skip
    aspp = sorted(k for k in state if k.startswith("aspp.") and k.endswith(".weight"))
    if aspp:
        if [k.split(".")[1] for k in aspp] != [f"c{i}" for i in range(len(aspp))]:
            raise CheckpointError(f"{path}: ASPP branches {', '.join(k.split('.')[1] for k in aspp)} are not c0, c1...")
        if len({state[k].shape for k in aspp}) != 1:
            raise CheckpointError(f"{path}: the ASPP branches have different shapes")
    return aspp


def caffe_name(key: str) -> str:
    """The Caffe layer a backbone key comes from (for messages): ``trunk.layer3.0.conv2.weight`` -> ``res4a_branch2b``."""
    parts = key.split(".")
    if parts[0] == "aspp":
        return f"fc1_*_{parts[1]}"
    if parts[1] in ("conv1", "bn1") and len(parts) == 3:
        return "conv1" if parts[1] == "conv1" else "bn_conv1 / scale_conv1"
    stage, block = int(parts[1][5:]) + 1, int(parts[2])
    letter = "a" if block == 0 else f"{chr(ord('a') + block)}|b{block}"  # ResNet-50 letters, ResNet-101 b1..b22
    module = ".".join(parts[3:-1])
    branch = {"downsample.0": "1", "downsample.1": "1", "conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b",
              "conv3": "2c", "bn3": "2c"}.get(module, "?")  # fmt: skip
    prefix = "res" if "conv" in module or module == "downsample.0" else "bn"
    return f"{prefix}{stage}{letter}_branch{branch}"
