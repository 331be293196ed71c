"""msattn convert-weights: a synthetic caffemodel in Caffe's wire format -> LargeFOV, and training from it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe

from msattn.config.recipe import load_recipe
from msattn.data.transforms import CAFFE_MEAN, CAFFE_STD, normalize_image
from msattn.errors import CheckpointError
from msattn.models.caffe import convert_caffemodel
from msattn.models.caffe_wire import read_caffemodel
from msattn.models.convert import LARGEFOV_CONV_NAMES, init_from_largefov
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import load_checkpoint
from msattn.train.loop import train

WIDTH = 1 / 32  # conv1 2, conv2 4, conv3 8, conv4/5 16 channels, fc6/fc7 32


# ----------------------------------------------------------------------------- a tiny protobuf writer


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(int(payload))
    return key + varint(len(payload)) + payload  # wire 2


def blob(array: np.ndarray, legacy: bool) -> bytes:
    data = struct.pack(f"<{array.size}f", *array.astype(np.float32).ravel().tolist())
    if legacy:  # num, channels, height, width + non-packed data, as old Caffe wrote them
        dims = (list(array.shape) + [1] * 4)[:4] if array.ndim == 4 else [1, 1, 1, array.size]
        body = b"".join(field(n, 0, d) for n, d in zip((1, 2, 3, 4), dims))
        return body + b"".join(varint(5 << 3 | 5) + data[i : i + 4] for i in range(0, len(data), 4))
    shape = field(1, 2, b"".join(varint(d) for d in array.shape))  # BlobShape.dim, packed
    return field(7, 2, shape) + field(5, 2, data)


def caffemodel(layers: list[tuple[str, list[np.ndarray]]], v1: bool = False) -> bytes:
    """A NetParameter with the given (name, blobs) layers; ``v1`` writes old-style ``layers`` (field 2)."""
    out = field(1, 2, b"deeplab_largefov")
    for name, blobs in layers:
        if v1:
            body = field(4, 2, name.encode()) + field(5, 0, 4) + b"".join(field(6, 2, blob(b, True)) for b in blobs)
            out += field(2, 2, body)
        else:
            body = field(1, 2, name.encode()) + field(2, 2, b"Convolution")
            body += b"".join(field(7, 2, blob(b, False)) for b in blobs)
            out += field(100, 2, body)
    return out


def tiny_caffe_layers(seed: int = 0, classes: int | None = None) -> list[tuple[str, list[np.ndarray]]]:
    """Random LargeFOV weights at WIDTH in Caffe's layout (conv1_1 expects BGR)."""
    rng = np.random.default_rng(seed)
    model = build_model(3, (1.0,), width=WIDTH)
    layers, state = [], model.backbone.state_dict()
    for name in (*LARGEFOV_CONV_NAMES, "fc6", "fc7"):
        key = f"features.{name}" if name.startswith("conv") else name
        w, b = state[f"{key}.weight"], state[f"{key}.bias"]
        layers.append((name, [rng.normal(0, 0.1, tuple(w.shape)), rng.normal(0, 0.1, tuple(b.shape))]))
    layers.append(("pool5", []))  # layers without blobs are skipped
    if classes is not None:
        layers.append(("fc8_voc12", [rng.normal(0, 0.1, (classes, 32, 1, 1)), rng.normal(0, 0.1, (classes,))]))
    else:
        layers.append(("fc8", [rng.normal(0, 0.1, (1000, 4096)), rng.normal(0, 0.1, (1000,))]))  # ImageNet's
    return layers


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("v1", [False, True])
def test_the_wire_format_reader_gets_every_blob_back(tmp_path: Path, v1: bool) -> None:
    layers = tiny_caffe_layers()
    path = tmp_path / "init.caffemodel"
    path.write_bytes(caffemodel(layers, v1=v1))
    read = {layer.name: layer for layer in read_caffemodel(path)}
    assert "pool5" not in read and set(read) == {name for name, blobs in layers if blobs}
    for name, blobs in layers:
        for mine, theirs in zip(blobs, read.get(name, type("L", (), {"blobs": []})).blobs):
            np.testing.assert_array_equal(theirs.reshape(mine.shape), mine.astype(np.float32))


def caffe_forward(layers: list[tuple[str, list[np.ndarray]]], bgr_minus_mean: torch.Tensor) -> torch.Tensor:
    """What Caffe computes: the raw (BGR) weights on a BGR, 0..255, mean-subtracted image."""
    model = build_model(3, (1.0,), width=WIDTH, dropout=0.0).eval()
    state = model.backbone.state_dict()
    for name, blobs in layers:
        if name.startswith(("conv", "fc6", "fc7")):
            key = f"features.{name}" if name.startswith("conv") else name
            state[f"{key}.weight"] = torch.from_numpy(blobs[0].astype(np.float32)).reshape(state[f"{key}.weight"].shape)
            state[f"{key}.bias"] = torch.from_numpy(blobs[1].astype(np.float32))
    model.backbone.load_state_dict(state)
    return model.backbone(bgr_minus_mean)[0]


