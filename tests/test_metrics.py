"""Confusion matrix and mIoU on hand-made examples."""

from __future__ import annotations

import math

import pytest
import torch

from msattn.runtime.metrics import ConfusionMatrix, json_safe


def test_confusion_matrix_counts_and_ignores_255() -> None:
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(cm.mat, expected)


def test_miou_pixel_accuracy_and_per_class_by_hand() -> None:
    cm = ConfusionMatrix(3)
    cm.mat = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = cm.compute(["bg", "a", "b"])
    # IoU: bg 1/(2+2-1)=1/3, a 2/(2+3-2)=2/3, b 1/(2+1-1)=1/2
    assert m["per_class"]["bg"] == pytest.approx(1 / 3)
    assert m["per_class"]["a"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"] == pytest.approx(1 / 2)
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["pixels"] == 6


def test_absent_class_is_nan_and_excluded_but_false_positive_class_counts_zero() -> None:
    cm = ConfusionMatrix(4)
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2])  # class 2 predicted, never present; class 3 absent everywhere
    cm.update(pred, target)
    iou = cm.iou()
    assert iou[0] == 1.0 and iou[1] == pytest.approx(0.5) and iou[2] == 0.0
    assert math.isnan(iou[3])
    assert cm.compute()["miou"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_perfect_prediction_and_accumulation_over_batches() -> None:
    cm = ConfusionMatrix(2)
    for _ in range(3):
        labels = torch.tensor([[0, 1], [1, 1]])
        cm.update(labels.clone(), labels)
    assert cm.compute()["miou"] == 1.0
    assert int(cm.mat.sum()) == 12
    cm.reset()
    assert int(cm.mat.sum()) == 0


def test_out_of_range_labels_are_not_counted_and_shape_mismatch_fails() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 7, 1]))
    assert int(cm.mat.sum()) == 2
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))


def test_empty_matrix_and_json_safe() -> None:
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_accuracy"])
    safe = json_safe(m)
    assert safe["miou"] is None and safe["per_class"] == {"0": None, "1": None}
