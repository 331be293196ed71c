"""Hierarchical multi-scale attention (msattn.models.hierarchical): the chain, its weights, training and checks.

Hand-made cases replace the backbone and the gate head by stubs that return chosen score maps
and gates per scale, so the answer is known exactly; random tiny models check the invariants.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from msattn.geometry import output_side, scaled_size
from msattn.models.hierarchical import GATE_HIDDEN, GateHead, chain
from msattn.models.loss import cross_entropy, segmentation_loss
from msattn.models.params import param_groups
from msattn.models.scale import build_model
from msattn.models.spec import ModelSpec

TINY = 0.0625
SIDE = 65  # 8 * 8 + 1: grids of 17 (scale 2), 13 (1.5), 9 (1), 5 (0.5), 3 (0.25) positions a side


def tiny(scales=(1.0, 0.5), classes=4, seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(classes, scales=scales, merge="hierarchical", width=TINY, dropout=0.0, **kw)


def up(x: torch.Tensor, size) -> torch.Tensor:
    """Corner-aligned bilinear, written out (not msattn.geometry) for the reference formulas."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class StubBackbone(nn.Module):
    """(features, logits) chosen per scale, keyed by the scale's input side; the features carry the gate."""

    feature_channels = 1

    def __init__(self, maps: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.maps = maps  # input side -> (gate [h, w], logits [C, h, w])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, logits = self.maps[x.shape[-2]]
        n = x.shape[0]
        return gate.expand(n, 1, *gate.shape), logits.expand(n, *logits.shape)


class StubGate(nn.Module):
    """The gate head of the stubs: the features are the gate."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def stubbed(maps_by_scale: dict[float, tuple[Any, torch.Tensor]], classes: int) -> nn.Module:
    """A hierarchical model whose scale ``s`` gives gate ``maps_by_scale[s][0]`` and scores ``[1]`` on a SIDE image."""
    model = tiny(classes=classes).eval()
    maps = {}
    for s, (gate, logits) in maps_by_scale.items():
        side = scaled_size((SIDE, SIDE), s)[0]
        h = output_side(side)
        assert logits.shape[-2:] == (h, h), (s, logits.shape)
        gate = torch.full((h, h), float(gate)) if not isinstance(gate, torch.Tensor) else gate
        maps[side] = (gate, logits)
    model.backbone = StubBackbone(maps)
    model.gate = StubGate()
    return model


def constant(vector: torch.Tensor, h: int) -> torch.Tensor:
    return vector.view(-1, 1, 1).expand(-1, h, h).clone()


# ----------------------------------------------------------------------------- hand-made cases


def test_the_coarse_branch_takes_over_exactly_where_its_gate_opens_on_a_large_object() -> None:
    """The fine branch misses a large object, the coarse one a small one; the gate opens on the large one."""
    bg, obj = torch.tensor([3.0, -3.0]), torch.tensor([-2.0, 2.0])  # scores saying "background" / "object"
    truth = torch.zeros(9, 9, dtype=torch.long)  # on the 1.0 grid
    truth[2:7, 2:7] = 1  # a large object
    truth[0, 0] = 1  # a small one
    p_fine = constant(bg, 9)
    p_fine[:, 0, 0] = obj  # right on the small object and the background, wrong on the large object
    p_coarse = constant(bg, 5)
    p_coarse[:, 1:4, 1:4] = obj[:, None, None]  # right on the large object (1.0 rows 2..6), blind to the small
    gate = torch.zeros(5, 5)
    gate[1:4, 1:4] = 1.0
    model = stubbed({1.0: (0.7, p_fine), 0.5: (gate, p_coarse)}, classes=2)
    out = model(torch.zeros(1, 3, SIDE, SIDE))

    r = torch.tensor([0, 0.5, 1, 1, 1, 1, 1, 0.5, 0])  # the coarse gate on the 1.0 grid, one axis
    g = torch.outer(r, r)  # up(a): bilinear of a 0/1 block, known exactly
    expected = g * obj.view(2, 1, 1) + (1 - g) * p_fine  # up(a * p_coarse) = up(a) * obj: p_coarse = obj where a = 1
    torch.testing.assert_close(out["out"][0], expected)
    torch.testing.assert_close(out["attention"][0], torch.stack([1 - g, g]))  # in the order of the scales
    assert torch.equal(out["out"][0].argmax(0), truth)  # the chain is right everywhere...
    assert not torch.equal(p_fine.argmax(0), truth)  # ...each branch alone is not
    assert not torch.equal(up(p_coarse[None], (9, 9))[0].argmax(0), truth)
    assert out["gates"][0] is None and torch.equal(out["gates"][1][0, 0], gate)
    flipped = model(torch.zeros(1, 3, SIDE, SIDE), scales=(0.5, 1.0))
    torch.testing.assert_close(flipped["out"], out["out"])
    torch.testing.assert_close(flipped["attention"], out["attention"].flip(1))


@pytest.mark.parametrize(
    ("gates", "weights"),
    [
        ({2.0: 0.9, 1.0: 0.25, 0.5: 0.5}, {2.0: 0.375, 1.0: 0.125, 0.5: 0.5}),
        ({2.0: 0.9, 1.5: 0.5, 1.0: 0.5, 0.5: 0.5}, {2.0: 0.125, 1.5: 0.125, 1.0: 0.25, 0.5: 0.5}),
        ({1.0: 0.3, 0.5: 0.2, 0.25: 0.5}, {1.0: 0.8 * 0.5, 0.5: 0.2 * 0.5, 0.25: 0.5}),
    ],
)
def test_constant_gates_give_the_products_of_the_chain(gates: dict[float, float], weights: dict[float, float]) -> None:
    """W_s = a_s * prod over later (lower) scales of (1 - a_t); the highest scale's gate (0.9) is not used."""
    torch.manual_seed(1)
    scores = {s: torch.randn(3) for s in gates}
    maps = {s: (a, constant(scores[s], output_side(scaled_size((SIDE, SIDE), s)[0]))) for s, a in gates.items()}
    model = stubbed(maps, classes=3)
    order = sorted(gates, key=lambda s: (s != 1.0, s))  # 1.0 first, then low to high: not the chain's order
    out = model(torch.zeros(2, 3, SIDE, SIDE), scales=order)
    assert out["out"].shape == (2, 3, 9, 9) and out["attention"].shape == (2, len(order), 9, 9)  # the 1.0 grid
    expected = sum(weights[s] * scores[s] for s in gates)
    torch.testing.assert_close(out["out"], constant(expected, 9).expand(2, -1, -1, -1))
    for k, s in enumerate(order):
        torch.testing.assert_close(out["attention"][:, k], torch.full((2, 9, 9), weights[s]))


def test_downsampling_the_chain_between_nested_grids_is_exact() -> None:
    """2.0 -> 1.0 on a grid image: the 1.0 grid is every other position of the 2.0 grid."""
    torch.manual_seed(2)
    p2, p1, a1 = torch.randn(3, 17, 17), torch.randn(3, 9, 9), torch.rand(9, 9)
    out = stubbed({2.0: (0.5, p2), 1.0: (a1, p1)}, classes=3)(torch.zeros(1, 3, SIDE, SIDE), scales=(2.0, 1.0))
    torch.testing.assert_close(out["out"][0], a1 * p1 + (1 - a1) * p2[:, ::2, ::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["attention"][0], torch.stack([1 - a1, a1]), rtol=0, atol=1e-6)
    shut = stubbed({2.0: (0.5, p2), 1.0: (0.0, p1)}, classes=3)(torch.zeros(1, 3, SIDE, SIDE), scales=(2.0, 1.0))
    torch.testing.assert_close(shut["out"][0], p2[:, ::2, ::2], rtol=0, atol=0)


def test_the_chain_is_nvidias_loop_on_random_maps() -> None:
    """chain() against NVIDIA's nscale_forward loop, written out with corner-aligned resizes."""
    torch.manual_seed(3)
    scales = (0.5, 2.0, 1.0, 0.25)
    sizes = {2.0: 17, 1.0: 9, 0.5: 5, 0.25: 3}
    p = {s: torch.randn(2, 4, sizes[s], sizes[s]) for s in scales}
    a = {s: torch.rand(2, 1, sizes[s], sizes[s]) for s in scales}
    pred = None
    for s in sorted(scales, reverse=True):
        if pred is None:
            pred = p[s]
        elif s >= 1.0:
            pred = up(pred, p[s].shape[-2:])
            pred = a[s] * p[s] + (1 - a[s]) * pred
        else:
            pred = up(a[s] * p[s], pred.shape[-2:]) + (1 - up(a[s], pred.shape[-2:])) * pred
    out, weights = chain([p[s] for s in scales], [a[s] for s in scales], scales)
    torch.testing.assert_close(out, pred)
    a1, a05, a025 = a[1.0], up(a[0.5], (9, 9)), up(a[0.25], (9, 9))  # the weights written out
    expected = {
        2.0: (1 - a1) * (1 - a05) * (1 - a025),
        1.0: a1 * (1 - a05) * (1 - a025),
        0.5: a05 * (1 - a025),
        0.25: a025,
    }
    torch.testing.assert_close(weights, torch.cat([expected[s] for s in scales], dim=1))


# ----------------------------------------------------------------------------- random models


def test_one_scale_is_the_one_branch() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 41, 33)
    out = model(x, scales=[1.0])
    assert torch.equal(out["out"], model.backbone(x)[1])
    assert out["attention"] is None and out["gates"] == [None] and out["scales"] == (1.0,)


@pytest.mark.parametrize(
    "scales", [(1.0, 0.5), (0.5, 1.0), (2.0, 1.0), (2.0, 1.0, 0.5), (1.0, 0.75, 0.5), (2.0, 1.0, 0.5, 0.25)]
)
@pytest.mark.parametrize("size", [(SIDE, SIDE), (37, 50)])
def test_the_weights_of_a_chain_sum_to_one(scales: tuple[float, ...], size: tuple[int, int]) -> None:
    model = tiny(seed=len(scales)).eval()
    with torch.no_grad():
        for p in model.gate.parameters():  # gates spread over (0, 1), not all near 0.5
            p.normal_(0, 1)
    out = model(torch.randn(2, 3, *size), scales=scales)
    grid = out["per_scale"][scales.index(1.0)].shape[-2:]
    assert grid == (output_side(size[0]), output_side(size[1]))
    assert out["out"].shape == (2, 4, *grid) and out["attention"].shape == (2, len(scales), *grid)
    weights = out["attention"]
    assert (weights >= 0).all() and weights.std() > 0.05
    torch.testing.assert_close(weights.sum(1), torch.ones_like(weights[:, 0]))
    top = scales.index(max(scales))
    assert [g is None for g in out["gates"]] == [i == top for i in range(len(scales))]
    for s, logits, g in zip(scales, out["per_scale"], out["gates"]):
        assert logits.shape[-2:] == tuple(output_side(side) for side in scaled_size(size, s))
        assert g is None or g.shape == (2, 1, *logits.shape[-2:])


def test_training_forward_is_the_published_two_scale_formula() -> None:
    model = tiny().train()
    x = torch.randn(2, 3, SIDE, SIDE)
    out = model(x)
    with torch.no_grad():  # the same modules called again, on their own (batch norm on batch statistics)
        feats_lo, p_lo = model.backbone(up(x, scaled_size(x.shape[-2:], 0.5)))
        _, p_1x = model.backbone(x)
        a = model.gate(feats_lo)
    joint = up(a * p_lo, p_1x.shape[-2:]) + (1 - up(a, p_1x.shape[-2:])) * p_1x
    torch.testing.assert_close(out["out"].detach(), joint)
    torch.testing.assert_close(out["gates"][1].detach(), a)
    assert out["gates"][0] is None
    labels = torch.randint(0, 4, (2, SIDE, SIDE))
    total, terms = segmentation_loss(out, labels, extra_supervision_weight=0.05)  # NVIDIA's weight
    expected = cross_entropy(joint, labels) + 0.05 * (cross_entropy(p_1x, labels) + cross_entropy(p_lo, labels))
    torch.testing.assert_close(total.detach(), expected)
    assert {"merged", "scale_1", "scale_0.5", "attention_entropy", "attention_score_gap"} == set(terms)


def test_training_keeps_batch_norm_statistics_of_every_scale_and_eval_skips_the_unused_gate() -> None:
    model = tiny().train()
    calls: list[tuple[int, ...]] = []
    model.gate.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape[-2:])))
    model(torch.randn(1, 3, SIDE, SIDE))
    assert sorted(calls) == [(5, 5), (9, 9)]  # the 1.0 gate too, as NVIDIA's training does
    calls.clear()
    model.eval()(torch.randn(1, 3, SIDE, SIDE), scales=(2.0, 1.0, 0.5))
    assert sorted(calls) == [(5, 5), (9, 9)]  # not the 2.0 gate (17 x 17)


