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
    logits: torch.Tensor, labels: torch.Tensor, label_mode: str = "downsample", ignore_index: int = 255,
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean pixel cross-entropy of logits [N, C, h, w] against labels [N, H, W], ignoring ``ignore_index``.

    ``label_mode="downsample"`` shrinks the labels to the logits (read on the output grid, as in
    the paper); ``"upsample"`` enlarges the logits to the labels (corner-aligned bilinear). An
    all-ignored batch gives 0. ``normalizer``: divide the summed cross-entropy by this instead
    of the batch's own count of valid pixels (training: a share of the whole batch's count,
    :func:`valid_pixels`).
    """
    if label_mode == "downsample":
        labels = downsample_labels(labels, logits.shape[-2:])
    elif label_mode == "upsample":
        logits = upsample_logits(logits, labels.shape[-2:])
    else:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    valid = (labels != ignore_index).sum().clamp(min=1) if normalizer is None else normalizer
    return total / valid


def term_logits(outputs: dict, extra_supervision: bool = True) -> dict[str, torch.Tensor]:
    """The logits of every loss term by name: ``"merged"``, then ``"scale_<s>"`` with extra supervision."""
    logits = {"merged": outputs["out"]}
    per_scale = outputs["per_scale"]
    if extra_supervision and len(per_scale) > 1:
        for scale, scale_logits in zip(outputs["scales"], per_scale):
            logits[f"scale_{scale:g}"] = scale_logits
    return logits


def valid_pixels(
    outputs: dict,
    labels: list[torch.Tensor],
    extra_supervision: bool = True,
    label_mode: str = "downsample",
    ignore_index: int = 255,
    extra_supervision_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The pixels each loss term of :func:`segmentation_loss` averages over, counted over several label batches.

    ``outputs`` gives the output grids (every batch of a training step has the same crop);
    ``labels`` are the batches [N, H, W]. Returns int64 device tensors by term name (no
    host-device sync). Takes :func:`segmentation_loss`'s options (``extra_supervision_weight``
    does not change a count).
    """
    counts: dict[str, torch.Tensor] = {}
    by_grid: dict[tuple[int, ...], torch.Tensor] = {}
    for name, logits in term_logits(outputs, extra_supervision).items():
        grid = tuple(logits.shape[-2:]) if label_mode == "downsample" else ()  # upsample: full-resolution labels
        if grid not in by_grid:
            shrunk = [downsample_labels(lab, grid) if grid else lab for lab in labels]
            by_grid[grid] = torch.stack([(lab != ignore_index).sum() for lab in shrunk]).sum()
        counts[name] = by_grid[grid]
    return counts


def segmentation_loss(
    outputs: dict,
    labels: torch.Tensor,
    extra_supervision: bool = True,
    label_mode: str = "downsample",
    ignore_index: int = 255,
    extra_supervision_weight: float = 1.0,
    normalizers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = CE(merged) + lambda * sum_s CE(f^s) (lambda = ``extra_supervision_weight``, 1 in the
    paper; the per-scale terms only with extra supervision and more than one scale).
    ``normalizers`` (by term name) replace each term's own count of valid pixels: training
    divides by the whole batch's count so that its micro-batches add up to the batch's mean.
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

    def term(name: str, logits: torch.Tensor) -> torch.Tensor:
        target = labels
        if label_mode == "downsample":
            size = tuple(logits.shape[-2:])
            target = shrunk[size] if size in shrunk else shrunk.setdefault(size, downsample_labels(labels, size))
        normalizer = None if normalizers is None else normalizers[name]
        return cross_entropy(logits, target, label_mode, ignore_index, normalizer)

    terms = {name: term(name, logits) for name, logits in term_logits(outputs, extra_supervision).items()}
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
