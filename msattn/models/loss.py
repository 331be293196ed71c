"""The paper's training loss: cross-entropy on the merged output plus one per scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from msattn.geometry import shrink_labels, upsample_logits

LABEL_MODES = ("downsample", "upsample")
#: terms segmentation_loss reports beside the losses: logged by training, not part of the total
STAT_TERMS = ("attention_entropy", "attention_score_gap")


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
    extra_supervision_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = CE(merged) + lambda * sum_s CE(f^s) (lambda = ``extra_supervision_weight``, 1 in the
    paper; the per-scale terms only with extra supervision and more than one scale).
    Returns the total and the detached (unweighted) terms by name
    (``"merged"``, ``"scale_1"``, ``"scale_0.75"``, ...), plus, with several scales, two statistics
    of the merge weights that are not part of the total (see :func:`attention_stats`):
    ``"attention_entropy"`` and ``"attention_score_gap"``.

    A hierarchical model (:mod:`msattn.models.hierarchical`) needs nothing else: ``"merged"`` is
    its joint prediction on the 1.0 grid, the per-scale terms its branches (NVIDIA's recipes
    weigh them 0.05), and the statistics read its effective weights (with two scales the score
    gap is |logit| of the low scale's gate, as resized to the 1.0 grid).
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
    if len(terms) > 1 and extra_supervision_weight != 1.0:  # weight 1 keeps the sum above, bit for bit
        extra = torch.stack([value for name, value in terms.items() if name != "merged"]).sum()
        total = terms["merged"] + extra_supervision_weight * extra
    logged = {name: value.detach() for name, value in terms.items()}
    weights = outputs.get("attention")
    if weights is not None and weights.shape[1] > 1:
        grid = shrunk.get(tuple(weights.shape[-2:]))  # the merged term's labels: on the same grid
        logged.update(attention_stats(weights.detach(), labels, ignore_index, grid))
    return total, logged


def attention_stats(
    weights: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, grid_labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Statistics of merge weights [N, S, h, w] over the grid positions whose label is not ignored.

    ``attention_entropy``: mean entropy of the weights over scales divided by log S (1: uniform,
    0: one scale takes all; 0 for max merging, 1 for average merging); ``attention_score_gap``:
    mean spread of the pre-softmax scores (max - min over scales, from the log weights; float32
    saturates near 87), large when the softmax is saturated. No host-device sync. ``grid_labels``:
    ``labels`` already read on the weights' grid (else they are shrunk here).
    """
    w = weights.float()
    if grid_labels is None:
        grid_labels = downsample_labels(labels, w.shape[-2:])
    valid = (grid_labels != ignore_index).float()  # [N, h, w]
    count = valid.sum().clamp(min=1)
    entropy = -(w * torch.log(w.clamp_min(1e-12))).sum(1) / math.log(w.shape[1])
    logw = torch.log(w.clamp_min(torch.finfo(torch.float32).tiny))
    gap = logw.amax(1) - logw.amin(1)
    return {"attention_entropy": (entropy * valid).sum() / count, "attention_score_gap": (gap * valid).sum() / count}