def test_gradients_reach_every_parameter() -> None:
    model = tiny().train()
    out = model(torch.randn(2, 3, SIDE, SIDE))
    loss, _ = segmentation_loss(out, torch.randint(0, 4, (2, SIDE, SIDE)), extra_supervision_weight=0.05)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_the_gate_head_is_nvidias() -> None:
    model = build_model(21, (1.0, 0.5), merge="hierarchical")
    gate = model.gate
    assert model.head is None  # code that checks model.head for the softmax head leaves it alone
    assert isinstance(gate, GateHead) and gate.conv1.in_channels == model.backbone.feature_channels == 1024
    assert gate.conv1.kernel_size == gate.conv2.kernel_size == (3, 3) and gate.score.kernel_size == (1, 1)
    assert gate.conv1.out_channels == gate.conv2.out_channels == GATE_HIDDEN and gate.score.out_channels == 1
    assert all(conv.bias is None for conv in (gate.conv1, gate.conv2, gate.score))
    assert isinstance(gate.bn1, nn.BatchNorm2d) and isinstance(gate.bn2, nn.BatchNorm2d)
    params = sum(p.numel() for p in gate.parameters())
    assert params == 1024 * 256 * 9 + 256 * 256 * 9 + 256 + 2 * 2 * 256
    assert sum(p.numel() for p in model.parameters()) == 20_505_429 + params
    assert tiny().gate.conv1.out_channels == 16  # width scales the 256


