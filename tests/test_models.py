"""Model core: architecture, merges, loss, parameter groups and ImageNet conversion."""

from __future__ import annotations

import pytest
import torch

from msattn.errors import CheckpointError, UsageError
from msattn.geometry import output_side, scaled_size, upsample_logits
from msattn.models.backbone import LargeFOV
from msattn.models.convert import (
    FC6_TAPS,
    TORCHVISION_CONV_INDICES,
    convert_vgg16,
    init_from_vgg16,
    load_vgg16_state_dict,
)
from msattn.models.loss import STAT_TERMS, cross_entropy, segmentation_loss
from msattn.models.params import param_groups
from msattn.models.scale import build_model

TINY = 0.0625  # channel width multiplier for fast tests


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(scales=(1.0,), merge="attention", classes=5, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(classes, scales=scales, merge=merge, width=TINY, **kw)


# ----------------------------------------------------------------------------- architecture


def test_largefov_has_the_paper_parameter_count() -> None:
    assert count(build_model(21)) == 20_505_429


@pytest.mark.parametrize("num_scales", [2, 3])
def test_attention_head_parameter_count(num_scales: int) -> None:
    model = build_model(21, scales=(1.0, 0.75, 0.5)[:num_scales] if num_scales == 3 else (1.0, 0.5))
    head = count(model.head)
    assert head == num_scales * 1024 * 9 * 512 + 512 + 512 * num_scales + num_scales
    assert count(model) == 20_505_429 + head


def test_max_and_avg_add_no_parameters() -> None:
    assert count(build_model(21, (1.0, 0.5), merge="max")) == 20_505_429
    assert count(build_model(21, (1.0, 0.75, 0.5), merge="avg")) == 20_505_429


def test_largefov_layout_matches_deeplab() -> None:
    net = LargeFOV(21)
    assert net.fc6.dilation == (12, 12) and net.fc6.kernel_size == (3, 3) and net.fc6.out_channels == 1024
    assert net.fc7.kernel_size == (1, 1) and net.fc7.out_channels == 1024
    assert net.features.conv5_1.dilation == (2, 2) and net.features.conv4_1.dilation == (1, 1)
    assert net.features.pool4.stride == 1 and net.features.pool5.stride == 1
    assert net.features.pool3.stride == 2 and net.features.pool4.kernel_size == 3
    assert output_side(321) == 41 and output_side(513) == 65


@pytest.mark.parametrize(
    "scales",
    [(1.0,), (1.0, 0.5), (1.0, 0.75, 0.5), (0.5, 1.0, 0.75), (1.0, 0.75, 0.5, 0.25)],
)
@pytest.mark.parametrize("merge", ["max", "avg", "attention"])
def test_output_shapes_for_scale_sets(scales: tuple[float, ...], merge: str) -> None:
    model = tiny(scales, merge).eval()
    out = model(torch.randn(2, 3, 37, 50))
    h, w = output_side(37), output_side(50)
    assert out["out"].shape == (2, 5, h, w)
    assert len(out["per_scale"]) == len(scales)
    for s, logits in zip(scales, out["per_scale"]):
        assert logits.shape[-2:] == tuple(output_side(side) for side in scaled_size((37, 50), s))
    if len(scales) == 1:
        assert out["attention"] is None
    else:
        assert out["attention"].shape == (2, len(scales), h, w)


def test_finest_scale_is_the_reference_when_scales_are_larger_than_one() -> None:
    out = tiny((1.0, 1.5), "avg").eval()(torch.randn(1, 3, 33, 33))
    assert scaled_size((33, 33), 1.5) == (49, 49)  # a grid side: (33 - 1) * 1.5 = 48 = 8 * 6
    assert out["out"].shape[-2:] == (output_side(49), output_side(49))


@pytest.mark.parametrize("size", [(1, 1), (9, 17), (65, 31)])
def test_odd_and_tiny_inputs(size: tuple[int, int]) -> None:
    out = tiny((1.0, 0.75, 0.5)).eval()(torch.randn(1, 3, *size))
    assert out["out"].shape[-2:] == (output_side(size[0]), output_side(size[1]))
    assert torch.isfinite(out["out"]).all()


def test_attention_weights_are_a_softmax_over_scales() -> None:
    att = tiny((1.0, 0.75, 0.5)).eval()(torch.randn(2, 3, 40, 40))["attention"]
    assert (att > 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones_like(att[:, 0]))


def test_equal_attention_logits_give_the_average_merge() -> None:
    att_model = tiny((1.0, 0.5), "attention").eval()
    avg_model = tiny((1.0, 0.5), "avg").eval()
    avg_model.backbone.load_state_dict(att_model.backbone.state_dict())
    torch.nn.init.zeros_(att_model.head.conv2.weight)
    torch.nn.init.zeros_(att_model.head.conv2.bias)
    x = torch.randn(2, 3, 35, 35)
    torch.testing.assert_close(att_model(x)["out"], avg_model(x)["out"])


def test_max_merge_is_elementwise_max_and_reports_the_winner() -> None:
    model = tiny((1.0, 0.5), "max").eval()
    x = torch.randn(1, 3, 33, 33)
    out = model(x)
    ref = out["out"].shape[-2:]
    small = upsample_logits(out["per_scale"][1], ref)
    torch.testing.assert_close(out["out"], torch.maximum(out["per_scale"][0], small))
    winner = out["attention"]
    torch.testing.assert_close(winner.sum(1), torch.ones_like(winner[:, 0]))
    best_small = small.amax(1) > out["per_scale"][0].amax(1)
    assert torch.equal(winner[:, 1].bool(), best_small)


def test_one_scale_equals_plain_largefov() -> None:
    model = tiny((1.0,)).eval()
    x = torch.randn(2, 3, 29, 41)
    _, logits = model.backbone(x)
    torch.testing.assert_close(model(x)["out"], logits)


def test_per_scale_logits_come_from_the_shared_network() -> None:
    model = tiny((1.0, 0.5)).eval()
    x = torch.randn(1, 3, 33, 33)
    half = torch.nn.functional.interpolate(x, size=(17, 17), mode="bilinear", align_corners=True)
    torch.testing.assert_close(model(x)["per_scale"][1], model.backbone(half)[1])


def test_test_time_scales_override() -> None:
    model = tiny((1.0, 0.5), "avg").eval()
    out = model(torch.randn(1, 3, 32, 32), scales=(1.0, 0.75, 0.5))
    assert len(out["per_scale"]) == 3
    attention = tiny((1.0, 0.5), "attention").eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(attention(x, scales=(0.5, 1.0))["out"], attention(x)["out"])
    with pytest.raises(ValueError, match="needs as many"):
        tiny((1.0, 0.5), "attention")(torch.randn(1, 3, 32, 32), scales=(1.0,))
    with pytest.raises(ValueError, match=r"trained on scales \[1.0, 0.5\] needs those"):  # not silently other scales
        tiny((1.0, 0.5), "attention")(torch.randn(1, 3, 32, 32), scales=(1.0, 0.75))


@pytest.mark.parametrize("kwargs", [{"merge": "sum"}, {"scales": ()}, {"scales": (1.0, -0.5)}, {"scales": (1.0, 1.0)}])
def test_bad_model_arguments_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_model(3, **kwargs)


def test_every_parameter_receives_a_gradient() -> None:
    model = tiny((1.0, 0.75, 0.5), dropout=0.0).train()
    out = model(torch.randn(2, 3, 33, 33))
    labels = torch.randint(0, 5, (2, 33, 33))
    loss, _ = segmentation_loss(out, labels)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_model_args_rebuild_the_same_architecture() -> None:
    model = tiny((1.0, 0.5), "max")
    clone = build_model(**model.model_args)
    clone.load_state_dict(model.state_dict())
    assert clone.model_args == model.model_args


# ----------------------------------------------------------------------------- loss


def test_loss_counts_one_plus_s_terms() -> None:
    out = tiny((1.0, 0.75, 0.5)).eval()(torch.randn(2, 3, 24, 24))
    labels = torch.randint(0, 5, (2, 24, 24))
    total, terms = segmentation_loss(out, labels)
    losses = {k: v for k, v in terms.items() if k not in STAT_TERMS}  # statistics are logged, not summed
    assert list(losses) == ["merged", "scale_1", "scale_0.75", "scale_0.5"]
    assert set(terms) - set(losses) == set(STAT_TERMS)
    torch.testing.assert_close(total, sum(losses.values()))
    _, terms = segmentation_loss(out, labels, extra_supervision=False)
    assert [k for k in terms if k not in STAT_TERMS] == ["merged"]


def test_extra_supervision_weight_scales_the_per_scale_terms_only() -> None:
    out = tiny((1.0, 0.5)).eval()(torch.randn(2, 3, 24, 24))
    labels = torch.randint(0, 5, (2, 24, 24))
    total, terms = segmentation_loss(out, labels, extra_supervision_weight=0.25)
    torch.testing.assert_close(total, terms["merged"] + 0.25 * (terms["scale_1"] + terms["scale_0.5"]))
    full, full_terms = segmentation_loss(out, labels)
    assert full_terms["scale_0.5"] == terms["scale_0.5"]  # logged unweighted
    assert full > total
    zero, _ = segmentation_loss(out, labels, extra_supervision_weight=0.0)
    torch.testing.assert_close(zero, terms["merged"])


def test_single_scale_loss_has_one_term() -> None:
    out = tiny((1.0,)).eval()(torch.randn(1, 3, 24, 24))
    _, terms = segmentation_loss(out, torch.zeros(1, 24, 24, dtype=torch.long))
    assert list(terms) == ["merged"]


def test_loss_ignores_255() -> None:
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    noisy = labels.clone()
    noisy[0, :2] = 255
    expected = torch.nn.functional.cross_entropy(logits[..., 2:, :], labels[..., 2:, :])
    torch.testing.assert_close(cross_entropy(logits, noisy), expected)
    assert cross_entropy(logits, torch.full((1, 4, 4), 255)).item() == 0.0


def test_downsample_mode_shrinks_labels_with_nearest() -> None:
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 10.0  # predicts class 1 everywhere
    labels = torch.zeros(1, 9, 9, dtype=torch.long)
    labels[:, 0::8, 0::8] = 1  # the grid of a 9-pixel side (8k+1, k=1) reads exactly pixels 0 and 8
    assert cross_entropy(logits, labels, "downsample") < 1e-3
    assert cross_entropy(logits, labels, "upsample") > 5.0


def test_upsample_mode_enlarges_logits_to_the_labels() -> None:
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 33, 33))
    expected = torch.nn.functional.cross_entropy(upsample_logits(logits, (33, 33)), labels)
    torch.testing.assert_close(cross_entropy(logits, labels, "upsample"), expected)
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, "bicubic")


