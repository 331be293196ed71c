"""msattn convert-weights for DeepLab-v2's ResNet: a synthetic caffemodel in Caffe's wire format, checked
against an independent computation of what Caffe computes (BatchNorm + Scale, stride in the 1x1, dilation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_caffe import blob, field

from msattn.data.transforms import CAFFE_MEAN, CAFFE_STD, normalize_image
from msattn.errors import CheckpointError
from msattn.models.caffe import convert_caffemodel
from msattn.models.caffe_resnet import base_name, target_module
from msattn.models.caffe_wire import read_caffemodel
from msattn.models.pretrained import apply_pretrained_weights, load_pretrained_weights, spec_for_weights
from msattn.models.scale import build_model
from msattn.models.spec import ModelSpec

WIDTH = 1 / 16  # conv1 4 channels; res5 outputs 128
BLOCKS = (3, 4, 6, 3)  # ResNet-50: res2a..c, res3a..d, res4a..f, res5a..c
ASPP = (6, 12, 18, 24)
EPS = {"bn2b_branch2b": 1e-4}  # one BatchNorm with another eps, recorded in its batch_norm_param


def caffe_layer(name: str, kind: str, blobs: list[np.ndarray], stride: int | None = None,
                eps: float | None = None) -> bytes:  # fmt: skip
    body = field(1, 2, name.encode()) + field(2, 2, kind.encode())
    body += b"".join(field(7, 2, blob(b, False)) for b in blobs)
    if stride is not None:  # ConvolutionParameter.stride
        body += field(106, 2, field(6, 0, stride))
    if eps is not None:  # BatchNormParameter.eps (fixed32)
        body += field(139, 2, bytes([3 << 3 | 5]) + np.float32(eps).tobytes())
    return field(100, 2, body)


def resnet50_layers(seed: int = 0, classes: int = 5) -> list[tuple[str, str, list[np.ndarray], dict]]:
    """DeepLab-v2 layer names, Caffe shapes, random values; BatchNorm blobs hold sums scaled by a factor."""
    rng = np.random.default_rng(seed)
    layers: list[tuple[str, str, list[np.ndarray], dict]] = []

    def conv(name: str, out_ch: int, in_ch: int, k: int, **params) -> None:
        layers.append((name, "Convolution", [rng.normal(0, (2 / (in_ch * k * k)) ** 0.5, (out_ch, in_ch, k, k))],
                       params))  # fmt: skip

    def bn(suffix: str, channels: int) -> None:
        factor = rng.uniform(0.5, 999.0)
        mean, var = rng.normal(0, 0.2, channels), rng.uniform(0.5, 2.0, channels)
        name = f"bn{suffix}" if suffix != "_conv1" else "bn_conv1"
        layers.append((name, "BatchNorm", [mean * factor, var * factor, np.array([factor])],
                       {"eps": EPS.get(name)}))  # fmt: skip
        layers.append((name.replace("bn", "scale", 1), "Scale",
                       [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.1, channels)], {}))  # fmt: skip

    c = lambda n: int(n * WIDTH)  # noqa: E731
    conv("conv1", c(64), 3, 7)
    bn("_conv1", c(64))
    layers.append(("pool1", "Pooling", [], {}))
    inplanes = c(64)
    for stage, blocks in zip((2, 3, 4, 5), BLOCKS):
        planes = c(64 * 2 ** (stage - 2))
        for b in range(blocks):
            tag = f"{stage}{chr(ord('a') + b)}"
            stride = 2 if stage == 3 and b == 0 else None
            if b == 0:
                conv(f"res{tag}_branch1", planes * 4, inplanes, 1, stride=stride)
                bn(f"{tag}_branch1", planes * 4)
            conv(f"res{tag}_branch2a", planes, inplanes if b == 0 else planes * 4, 1, stride=stride)
            bn(f"{tag}_branch2a", planes)
            conv(f"res{tag}_branch2b", planes, planes, 3)
            bn(f"{tag}_branch2b", planes)
            conv(f"res{tag}_branch2c", planes * 4, planes, 1)
            bn(f"{tag}_branch2c", planes * 4)
        inplanes = planes * 4
    for i in range(4):
        layers.append((f"fc1_voc12_c{i}", "Convolution",
                       [rng.normal(0, 0.01, (classes, inplanes, 3, 3)), rng.normal(0, 0.1, classes)], {}))  # fmt: skip
    layers.append(("fc1000", "InnerProduct", [rng.normal(0, 0.1, (1000, inplanes)), np.zeros(1000)], {}))
    by_name = {name: (name, kind, blobs, params) for name, kind, blobs, params in layers}
    msc = [(f"{n}_res075", k, b, p) for n, k, b, p in (by_name["res2a_branch2a"], by_name["fc1_voc12_c0"])]
    return layers + msc  # MSC prototxts store shared layers once per scale


def write(path: Path, layers: list[tuple[str, str, list[np.ndarray], dict]]) -> Path:
    path.write_bytes(field(1, 2, b"deeplab_resnet101") + b"".join(caffe_layer(n, k, b, **p) for n, k, b, p in layers))
    return path


def caffe_forward(layers: list[tuple[str, str, list[np.ndarray], dict]], bgr: torch.Tensor) -> torch.Tensor:
    """What Caffe computes with DeepLab-v2's prototxt, written from the layer definitions alone."""
    blobs = {name: [torch.from_numpy(np.asarray(b, dtype=np.float64)) for b in bl] for name, _, bl, _ in layers}
    eps = {name: params.get("eps") or 1e-5 for name, kind, _, params in layers if kind == "BatchNorm"}

    def conv(name: str, x: torch.Tensor, stride: int = 1, pad: int = 0, dilation: int = 1) -> torch.Tensor:
        bias = blobs[name][1] if len(blobs[name]) > 1 else None
        return F.conv2d(x, blobs[name][0], bias, stride, pad, dilation)

    def batchnorm(bn_name: str, scale_name: str, x: torch.Tensor) -> torch.Tensor:
        mean, var, factor = blobs[bn_name]
        mean, var = mean / factor, var / factor  # Caffe's BatchNorm: the stored sums over the scale factor
        gamma, beta = blobs[scale_name]
        view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        return (x - view(mean)) / torch.sqrt(view(var) + eps[bn_name]) * view(gamma) + view(beta)

    x = torch.relu(batchnorm("bn_conv1", "scale_conv1", conv("conv1", bgr, stride=2, pad=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)  # DeepLab-v2's pool1
    for stage, blocks, stride, dilation in zip((2, 3, 4, 5), BLOCKS, (1, 2, 1, 1), (1, 1, 2, 4)):
        for b in range(blocks):
            tag, s = f"{stage}{chr(ord('a') + b)}", stride if b == 0 else 1
            h = torch.relu(batchnorm(f"bn{tag}_branch2a", f"scale{tag}_branch2a", conv(f"res{tag}_branch2a", x, s)))
            h = conv(f"res{tag}_branch2b", h, pad=dilation, dilation=dilation)  # every res4 3x3: dilation 2, res5: 4
            h = torch.relu(batchnorm(f"bn{tag}_branch2b", f"scale{tag}_branch2b", h))
            h = batchnorm(f"bn{tag}_branch2c", f"scale{tag}_branch2c", conv(f"res{tag}_branch2c", h))
            short = x if b else batchnorm(f"bn{tag}_branch1", f"scale{tag}_branch1", conv(f"res{tag}_branch1", x, s))
            x = torch.relu(h + short)
    return sum(conv(f"fc1_voc12_c{i}", x, pad=d, dilation=d) for i, d in enumerate(ASPP))


def bgr_minus_mean(rgb: np.ndarray) -> torch.Tensor:
    bgr = torch.from_numpy(rgb[..., ::-1].astype(np.float64).copy()).permute(2, 0, 1)
    return (bgr - torch.tensor([104.008, 116.669, 122.675], dtype=torch.float64).view(3, 1, 1))[None]


def test_converted_resnet_computes_what_caffe_computes(tmp_path: Path) -> None:
    layers = resnet50_layers()
    converted = convert_caffemodel(write(tmp_path / "train_iter_20000.caffemodel", layers))
    assert converted["backbone"] == "resnet50" and converted["stride_in_1x1"] and converted["input_norm"] == "caffe"
    assert converted["ignored"] == ["fc1000"] and "res2a_branch2a_res075" not in converted["layers"]
    var = converted["state_dict"]["trunk.layer1.1.bn2.running_var"]  # bn2b_branch2b: eps 1e-4 folded in
    expected_var = np.asarray(dict((n, b) for n, _, b, _ in layers)["bn2b_branch2b"][1] /
                              dict((n, b) for n, _, b, _ in layers)["bn2b_branch2b"][2][0])  # fmt: skip
    np.testing.assert_allclose(var.numpy(), expected_var + 1e-4 - 1e-5, rtol=1e-5)

    model = build_model(5, (1.0,), backbone="resnet50", width=WIDTH, stride_in_1x1=True).eval().double()
    model.backbone.load_state_dict({k: v.double() for k, v in converted["state_dict"].items()})
    rgb = np.random.default_rng(1).integers(0, 256, (65, 73, 3), dtype=np.uint8)  # 8k+1 sides: 9 x 10 outputs
    ours = model(normalize_image(rgb, CAFFE_MEAN, CAFFE_STD)[None].double())["out"]
    theirs = caffe_forward(layers, bgr_minus_mean(rgb))
    assert ours.shape == theirs.shape == (1, 5, 9, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))

    torchvision_layout = build_model(5, (1.0,), backbone="resnet50", width=WIDTH).eval().double()
    torchvision_layout.backbone.load_state_dict({k: v.double() for k, v in converted["state_dict"].items()})
    wrong = torchvision_layout(normalize_image(rgb, CAFFE_MEAN, CAFFE_STD)[None].double())["out"]
    assert not torch.allclose(wrong, theirs, rtol=1e-2)  # the stride layout matters: the weights choose it


def test_convert_weights_cli_then_model_pretrained_takes_the_layout_from_the_file(tmp_path: Path, run_cli) -> None:
    source = write(tmp_path / "init.caffemodel", resnet50_layers())
    code, out, err = run_cli("convert-weights", source, "--out", tmp_path / "init.pt")
    assert code == 0, err
    assert "backbone resnet50" in out and 'model.backbone = "resnet50"' in out and "conv1 reordered" in out
    weights = load_pretrained_weights(str(tmp_path / "init.pt"), "resnet50")
    spec = spec_for_weights(ModelSpec(5, (1.0, 0.5), backbone="resnet50", width=WIDTH), weights)
    assert spec.stride_in_1x1 and spec.to_args()["stride_in_1x1"] is True
    with pytest.raises(CheckpointError, match="stride in its 1x1 convolution, the model in its 3x3"):
        apply_pretrained_weights(build_model(5, backbone="resnet50", width=WIDTH), weights)
    model = build_model(spec)
    report = apply_pretrained_weights(model, weights)
    assert report.set_aside == [f"aspp.c{i}.{p}" for i in range(4) for p in ("weight", "bias")]  # re-drawn
    assert torch.equal(model.backbone.trunk.layer3[5].conv2.weight, weights.state["trunk.layer3.5.conv2.weight"])
    with pytest.raises(CheckpointError, match="for the resnet50 backbone.*model.backbone is resnet101"):
        spec_for_weights(ModelSpec(5, backbone="resnet101"), weights)
    with pytest.raises(CheckpointError, match='set model.backbone = "resnet50"'):
        load_pretrained_weights(str(tmp_path / "init.pt"), "vgg16_largefov")


def test_deeplab_v2_names_map_by_base_name() -> None:
    assert target_module("res4b22_branch2c") == ("trunk.layer3.22.conv3", "conv")  # ResNet-101's numbering
    assert target_module("bn3b3_branch2a") == ("trunk.layer2.3.bn1", "bn")
    assert target_module("scale5a_branch1") == ("trunk.layer4.0.downsample.1", "scale")
    assert target_module("res4f_branch2b") == ("trunk.layer3.5.conv2", "conv")  # ResNet-50's letters
    assert target_module("fc1_coco_c3") == target_module("fc1_c3") == ("aspp.c3", "aspp")
    assert base_name("fc1_voc12_c0_res075") == "fc1_voc12_c0" and base_name("res2a_branch2a_res05") == "res2a_branch2a"
    assert target_module("fc1000") is None and target_module("res2a") is None


def _without(name: str):
    return lambda layers: [layer for layer in layers if layer[0] != name]


def _reshaped(name: str):
    return lambda layers: [(n, k, [b[:, :-1] if n == name and i == 0 else b for i, b in enumerate(bl)], p)
                           for n, k, bl, p in layers]  # fmt: skip


def _msc_differs(layers):
    return [(n, k, [b + 1 for b in bl] if n.endswith("_res075") else bl, p) for n, k, bl, p in layers]


@pytest.mark.parametrize("damage, message", [
    (_without("res3b_branch2b"), r"no weights for trunk\.layer2\.1\.conv2\.weight .*res3b\|b1_branch2b"),
    (_without("scale4c_branch2a"), "bn4c_branch2a has no Scale layer"),
    (_reshaped("res4a_branch2c"), r"trunk\.layer3\.0\.conv3\.weight of shape \(64, 15, 1, 1\), expected \(64, 16, 1, 1\)"),
    (_msc_differs, "res2a_branch2a and res2a_branch2a_res075 differ"),
    (lambda layers: [layer for layer in layers if "4f_" not in layer[0]], "with 5 res4 blocks: msattn has resnet50 "
                                                                            r"\(6 res4 blocks\), resnet101 \(23"),
])  # fmt: skip
def test_bad_resnet_caffemodels_name_the_layer(tmp_path: Path, damage, message: str) -> None:
    path = write(tmp_path / "bad.caffemodel", damage(resnet50_layers()))
    with pytest.raises(CheckpointError, match=message) as info:
        convert_caffemodel(path)
    assert str(path) in str(info.value)


def test_the_reader_keeps_stride_and_eps(tmp_path: Path) -> None:
    read = {layer.name: layer for layer in read_caffemodel(write(tmp_path / "m.caffemodel", resnet50_layers()))}
    assert read["res3a_branch2a"].stride == 2 and read["res3a_branch2b"].stride is None
    assert read["bn2b_branch2b"].eps == pytest.approx(1e-4) and read["bn2a_branch2b"].eps is None
