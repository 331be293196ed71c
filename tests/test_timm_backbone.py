"""``timm:<name>`` backbones: the adapter with a stand-in timm module (always), and real timm where it imports."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from _timm_helpers import FakeTimm
from torch import nn

from msattn.errors import UsageError
from msattn.models.loss import segmentation_loss
from msattn.models.norm import FrozenBatchNorm2d
from msattn.models.params import param_groups
from msattn.models.pretrained import apply_pretrained_weights, load_pretrained_weights
from msattn.models.scale import build_model
from msattn.models.spec import ModelSpec


def _timm_problem() -> str | None:
    try:
        importlib.import_module("timm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's "operator torchvision::nms does not exist"
        return f"{type(exc).__name__}: {exc}"
    return None


TIMM_PROBLEM = _timm_problem()
needs_timm = pytest.mark.skipif(
    TIMM_PROBLEM is not None,
    reason=f"timm does not import here ({TIMM_PROBLEM}); it needs the torchvision release built for the installed "
    "torch (a matching torch/torchvision pair, e.g. 2.14.1 / 0.29.1)",
)


@pytest.mark.parametrize("merge", ["max", "avg", "attention"])
def test_a_timm_features_model_runs_through_scalenet(merge: str) -> None:
    fake = FakeTimm()
    model = build_model(3, (1.0, 0.5), merge, backbone="timm:small", aspp_dilations=(1, 2), timm_module=fake)
    assert fake.calls[0] == {"name": "small", "pretrained": False, "features_only": True, "output_stride": 8}
    assert model.stride == 8 and model.backbone.grid_exact and model.backbone.feature_channels == 8
    assert all(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.trunk.modules()
               if "BatchNorm" in type(m).__name__)  # fmt: skip
    out = model.train()(torch.randn(2, 3, 33, 33))
    assert out["out"].shape == (2, 3, 5, 5)
    loss, _ = segmentation_loss(out, torch.randint(0, 3, (2, 33, 33)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 5e-4)}
    assert {id(p) for p in groups["head_weight"]["params"]} == {id(c.weight) for c in model.backbone.aspp.branches()}
    clone = build_model(**model.model_args, timm_module=FakeTimm())
    clone.load_state_dict(model.state_dict())
    assert model.model_args["backbone"] == "timm:small"


def test_batchnorm_train_keeps_timms_layers() -> None:
    model = build_model(3, backbone="timm:small", batchnorm="train", timm_module=FakeTimm())
    assert any(type(m) is nn.BatchNorm2d for m in model.backbone.trunk.modules())


def test_the_grid_of_a_timm_model_is_measured() -> None:
    model = build_model(3, backbone="timm:patchify", timm_module=FakeTimm())  # a 4x4/4 stem: 8k+1 -> k outputs
    assert not model.backbone.grid_exact and model.backbone.output_side(65) == 8
    assert model(torch.zeros(1, 3, 65, 65))["out"].shape[-1] == 8


@pytest.mark.parametrize("name, message", [
    ("no_dilation", "reaches output stride 16 with output_stride=8"),
    ("vit_like", "'vit_like' cannot be built with features_only=True, output_stride=8 .*Vision Transformer"),
])  # fmt: skip
def test_timm_models_without_stride_8_features_are_refused_by_name(name: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_model(3, backbone=f"timm:{name}", timm_module=FakeTimm())


def test_timm_without_timm_says_how_to_install(monkeypatch) -> None:
    import msattn.models.timm_backbone as adapter

    def broken(name, *args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(adapter.importlib, "import_module", broken)
    with pytest.raises(UsageError) as info:
        build_model(3, backbone="timm:resnet50d")
    message = str(info.value)
    assert 'pip install "msattn[timm]"' in message and "torchvision" in message and "torch" in message
    assert "torchvision::nms" in message


def test_timm_pretrained_weights_land_in_the_trunk() -> None:
    fake = FakeTimm()
    model = build_model(3, (1.0, 0.5), backbone="timm:small", timm_module=fake)
    weights = load_pretrained_weights("timm", "timm:small", timm_module=fake)
    assert fake.calls[-1]["pretrained"] is True and "pretrained_cfg_overlay" not in fake.calls[-1]
    assert weights.input_norm == "custom" and weights.mean == (0.5, 0.5, 0.5)
    report = apply_pretrained_weights(model, weights)
    trunk = model.backbone.trunk.state_dict()
    assert all(torch.equal(trunk[k[len("trunk."):]], v) for k, v in weights.state.items() if "num_batches" not in k)
    assert len(report.loaded) == len(trunk)
    load_pretrained_weights("/models/small.safetensors", "timm:small", timm_module=fake)
    assert fake.calls[-1]["pretrained_cfg_overlay"] == {"file": "/models/small.safetensors"}


# ----------------------------------------------------------------------------- real timm


@needs_timm
@pytest.mark.parametrize("name, exact", [("test_resnet", True), ("test_efficientnet", True), ("test_convnext", False)])
def test_real_timm_models_as_backbones(name: str, exact: bool) -> None:
    torch.manual_seed(0)
    model = build_model(3, (1.0, 0.5), "attention", backbone=f"timm:{name}", aspp_dilations=(1, 2))
    assert model.backbone.grid_exact is exact, model.backbone.trunk.probed
    out = model.train()(torch.randn(2, 3, 33, 33))
    loss, _ = segmentation_loss(out, torch.randint(0, 3, (2, 33, 33)))
    loss.backward()
    assert out["out"].shape[-1] == model.backbone.output_side(33)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen or all("bn" in n or "norm" in n for n in frozen)


@needs_timm
def test_real_timm_weights_from_a_local_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    full = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet.pth"
    torch.save(full.state_dict(), path)
    model = build_model(3, backbone="timm:test_resnet")
    report = apply_pretrained_weights(model, load_pretrained_weights(str(path), "timm:test_resnet"))
    trunk = model.backbone.trunk.model.state_dict()
    source = full.state_dict()
    assert torch.equal(trunk["conv1.0.weight"], source["conv1.0.weight"])
    assert torch.equal(trunk["layer4.0.conv2.weight"], source["layer4.0.conv2.weight"])
    assert len(report.loaded) == len(trunk) and ModelSpec.from_args(model.model_args).backbone == "timm:test_resnet"