def test_the_gate_head_is_grouped_with_the_attention_head() -> None:
    model = tiny()
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 5e-4, head_lr_mult=10.0, attention_lr_mult=3.0)}
    gate = model.gate
    weights = {id(p) for p in (gate.conv1.weight, gate.conv2.weight, gate.score.weight)}
    weights |= {id(gate.bn1.weight), id(gate.bn2.weight)}  # batch-norm scales: decayed like weights
    assert {id(p) for p in groups["attention_weight"]["params"]} == weights
    assert {id(p) for p in groups["attention_bias"]["params"]} == {id(gate.bn1.bias), id(gate.bn2.bias)}
    assert groups["attention_weight"]["lr"] == pytest.approx(3e-3) and groups["attention_bias"]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- checkpoints and checks


def test_model_args_round_trip_and_old_models_are_unchanged() -> None:
    model = tiny()
    args = model.model_args
    assert args["merge"] == "hierarchical" and args["scales"] == [1.0, 0.5]
    assert ModelSpec.from_args(args) == model.spec
    clone = build_model(ModelSpec.from_args(args))
    clone.load_state_dict(model.state_dict())  # strict: the same parameter and buffer names
    x = torch.randn(1, 3, SIDE, SIDE)
    three = (2.0, 1.0, 0.5)
    torch.testing.assert_close(clone.eval()(x, scales=three)["out"], model.eval()(x, scales=three)["out"])
    old = {"num_classes": 21, "scales": [1.0, 0.75, 0.5], "merge": "attention", "extra_supervision": True, "width": 1.0,
           "dropout": 0.5, "attention_hidden": 512, "attention_dropout": 0.5, "pool5a": True}  # fmt: skip
    spec = ModelSpec.from_args(old)
    assert spec.to_args() == old  # what msattn 0.1 wrote, no new keys
    with torch.device("meta"):
        names = set(build_model(spec).state_dict())
    assert not any(name.startswith("gate.") for name in names) and any(name.startswith("head.") for name in names)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": (1.0,)}, "exactly two scales, one of them 1.0"),
        ({"scales": (1.0, 0.75, 0.5)}, "exactly two scales"),
        ({"scales": (0.75, 0.5)}, "one of them 1.0"),
        ({"scales": (1.0, 0.5), "attention_init": "zero"}, "attention_init is an option of the softmax"),
        ({"scales": (1.0, 0.5), "attention_temperature": 2.0}, "attention_temperature is an option"),
        ({"scales": (1.0, 0.5), "attention_norm": "l2"}, "attention_norm is an option"),
    ],
)
def test_bad_training_specs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(3, merge="hierarchical", **kwargs)


