"""Attention head options beyond the paper, fc6 dilation, and the attention statistics of the loss."""

from __future__ import annotations

import math

import pytest
import torch

from msattn.config.recipe import recipe_from_dict
from msattn.models.loss import attention_stats, segmentation_loss
from msattn.models.scale import AttentionHead, build_model
from msattn.runtime.checkpoint import make_checkpoint, model_from_checkpoint
from msattn.train.setup import model_spec

TINY = 0.0625


def test_defaults_are_the_papers_head_and_leave_model_args_as_they_were() -> None:
    model = build_model(3, (1.0, 0.5), width=TINY)
    assert not {"attention_init", "attention_temperature", "attention_norm", "fc6_dilation"} & set(model.model_args)
    assert model.backbone.fc6.dilation == (12, 12) and model.head.temperature == 1.0
    assert model.head.conv2.weight.abs().max() > 0  # normal(0.01)


def test_zero_init_starts_uniform() -> None:
    torch.manual_seed(0)
    model = build_model(3, (1.0, 0.75, 0.5), width=TINY, attention_init="zero").eval()
    weights = model(torch.randn(2, 3, 41, 41))["attention"]
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))


def test_temperature_divides_the_scores_and_l2_norm_ignores_the_feature_scale() -> None:
    torch.manual_seed(0)
    head = AttentionHead(8, 2, hidden=4, dropout=0.0)
    cold = AttentionHead(8, 2, hidden=4, dropout=0.0, temperature=4.0)
    cold.load_state_dict(head.state_dict())
    feats = torch.rand(1, 16, 5, 5) * 10
    assert torch.allclose(cold.scores(feats), head.scores(feats) / 4.0)
    normed = AttentionHead(8, 2, hidden=4, dropout=0.0, norm="l2")
    assert torch.allclose(normed.scores(feats), normed.scores(feats * 100.0), atol=1e-5)
    assert not torch.allclose(head.scores(feats), head.scores(feats * 100.0))
    for bad in ({"init": "ones"}, {"norm": "bn"}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            AttentionHead(8, 2, **bad)


def test_options_travel_with_the_checkpoint() -> None:
    model = build_model(3, (1.0, 0.5), width=TINY, attention_init="zero", attention_temperature=2.0,
                        attention_norm="l2", fc6_dilation=3)
    assert model.backbone.fc6.dilation == (3, 3)
    again = model_from_checkpoint(make_checkpoint(model, {"classes": ["a", "b", "c"]}))
    assert again.model_args == model.model_args and again.head.norm == "l2" and again.head.temperature == 2.0
    assert again.backbone.fc6.dilation == (3, 3)


def test_recipe_keys() -> None:
    recipe = recipe_from_dict({"data": {"root": "d"}, "model": {"attention_init": "zero", "fc6_dilation": 4,
                                                                 "attention_norm": "l2", "attention_temperature": 2.0}})
    spec = model_spec(recipe.model, 3)
    assert (spec.attention_init, spec.attention_temperature, spec.attention_norm, spec.fc6_dilation) == ("zero", 2.0, "l2", 4)
    default = model_spec(recipe_from_dict({"data": {"root": "d"}, "model": {"scales": [1.0, 0.5], "width": TINY}}).model, 3)
    assert build_model(default).model_args == build_model(3, (1.0, 0.5), width=TINY).model_args


def test_loss_logs_attention_entropy_and_score_gap_outside_the_total() -> None:
    labels = torch.zeros(1, 9, 9, dtype=torch.long)
    labels[0, :, 8] = 255  # the last output column is ignored
    weights = torch.empty(1, 2, 2, 2)
    weights[0, 0] = torch.tensor([[0.5, 0.9], [0.5, 0.9]])
    weights[0, 1] = 1 - weights[0, 0]
    stats = attention_stats(weights, labels)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    assert stats["attention_entropy"].item() == pytest.approx(1.0)  # only the first column counts: 0.5 / 0.5
    labels[0, :, 8] = 0
    stats = attention_stats(weights, labels)
    assert stats["attention_entropy"].item() == pytest.approx((1 + h) / 2)
    assert stats["attention_score_gap"].item() == pytest.approx(math.log(9) / 2, rel=1e-5)
    model = build_model(3, (1.0, 0.5), width=TINY)
    out = model(torch.randn(1, 3, 33, 33))
    total, terms = segmentation_loss(out, torch.zeros(1, 33, 33, dtype=torch.long))
    assert total.item() == pytest.approx(sum(terms[k].item() for k in ("merged", "scale_1", "scale_0.5")))
    assert 0.99 < terms["attention_entropy"].item() <= 1.0  # normal(0.01) start: nearly uniform
    single = build_model(3, (1.0,), width=TINY)
    _, terms = segmentation_loss(single(torch.randn(1, 3, 33, 33)), torch.zeros(1, 33, 33, dtype=torch.long))
    assert set(terms) == {"merged"}
