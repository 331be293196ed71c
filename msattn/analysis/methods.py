"""The ways of turning a model's per-scale score maps into one prediction, and one forward pass that gives them all.

A *method* is a key such as ``scale:2`` (one branch alone), ``max:2+1`` / ``avg:2+1`` (max or
average merging of a subset of the scales), ``attention:2+1`` (the learned merge, only on
the scales its head was trained on), ``hierarchical:2+1`` (the chain of a hierarchical
model, :mod:`msattn.models.hierarchical`, on any subset that holds 1.0) and ``oracle:2+1``
(per pixel the right class when any scale's own map has it; else the most confident scale's
class: an upper bound on what a per-pixel choice of scale can reach).

Every max/avg subset is computed from the per-scale maps of the one forward pass over all
scales: a scale's map does not depend on the other scales, and the merge follows
:class:`msattn.models.scale.ScaleNet` exactly (maps resized to the grid of the subset's
largest scale, then max or mean), so the result is what a model run on that subset gives.
The same holds for a hierarchical model's subsets: each scale's scores and gate depend on
that scale alone, and :func:`msattn.models.hierarchical.chain` of the subset's maps is what
the model run on the subset returns.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from msattn.geometry import crop_to, pad_to_grid, resize_bilinear, resize_nearest, shrink_labels, upsample_logits
from msattn.models.hierarchical import chain
from msattn.models.spec import HIERARCHICAL

SINGLE, ORACLE = "scale", "oracle"


@dataclass(frozen=True)
class Method:
    """One way of predicting: ``merge`` in {scale, max, avg, attention, hierarchical, oracle} over ``scales``."""

    merge: str
    scales: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.merge}:{'+'.join(f'{s:g}' for s in self.scales)}"

    @property
    def measured_subset(self) -> bool:
        """True for the entries of the scale-subset table (everything but the oracle)."""
        return self.merge != ORACLE


def model_merge(model: torch.nn.Module, scales: Sequence[float]) -> str:
    """What the model's own ``out`` is on ``scales``: ``scale`` (one scale), ``max``, ``avg``, ``attention``
    or ``hierarchical``."""
    if len(scales) == 1:
        return SINGLE
    merge = getattr(model, "merge", "avg")
    if merge == "attention" and getattr(model, "head", True) is None:
        return "avg"  # ScaleNet without a head (trained on one scale) averages
    return merge


def build_methods(scales: Sequence[float], own_merge: str) -> list[Method]:
    """Every single scale, max and avg of every subset of two or more, the model's attention (all the
    scales) or hierarchical chain (every subset of two or more that holds 1.0), the oracle."""
    scales = tuple(float(s) for s in scales)
    methods = [Method(SINGLE, (s,)) for s in scales]
    subsets = [sub for size in range(2, len(scales) + 1) for sub in itertools.combinations(scales, size)]
    for subset in subsets:
        methods += [Method("max", subset), Method("avg", subset)]
    if own_merge == "attention":
        methods.append(Method("attention", scales))
    if own_merge == HIERARCHICAL:
        methods += [Method(HIERARCHICAL, subset) for subset in subsets if 1.0 in subset]
    if len(scales) > 1:
        methods.append(Method(ORACLE, scales))
    return methods


def own_method(scales: Sequence[float], own_merge: str) -> Method:
    """The method that the model's ``out`` is."""
    scales = tuple(float(s) for s in scales)
    return Method(own_merge, scales)