@pytest.mark.parametrize("scales", [(2.0, 0.5), (0.5,), (0.75, 0.5, 0.25)])
def test_scale_lists_without_one_are_refused(scales: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"needs scale 1.0 among its scales \(its output is on the 1.0 grid\)"):
        tiny().eval()(torch.randn(1, 3, 33, 33), scales=scales)
    with pytest.raises(ValueError, match="needs scale 1.0"):
        chain([torch.zeros(1, 2, 3, 3)] * len(scales), [torch.zeros(1, 1, 3, 3)] * len(scales), scales)


def test_any_scales_with_one_are_taken_in_the_order_given() -> None:
    model = tiny().eval()
    x = torch.randn(1, 3, SIDE, SIDE)
    a, b = model(x, scales=(0.5, 2.0, 1.0)), model(x, scales=(2.0, 1.0, 0.5))
    assert a["scales"] == (0.5, 2.0, 1.0) and a["per_scale"][0].shape[-2:] == (5, 5)
    torch.testing.assert_close(a["out"], b["out"])
    torch.testing.assert_close(a["attention"], b["attention"][:, [2, 0, 1]])


# ----------------------------------------------------------------------------- export and host syncs


class _SyncRecorder(TorchDispatchMode):
    """aten ops that would make the host wait for a CUDA device (see tests/test_sync_free.py)."""

    SYNC: ClassVar[set[str]] = {
        "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "allclose", "item",
    }  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(getattr(func, "overloadpacket", func)).removeprefix("aten.")
        if name in self.SYNC:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_training_step_and_inference_never_sync_the_host() -> None:
    with _SyncRecorder() as check:
        torch.ones(2).sum().item()
    assert check.ops == ["_local_scalar_dense"]  # the recorder sees a sync when there is one
    model = tiny().train()
    x, labels = torch.randn(2, 3, SIDE, SIDE), torch.randint(0, 4, (2, SIDE, SIDE))
    with _SyncRecorder() as recorder:
        loss, _ = segmentation_loss(model(x), labels, extra_supervision_weight=0.05)
        loss.backward()
        model.eval()(x, scales=(2.0, 1.0, 0.5))
    assert recorder.ops == []