def test_converted_weights_take_rgb_and_compute_what_caffe_computes_on_bgr(tmp_path: Path) -> None:
    layers = tiny_caffe_layers()
    path = tmp_path / "init.caffemodel"
    path.write_bytes(caffemodel(layers))
    converted = convert_caffemodel(path)
    assert converted["input_norm"] == "caffe" and converted["ignored"] == ["fc8"]  # ImageNet's 1000-way fc8
    model = build_model(3, (1.0,), width=WIDTH, dropout=0.0).eval()
    init_from_largefov(model, converted["state_dict"])

    rgb = np.random.default_rng(1).integers(0, 256, (25, 33, 3), dtype=np.uint8)
    ours = model.backbone(normalize_image(rgb, CAFFE_MEAN, CAFFE_STD)[None])[0]
    bgr = torch.from_numpy(rgb[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1)
    bgr = bgr - torch.tensor([104.008, 116.669, 122.675]).view(3, 1, 1)
    torch.testing.assert_close(ours, caffe_forward(layers, bgr[None]), rtol=1e-4, atol=1e-4)


def test_a_largefov_classifier_is_kept_when_its_shape_fits(tmp_path: Path) -> None:
    path = tmp_path / "train_iter_6000.caffemodel"
    path.write_bytes(caffemodel(tiny_caffe_layers(classes=21)))
    converted = convert_caffemodel(path)
    assert "fc8_voc12" in converted["layers"] and converted["state_dict"]["fc8.weight"].shape == (21, 32, 1, 1)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda layers: [l for l in layers if l[0] != "conv3_2"], "no layer conv3_2"),
        (lambda layers: [(n, [b[..., :2] if n == "conv2_1" else b for b in bl]) for n, bl in layers], "conv2_1"),
        (lambda layers: [(n, bl[:1] if n == "fc7" else bl) for n, bl in layers], "fc7 has 1 blob"),
    ],
)
def test_bad_caffemodels_name_the_file_and_the_layer(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(caffemodel(damage(tiny_caffe_layers())))
    with pytest.raises(CheckpointError, match=message) as info:
        convert_caffemodel(path)
    assert str(path) in str(info.value)


def test_a_truncated_or_foreign_file_is_not_a_caffe_model(tmp_path: Path) -> None:
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(caffemodel(tiny_caffe_layers())[:5000])
    with pytest.raises(CheckpointError, match="not a Caffe model"):
        read_caffemodel(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="not a Caffe model"):
        read_caffemodel(path)


def test_convert_weights_cli_then_train_from_it_uses_caffe_normalisation(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "init.caffemodel"
    path.write_bytes(caffemodel(tiny_caffe_layers()))
    code, out, err = run_cli("convert-weights", path, "--out", tmp_path / "init.pt")
    assert code == 0, err
    assert "RGB" in out and "caffe" in out
    code, _, err = run_cli("convert-weights", path, "--out", path)
    assert code == 2 and "input caffemodel" in err and path.stat().st_size > 1000  # the input is untouched
    (tmp_path / "mine.pt").write_bytes(b"someone else's weights")
    code, _, err = run_cli("convert-weights", path, "--out", tmp_path / "mine.pt")
    assert code == 2 and "not written by msattn" in err  # a file it did not write is never replaced
    assert (tmp_path / "mine.pt").read_bytes() == b"someone else's weights"
    code, _, err = run_cli("convert-weights", path, "--out", tmp_path / "init.pt")
    assert code == 0, err  # its own earlier output is

    data = make_tiny_dataset(tmp_path / "tiny")
    recipe = write_recipe(tmp_path / "r.toml", data, model={"scales": [1.0], "width": WIDTH,
                                                             "pretrained": str(tmp_path / "init.pt")},
                          train={"iterations": 1, "batch_size": 2})
    last = train(load_recipe(recipe), tmp_path / "run", device="cpu")
    ckpt = load_checkpoint(last)
    assert ckpt["dataset"]["input_norm"] == "caffe"
    np.testing.assert_allclose(ckpt["dataset"]["mean"], CAFFE_MEAN) and np.testing.assert_allclose(
        ckpt["dataset"]["std"], CAFFE_STD
    )
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["input_norm"] == "auto"
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "raw", "--set", f"model.pretrained={json.dumps(str(path))}")
    assert code == 2 and "msattn convert-weights" in err


def test_init_from_a_checkpoint_with_another_class_count_redraws_the_classifier(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "tiny")
    recipe = write_recipe(tmp_path / "r.toml", data, train={"iterations": 2, "batch_size": 2},
                          model={"scales": [1.0]})
    first = load_checkpoint(train(load_recipe(recipe), tmp_path / "coco", device="cpu"))
    info = json.loads((data / "dataset.json").read_text())
    other = tmp_path / "voc"
    make_tiny_dataset(other)
    info.update(classes=["background", "red", "green", "blue"], palette=info["palette"] + [[0, 0, 128]])
    (other / "dataset.json").write_text(json.dumps(info))
    recipe2 = write_recipe(tmp_path / "r2.toml", other, train={"iterations": 1, "batch_size": 2, "log_every": 1},
                           model={"scales": [1.0, 0.5], "init_from": str(tmp_path / "coco" / "last.pt")},
                           optim={"lr": 1e-9})
    second = load_checkpoint(train(load_recipe(recipe2), tmp_path / "voc_run", device="cpu"))
    assert second["model"]["backbone.fc8.weight"].shape[0] == 4
    torch.testing.assert_close(second["model"]["backbone.features.conv3_1.weight"],
                               first["model"]["backbone.features.conv3_1.weight"], atol=1e-6, rtol=1e-5)
    # the old key name still reads
    old = load_recipe(recipe2, [f"model.init_checkpoint={json.dumps(str(tmp_path / 'coco' / 'last.pt'))}"])
    assert old.model.init_from == str(tmp_path / "coco" / "last.pt")