@dataclass
class BatchMaps:
    """Everything the accumulators need from one batch, at image size ``H x W`` on the model's device.

    ``preds``: method key -> int64 [N, H, W]; ``confidence``: key -> float [N, H, W] (max
    softmax probability) for the single scales and the model's own merge; ``weights``: the
    model's merge weights [N, S, H, W] (None for one scale); ``score_gap``: [N, h, w] the
    spread of the attention head's pre-softmax scores on the output grid (max - min, from the
    log weights, so at most ~87 in float32) and ``grid_labels`` [N, h, w] the labels read on
    that grid (both None unless the model merges by attention).
    """

    preds: dict[str, torch.Tensor]
    confidence: dict[str, torch.Tensor]
    weights: torch.Tensor | None
    score_gap: torch.Tensor | None
    grid_labels: torch.Tensor | None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def _to_image(logits: torch.Tensor, full: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    return crop_to(upsample_logits(logits.float(), full), size)


def _merge_subset(
    per_scale: dict[float, torch.Tensor], gates: dict[float, torch.Tensor | None], method: Method
) -> torch.Tensor:
    """The subset's merged scores as the model run on the subset gives them: max or mean of its maps on
    the grid of its largest scale (as ScaleNet merges), or the hierarchical chain on the 1.0 grid."""
    if method.merge == HIERARCHICAL:
        return chain([per_scale[s] for s in method.scales], [gates[s] for s in method.scales], method.scales)[0]
    ref = per_scale[max(method.scales)].shape[-2:]
    stacked = torch.stack([resize_bilinear(per_scale[s].float(), ref) for s in method.scales], dim=1)
    return stacked.max(dim=1).values if method.merge == "max" else stacked.mean(dim=1)


@torch.inference_mode()
def forward_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float],
    methods: Sequence[Method],
    own: Method,
    amp_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
    ignore_index: int = 255,
) -> BatchMaps:
    """One forward of ``model`` on all ``scales`` -> the prediction of every method (see :class:`BatchMaps`).

    images: normalised [N, 3, H, W]; labels: int64 [N, H, W] (for the oracle), both on the model's device.
    """
    size = tuple(images.shape[-2:])
    padded = pad_to_grid(images, pad_to)  # [N, 3, 8k+1, 8l+1]
    full = tuple(padded.shape[-2:])
    with _autocast(images.device, amp_dtype):
        output = model(padded, scales=list(scales))
    order = [float(s) for s in output.get("scales", scales)]
    per_scale = {s: logits.float() for s, logits in zip(order, output["per_scale"])}
    gates = {s: None if g is None else g.float() for s, g in zip(order, output.get("gates") or [None] * len(order))}
    preds: dict[str, torch.Tensor] = {}
    confidence: dict[str, torch.Tensor] = {}
    for method in methods:
        if method.merge == SINGLE:
            logits = _to_image(per_scale[method.scales[0]], full, size)
        elif method.merge in ("max", "avg", HIERARCHICAL) and method != own:
            logits = _to_image(_merge_subset(per_scale, gates, method), full, size)
        elif method == own:
            logits = _to_image(output["out"], full, size)
        else:
            continue  # the oracle, below
        probs = torch.softmax(logits, dim=1)  # [N, C, H, W]
        conf, preds[method.key] = probs.max(dim=1)
        if method.merge == SINGLE or method == own:
            confidence[method.key] = conf
    singles = [m.key for m in methods if m.merge == SINGLE]
    for method in methods:
        if method.merge == ORACLE:
            preds[method.key] = _oracle([preds[k] for k in singles], [confidence[k] for k in singles], labels)
    weights = output.get("attention")
    score_gap = grid_labels = None
    if weights is not None:
        if own.merge == "attention":
            logw = torch.log(weights.float().clamp_min(torch.finfo(torch.float32).tiny))  # [N, S, h, w]
            score_gap = logw.amax(dim=1) - logw.amin(dim=1)
            grid_labels = shrink_labels(_pad_labels(labels, full, ignore_index), score_gap.shape[-2:])
        resize = resize_nearest if own.merge == "max" else resize_bilinear
        weights = crop_to(resize(weights.float(), full), size)  # [N, S, H, W]
    return BatchMaps(preds, confidence, weights, score_gap, grid_labels)


def _pad_labels(labels: torch.Tensor, full: Sequence[int], ignore_index: int) -> torch.Tensor:
    out = labels.new_full((*labels.shape[:-2], int(full[0]), int(full[1])), ignore_index)
    out[..., : labels.shape[-2], : labels.shape[-1]] = labels
    return out


def _oracle(preds: list[torch.Tensor], conf: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per pixel: the label when any scale predicts it, else the most confident scale's prediction."""
    stacked = torch.stack(preds)  # [S, N, H, W]
    most = torch.stack(conf).argmax(dim=0, keepdim=True)  # [1, N, H, W]
    fallback = stacked.gather(0, most)[0]
    right = (stacked == labels.unsqueeze(0)).any(dim=0)
    return torch.where(right, labels, fallback)