# ----------------------------------------------------------------------------- parameter groups


def test_param_groups_follow_deeplab_convention() -> None:
    model = build_model(21, (1.0, 0.5), width=TINY)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=5e-4)}
    assert groups["backbone_weight"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone_bias"]["lr"] == pytest.approx(2e-3) and groups["backbone_bias"]["weight_decay"] == 0
    assert groups["head_weight"]["lr"] == pytest.approx(1e-2) and groups["head_weight"]["weight_decay"] == 5e-4
    assert groups["head_bias"]["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in groups["head_weight"]["params"]} == {id(model.backbone.fc8.weight)}
    attention_ids = {id(p) for p in groups["attention_weight"]["params"]}
    assert {id(model.head.conv1.weight), id(model.head.conv2.weight)} == attention_ids
    assert groups["attention_weight"]["lr"] == pytest.approx(1e-2)  # follows head_lr_mult unless given
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_attention_head_has_its_own_lr_multiplier_and_dropout() -> None:
    model = build_model(21, (1.0, 0.5), width=TINY, dropout=0.0, attention_dropout=0.3)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 5e-4, head_lr_mult=10.0, attention_lr_mult=3.0)}
    assert groups["head_weight"]["lr"] == pytest.approx(1e-2)
    assert groups["attention_weight"]["lr"] == pytest.approx(3e-3)
    assert groups["attention_bias"]["lr"] == pytest.approx(6e-3) and groups["attention_bias"]["weight_decay"] == 0
    assert isinstance(model.backbone.drop6, torch.nn.Identity)
    assert isinstance(model.head.drop, torch.nn.Dropout) and model.head.drop.p == 0.3
    assert model.model_args["attention_dropout"] == 0.3


