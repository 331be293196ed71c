"""The paper's training loss: cross-entropy on the merged output plus one per scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msattn.geometry import shrink_labels, upsample_logits

LABEL_MODES = ("downsample", "upsample")


def downsample_labels(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Labels [N, H, W] read at the output grid's pixels (0, 8, ..., 8k: the paper's choice).

    See :func:`msattn.geometry.shrink_labels`.
    """
    return shrink_labels(labels, size)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_mode: str = "downsample", ignore_index: int = 255
) -> torch.Tensor:
    """Mean pixel cross-entropy of logits [N, C, h, w] against labels [N, H, W], ignoring ``ignore_index``.

    ``label_mode="downsample"`` shrinks the labels to the logits (read on the output grid, as in
    the paper); ``"upsample"`` enlarges the logits to the labels (corner-aligned bilinear). An
    all-ignored batch gives 0.
    """
    if label_mode == "downsample":
        labels = downsample_labels(labels, logits.shape[-2:])
    elif label_mode == "upsample":
        logits = upsample_logits(logits, labels.shape[-2:])
    else:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    valid = (labels != ignore_index).sum().clamp(min=1)
    return total / valid


def segmentation_loss(
    outputs: dict,
    labels: torch.Tensor,
    extra_supervision: bool = True,
    label_mode: str = "downsample",
    ignore_index: int = 255,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = CE(merged) + sum_s CE(f^s) (weight 1 each; the per-scale terms only with extra
    supervision and more than one scale). Returns the total and the detached terms by name
    (``"merged"``, ``"scale_1"``, ``"scale_0.75"``, ...).
    """
    shrunk: dict[tuple[int, ...], torch.Tensor] = {}  # labels on each output grid, read once per size

    def term(logits: torch.Tensor) -> torch.Tensor:
        target = labels
        if label_mode == "downsample":
            size = tuple(logits.shape[-2:])
            target = shrunk[size] if size in shrunk else shrunk.setdefault(size, downsample_labels(labels, size))
        return cross_entropy(logits, target, label_mode, ignore_index)

    terms = {"merged": term(outputs["out"])}
    per_scale = outputs["per_scale"]
    if extra_supervision and len(per_scale) > 1:
        for scale, logits in zip(outputs["scales"], per_scale):
            terms[f"scale_{scale:g}"] = term(logits)
    total = torch.stack(list(terms.values())).sum()
    return total, {name: value.detach() for name, value in terms.items()}
