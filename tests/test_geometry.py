"""DeepLab's corner-aligned stride-8 grid, checked pixel by pixel (msattn.geometry and its callers)."""

from __future__ import annotations

import pytest
import torch

from msattn import geometry
from msattn.infer.forward import predict_batch
from msattn.models.loss import cross_entropy, segmentation_loss
from msattn.models.scale import build_model


def coordinate_labels(h: int, w: int) -> torch.Tensor:
    """[1, H, W] labels whose value encodes the pixel: 1000 * y + x."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (1000 * yy + xx)[None]


@pytest.mark.parametrize("side, outputs", [(321, 41), (513, 65), (9, 2), (1, 1), (97, 13)])
def test_a_grid_side_of_8k_plus_1_gives_k_plus_1_outputs(side: int, outputs: int) -> None:
    assert geometry.is_grid_side(side)
    assert geometry.output_side(side) == outputs
    net = build_model(3, (1.0,), width=1 / 32).backbone.eval()
    assert net(torch.zeros(1, 3, side, side))[1].shape[-2:] == (outputs, outputs)


def test_label_shrinking_reads_pixels_0_8_16_up_to_the_last() -> None:
    labels = coordinate_labels(321, 321)
    shrunk = geometry.shrink_labels(labels, (41, 41))
    expected = torch.arange(0, 321, 8)
    assert expected[-1] == 320 and len(expected) == 41
    assert torch.equal(shrunk[0], 1000 * expected[:, None] + expected[None, :])


def test_label_shrinking_to_a_scale_grid_is_corner_aligned() -> None:
    labels = coordinate_labels(321, 161)
    shrunk = geometry.shrink_labels(labels, (31, 21))  # the 0.75 grid rows (241 px), the 0.5 grid columns (161 px)
    rows = [round(i * 320 / 30) for i in range(31)]
    cols = [8 * j for j in range(21)]
    assert shrunk[0, :, 0].tolist() == [1000 * r for r in rows] and rows[-1] == 320
    assert shrunk[0, 0].tolist() == cols


def test_the_loss_reads_labels_on_the_grid() -> None:
    logits = torch.zeros(1, 2, 41, 41)
    logits[:, 1] = 20.0  # class 1 everywhere
    labels = torch.zeros(1, 321, 321, dtype=torch.long)
    labels[:, ::8, ::8] = 1  # class 1 exactly on the grid pixels, 0 everywhere else
    assert cross_entropy(logits, labels, "downsample") < 1e-6
    labels[:, 320, 320] = 0  # the last grid pixel is read too (the old floor grid stopped at 313)
    assert cross_entropy(logits, labels, "downsample") > 1e-3


def test_upsampling_a_ramp_puts_output_i_on_pixel_8i() -> None:
    ramp = torch.arange(41, dtype=torch.float64).view(1, 1, 1, 41).expand(1, 1, 41, 41)
    full = geometry.upsample_logits(ramp, (321, 321))  # value = output index
    pixels = torch.arange(321, dtype=torch.float64)
    torch.testing.assert_close(full[0, 0, 0], pixels / 8)  # no shift anywhere, borders included
    old = torch.nn.functional.interpolate(ramp, size=(321, 321), mode="bilinear", align_corners=False)
    assert (old[0, 0, 0] - pixels / 8).abs().max() * 8 > 3.0  # what msattn 0.1 did: 3.4-3.5 px off at the borders


@pytest.mark.parametrize("side, scale, expected", [(321, 0.5, 161), (321, 0.75, 241), (513, 0.5, 257),
                                                   (513, 0.75, 385), (97, 2.0, 193), (65, 1.0, 65)])
def test_scale_inputs_are_round_of_h_minus_1_times_s_plus_1(side: int, scale: float, expected: int) -> None:
    assert geometry.scaled_side(side, scale) == expected


def test_scale_sides_of_a_grid_side_stay_grid_sides() -> None:
    for side in (33, 105, 321, 505):
        for scale in (0.5, 0.6, 0.75, 0.9, 1.5, 2.0):
            assert geometry.is_grid_side(geometry.scaled_side(side, scale)), (side, scale)


def test_the_model_resizes_each_scale_corner_aligned() -> None:
    model = build_model(3, (1.0, 0.5), merge="avg", width=1 / 32).eval()
    x = torch.randn(1, 3, 65, 65)
    out = model(x)
    half = torch.nn.functional.interpolate(x, size=(33, 33), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out["per_scale"][1], model.backbone(half)[1])
    assert out["per_scale"][1].shape[-2:] == (5, 5) and out["out"].shape[-2:] == (9, 9)
    back = torch.nn.functional.interpolate(out["per_scale"][1], size=(9, 9), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out["out"], (out["per_scale"][0] + back) / 2)
    torch.testing.assert_close(back[..., ::2, ::2], out["per_scale"][1])  # output j of 0.5 sits on output 2j of 1


def test_pad_to_grid_pads_images_with_the_mean_and_labels_with_ignore() -> None:
    images = torch.ones(2, 3, 50, 37)
    padded = geometry.pad_to_grid(images)
    assert padded.shape[-2:] == (57, 41)
    assert padded[..., :50, :37].eq(1).all() and padded[..., 50:, :].eq(0).all() and padded[..., 37:].eq(0).all()
    labels = torch.zeros(1, 50, 37, dtype=torch.long)
    padded_labels = geometry.pad_to_grid(labels, value=255)
    assert padded_labels.dtype == torch.long and padded_labels[0, 50:].eq(255).all()
    assert geometry.pad_to_grid(images, pad_to=513).shape[-2:] == (513, 513)
    assert geometry.pad_to_grid(torch.ones(1, 3, 600, 20), pad_to=513).shape[-2:] == (601, 513)
    assert torch.equal(geometry.crop_to(padded, (50, 37)), images)
    with pytest.raises(ValueError, match="8k"):
        geometry.padded_size((10, 10), pad_to=512)


@pytest.mark.parametrize("size", [(50, 37), (33, 33), (1, 7), (64, 96)])
def test_prediction_pads_to_the_grid_and_crops_back_exactly(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(4, (1.0, 0.75, 0.5), width=1 / 32, dropout=0.0).eval()
    image = torch.randn(1, 3, *size)
    probs, attention = predict_batch(model, image)
    assert probs.shape[-2:] == size and attention.shape[-2:] == size
    # the same by hand: pad with the mean colour to 8k+1, run, upsample corner-aligned, crop
    padded = geometry.pad_to_grid(image)
    with torch.no_grad():
        out = model(padded)
    full = torch.nn.functional.interpolate(out["out"], size=padded.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(probs, torch.softmax(full, 1)[..., : size[0], : size[1]])
    # grid pixels 8i carry exactly the network's output i
    torch.testing.assert_close(probs[0, :, ::8, ::8], torch.softmax(out["out"], 1)[0, :, : (size[0] + 7) // 8,
                                                                                      : (size[1] + 7) // 8])
    torch.testing.assert_close(attention.sum(1), torch.ones(1, *size))


def test_pad_to_513_is_deeplabs_test_protocol() -> None:
    torch.manual_seed(0)
    model = build_model(3, (1.0,), width=1 / 32, dropout=0.0).eval()
    image = torch.randn(1, 3, 500, 375)[:, :, :40, :30]
    probs_513, _ = predict_batch(model, image, pad_to=65)
    padded = torch.zeros(1, 3, 65, 65)
    padded[..., :40, :30] = image
    with torch.no_grad():
        logits = model(padded)["out"]
    full = torch.nn.functional.interpolate(logits, size=(65, 65), mode="bilinear", align_corners=True)
    torch.testing.assert_close(probs_513, torch.softmax(full, 1)[..., :40, :30])
    probs_next, _ = predict_batch(model, image)  # padded to 41 x 33 instead: another context, other numbers
    assert not torch.allclose(probs_513, probs_next)


def test_pool5a_is_a_3x3_average_pool_without_parameters() -> None:
    net = build_model(21, (1.0,)).backbone
    pool = net.features.pool5a
    assert isinstance(pool, torch.nn.AvgPool2d) and pool.kernel_size == 3 and pool.stride == 1 and pool.padding == 1
    assert list(net.features._modules)[-1] == "pool5a"
    assert sum(p.numel() for p in build_model(21, (1.0,)).parameters()) == 20_505_429
    assert "pool5a" not in build_model(21, (1.0,), pool5a=False).backbone.features._modules
    x = torch.randn(1, 512, 5, 5)
    expected = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), 3, stride=1)  # Caffe: /9
    torch.testing.assert_close(pool(x), expected)


def test_training_crops_of_8k_plus_1_give_an_exact_loss_grid() -> None:
    model = build_model(3, (1.0, 0.75, 0.5), width=1 / 32, dropout=0.0)
    out = model(torch.randn(1, 3, 65, 65))
    assert [o.shape[-1] for o in out["per_scale"]] == [9, 7, 5]  # 65, 49 and 33 pixels: 8k+1 each
    labels = torch.randint(0, 3, (1, 65, 65))
    loss, terms = segmentation_loss(out, labels)
    losses = set(terms) - {"attention_entropy", "attention_score_gap"}  # statistics, not loss terms
    assert losses == {"merged", "scale_1", "scale_0.75", "scale_0.5"} and torch.isfinite(loss)