# ----------------------------------------------------------------------------- ImageNet conversion


def fake_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """Random weights with torchvision's VGG-16 key names and shapes."""
    g = torch.Generator().manual_seed(0)
    state, in_ch = {}, 3
    channels = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for index, out_ch in zip(TORCHVISION_CONV_INDICES, channels):
        state[f"features.{index}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g)
        state[f"features.{index}.bias"] = torch.randn(out_ch, generator=g)
        in_ch = out_ch
    for index, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):
        state[f"classifier.{index}.weight"] = torch.randn(*shape, generator=g)
        state[f"classifier.{index}.bias"] = torch.randn(shape[0], generator=g)
    return state


def test_fc6_fc7_decimation_picks_the_documented_indices() -> None:
    vgg = fake_vgg16_state_dict()
    conv = convert_vgg16(vgg)
    fc6 = vgg["classifier.0.weight"].view(4096, 512, 7, 7)
    assert conv["fc6.weight"].shape == (1024, 512, 3, 3)
    for out_i, src_i in [(0, 0), (1, 4), (255, 1020), (1023, 4092)]:
        for a, ta in enumerate(FC6_TAPS):
            for b, tb in enumerate(FC6_TAPS):
                assert torch.equal(conv["fc6.weight"][out_i, :, a, b], fc6[src_i, :, ta, tb])
        assert conv["fc6.bias"][out_i] == vgg["classifier.0.bias"][src_i]
    assert FC6_TAPS == (0, 3, 6)
    assert conv["fc7.weight"].shape == (1024, 1024, 1, 1)
    assert conv["fc7.weight"][7, 9, 0, 0] == vgg["classifier.3.weight"][28, 36]
    assert conv["fc7.bias"][7] == vgg["classifier.3.bias"][28]
    assert torch.equal(conv["features.conv5_3.weight"], vgg["features.28.weight"])
    assert torch.equal(conv["features.conv1_1.bias"], vgg["features.0.bias"])


