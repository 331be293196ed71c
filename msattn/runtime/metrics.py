"""Segmentation metrics from a confusion matrix (torchvision-references style).

``mat[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``; it lives on
the model's device and is filled with one ``index_add_`` per batch, without a host-device
sync. Pixels whose label is ``ignore_index`` (or outside ``[0, num_classes)``) are not
counted.

Per-class IoU = TP / (TP + FP + FN). A class absent from both the ground truth and the
predictions of the evaluated images has no IoU: it is ``NaN`` and left out of the mean
(so evaluating a subset does not count unseen classes as 0 or 1). A class that is
predicted but never present has IoU 0 and counts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a [C, C] confusion matrix; ``compute()`` gives mIoU, pixel accuracy, per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer class maps of the same shape ([N, H, W] or [H, W])."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.to(self.mat.device).reshape(-1).long()
        pred = pred.to(self.mat.device).reshape(-1).long()
        valid = (target >= 0) & (target < n) & (target != self.ignore_index)
        # no boolean indexing and no bincount: both make a GPU wait for the host (output size);
        # uncounted pixels go to a spare bin n*n instead
        index = torch.where(valid, target * n + pred.clamp(0, n - 1), n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, torch.ones_like(index))
        self.mat += counts[: n * n].reshape(n, n)

    def reset(self) -> None:
        self.mat.zero_()

    def reduce(self) -> None:
        """Sum the matrices of all ranks (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def iou(self) -> torch.Tensor:
        """Per-class IoU as float64 [C]; NaN for classes absent from ground truth and prediction."""
        mat = self.mat.double().cpu()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def compute(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """{"miou", "pixel_accuracy", "mean_accuracy", "per_class": {name: IoU or NaN}, "pixels"}."""
        mat = self.mat.double().cpu()
        iou = self.iou()
        total = mat.sum().item()
        gt_count = mat.sum(1)
        acc = torch.where(gt_count > 0, mat.diag() / gt_count.clamp(min=1), torch.full_like(gt_count, math.nan))
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": _nanmean(iou),
            "pixel_accuracy": mat.diag().sum().item() / total if total else math.nan,
            "mean_accuracy": _nanmean(acc),
            "per_class": {name: value for name, value in zip(names, iou.tolist())},
            "pixels": int(total),
        }


def _nanmean(values: torch.Tensor) -> float:
    present = values[~torch.isnan(values)]
    return present.mean().item() if present.numel() else math.nan


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no NaN) in nested dicts/lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_miou(value: float | None) -> str:
    """A score as every command prints it: a percentage with two decimals (``66.64%``), ``-`` when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%"