def test_torch_export_traces_the_chain_over_a_static_scale_list() -> None:
    class Wrapped(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(x, scales=(2.0, 1.0, 0.5))
            return out["out"], out["attention"]

    wrapped = Wrapped(tiny().eval()).eval()
    x = torch.randn(1, 3, 33, 33)
    exported = torch.export.export(wrapped, (x,))
    out, weights = exported.module()(x)
    expected_out, expected_weights = wrapped(x)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(weights, expected_weights)


def test_the_onnx_graph_chains_instead_of_averaging() -> None:
    """The deploy graph runs the chain (tests/test_hierarchical_commands.py: equal to predict_batch), not avg."""
    from msattn.export.graph import DeployGraph

    model = tiny().eval()
    graph = DeployGraph(model, (2.0, 1.0, 0.5), (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)).eval()
    assert graph.merge == "hierarchical" and graph.gate is model.gate
    image = torch.randint(0, 256, (1, SIDE, SIDE, 3), dtype=torch.uint8)
    with torch.no_grad():
        probs, weights = graph(image)
        out = model(image.permute(0, 3, 1, 2).float(), scales=(2.0, 1.0, 0.5))
    torch.testing.assert_close(probs, torch.softmax(F.interpolate(out["out"], size=(SIDE, SIDE), mode="bilinear",
                                                                  align_corners=True), dim=1))  # fmt: skip
    torch.testing.assert_close(weights, up(out["attention"], (SIDE, SIDE)))