def test_init_from_vgg16_copies_backbone_and_redraws_classifier(tmp_path) -> None:
    vgg = fake_vgg16_state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(vgg, path)
    model = build_model(21, (1.0, 0.5))
    torch.nn.init.constant_(model.backbone.fc8.weight, 3.0)
    init_from_vgg16(model, load_vgg16_state_dict(path))
    assert torch.equal(model.backbone.features.conv3_2.weight, vgg["features.12.weight"])
    assert torch.equal(model.backbone.fc7.bias, vgg["classifier.3.bias"][::4])
    for conv in (model.backbone.fc8, model.head.conv1, model.head.conv2):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.2)
        assert conv.bias.abs().sum() == 0


def test_conversion_errors_are_clear(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing features.0.weight"):
        convert_vgg16({})
    with pytest.raises(CheckpointError, match="not found"):
        load_vgg16_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="width = 1"):
        init_from_vgg16(build_model(21, width=0.5), fake_vgg16_state_dict())


def test_offline_download_names_the_file_to_fetch(monkeypatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UsageError) as info:
        load_vgg16_state_dict(None)
    assert "vgg16-397923af.pth" in str(info.value) and str(tmp_path) in str(info.value)


# ----------------------------------------------------------------------------- learning


def two_synthetic_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 33x33 images (an 8k+1 side): a bright square (class 1) and a dark disc (class 2) on grey."""
    images = torch.full((2, 3, 33, 33), 0.0)
    labels = torch.zeros(2, 33, 33, dtype=torch.long)
    images[0, :, 8:24, 8:24] = 1.5
    labels[0, 8:24, 8:24] = 1
    yy, xx = torch.meshgrid(torch.arange(33), torch.arange(33), indexing="ij")
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 64
    images[1, :, disc] = -1.5
    labels[1, disc] = 2
    return images, labels


def test_tiny_attention_model_overfits_two_images() -> None:
    torch.manual_seed(0)
    model = build_model(3, (1.0, 0.5), width=0.125, dropout=0.0)
    images, labels = two_synthetic_images()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss, _ = segmentation_loss(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
