"""Running sums of one analysis pass: confusion matrices, calibration bins, attention statistics, objects.

:class:`Accumulator` takes the :class:`~msattn.analysis.methods.BatchMaps` of every batch and
keeps only sums (and one small row per object and per image), so a pass over any number of
images needs constant memory for the maps. :meth:`Accumulator.state_dict` holds tensors,
numbers, strings and lists only: it is saved with ``torch.save`` and loaded with
``weights_only=True`` to resume a pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from msattn.analysis.methods import SINGLE, BatchMaps, Method
from msattn.analysis.objects import find_objects

#: bins of the reliability diagram (equal width on the confidence)
CALIBRATION_BINS = 15
#: bins of the histograms of normalised attention entropy and of each scale's weight
WEIGHT_BINS = 20
#: the spread of pre-softmax attention scores, histogram in steps of 1 from 0 to 88 (float32 saturates ~87)
GAP_BINS = 89


def calibration_keys(methods: Sequence[Method], own: Method) -> list[str]:
    """The maps whose probabilities are binned for calibration: every single scale and the model's merge."""
    return [m.key for m in methods if m.merge == SINGLE] + ([own.key] if own.merge != SINGLE else [])


def _cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


class Accumulator:
    """Sums over the images of a pass.

    ``methods``: every method whose prediction is scored; ``own``: the model's merge;
    ``num_scales`` (S): scales of the weights; ``skip_classes``: classes that are not objects
    (usually the background).
    """

    def __init__(
        self,
        methods: Sequence[Method],
        own: Method,
        num_classes: int,
        num_scales: int,
        skip_classes: Sequence[int] = (),
        device: str | torch.device = "cpu",
    ) -> None:
        self.keys = [m.key for m in methods]
        self.calibration_keys = calibration_keys(methods, own)
        self.own = own
        self.num_classes, self.num_scales = num_classes, num_scales
        self.skip_classes = tuple(int(c) for c in skip_classes)
        self.device = torch.device(device)
        m, c, s, k, d = len(self.keys), num_classes, num_scales, len(self.calibration_keys), self.device
        f64, i64 = dict(dtype=torch.float64, device=d), dict(dtype=torch.int64, device=d)
        self.confusion = torch.zeros(m, c, c, **i64)  # [method, truth, prediction]
        self.calib_count = torch.zeros(k, CALIBRATION_BINS, **i64)
        self.calib_confidence = torch.zeros(k, CALIBRATION_BINS, **f64)
        self.calib_correct = torch.zeros(k, CALIBRATION_BINS, **i64)
        self.class_pixels = torch.zeros(c, **i64)
        self.class_weight = torch.zeros(c, s, **f64)  # sum of w_s over the class's pixels
        self.class_weight_sq = torch.zeros(c, s, **f64)
        self.class_entropy = torch.zeros(c, **f64)  # sum of the normalised entropy of the weights
        self.entropy_hist = torch.zeros(WEIGHT_BINS, **i64)
        self.weight_hist = torch.zeros(s, WEIGHT_BINS, **i64)
        self.gap_hist = torch.zeros(GAP_BINS, **i64)
        self.has_weights = False
        self.has_scores = False
        # one row per object and per image (kept on the CPU)
        self._obj: dict[str, list[torch.Tensor]] = {name: [] for name in ("image", "cls", "pixels", "share", "weight",
                                                                             "correct")}
        self.image_ids: list[str] = []
        self._img_valid: list[torch.Tensor] = []
        self._img_correct: list[torch.Tensor] = []
        self.sizes: dict[str, int] = {}  # "HxW" (padded to the grid) -> images
        self.images_done = 0

    # ------------------------------------------------------------------ update

    def update(self, maps: BatchMaps, labels: torch.Tensor, ids: Sequence[str], padded_size: Sequence[int]) -> None:
        """Add one batch: ``labels`` int64 [N, H, W] on the device, ``ids`` of its images."""
        valid = (labels >= 0) & (labels < self.num_classes)  # ignore_index and stray values excluded
        safe = torch.where(valid, labels, 0)
        correct = torch.stack([(maps.preds[k] == labels) & valid for k in self.keys], dim=1)  # [N, M, H, W]
        self._confusion(maps, safe, valid)
        self._calibration(maps, labels, valid)
        if maps.weights is not None:
            self._weights(maps.weights, safe, valid)
        if maps.score_gap is not None:
            gvalid = (maps.grid_labels >= 0) & (maps.grid_labels < self.num_classes)
            self._hist(self.gap_hist, maps.score_gap.clamp(0, GAP_BINS - 1).floor().long(), gvalid)
            self.has_scores = True
        self._objects(labels, correct, maps.weights)
        self._images(valid, correct, ids)
        key = f"{int(padded_size[0])}x{int(padded_size[1])}"
        self.sizes[key] = self.sizes.get(key, 0) + len(ids)
        self.images_done += len(ids)

    @staticmethod
    def _hist(target: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> None:
        """target[i] += number of masked positions with index i (index_add: no host sync)."""
        bins = target.shape[-1]
        idx = torch.where(mask, index.clamp(0, bins - 1), bins).reshape(-1)
        counts = torch.zeros(bins + 1, dtype=torch.int64, device=idx.device)
        counts.index_add_(0, idx, torch.ones_like(idx))
        target += counts[:bins].to(target.device)

    def _confusion(self, maps: BatchMaps, safe: torch.Tensor, valid: torch.Tensor) -> None:
        c = self.num_classes
        for m, key in enumerate(self.keys):
            index = torch.where(valid, safe * c + maps.preds[key].clamp(0, c - 1), c * c).reshape(-1)
            counts = torch.zeros(c * c + 1, dtype=torch.int64, device=index.device)
            counts.index_add_(0, index, torch.ones_like(index))
            self.confusion[m] += counts[: c * c].reshape(c, c).to(self.device)

    def _calibration(self, maps: BatchMaps, labels: torch.Tensor, valid: torch.Tensor) -> None:
        for k, key in enumerate(self.calibration_keys):
            conf = maps.confidence[key]
            index = (conf * CALIBRATION_BINS).long().clamp(0, CALIBRATION_BINS - 1)
            idx = torch.where(valid, index, CALIBRATION_BINS).reshape(-1)
            right = ((maps.preds[key] == labels) & valid).reshape(-1).long()
            n = CALIBRATION_BINS + 1
            for target, values in ((self.calib_count, torch.ones_like(idx)), (self.calib_correct, right)):
                sums = torch.zeros(n, dtype=values.dtype, device=idx.device).index_add_(0, idx, values)
                target[k] += sums[:-1].to(self.device)
            conf_sum = torch.zeros(n, dtype=torch.float64, device=idx.device).index_add_(
                0, idx, conf.reshape(-1).double()
            )
            self.calib_confidence[k] += conf_sum[:-1].to(self.device)

    def _weights(self, weights: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor) -> None:
        """Per-class sums of w_s and w_s^2, entropy (over scales, divided by log S) and histograms."""
        self.has_weights = True
        c, s = self.num_classes, self.num_scales
        cls = torch.where(valid, safe, c).reshape(-1)  # spare bin c for ignored pixels
        w = weights.double().permute(1, 0, 2, 3).reshape(s, -1)  # [S, P]
        for target, values in ((self.class_weight, w), (self.class_weight_sq, w * w)):
            sums = torch.zeros(c + 1, s, dtype=torch.float64, device=w.device).index_add_(0, cls, values.T)
            target += sums[:c].to(self.device)
        pixels = torch.zeros(c + 1, dtype=torch.int64, device=w.device).index_add_(0, cls, torch.ones_like(cls))
        self.class_pixels += pixels[:c].to(self.device)
        entropy = -(w * torch.log(w.clamp_min(1e-12))).sum(0) / math.log(s)  # [P], 0 (one scale) .. 1 (uniform)
        sums = torch.zeros(c + 1, dtype=torch.float64, device=w.device).index_add_(0, cls, entropy)
        self.class_entropy += sums[:c].to(self.device)
        flat_valid = valid.reshape(-1)
        self._hist(self.entropy_hist, (entropy * WEIGHT_BINS).long(), flat_valid)
        for i in range(s):
            self._hist(self.weight_hist[i], (w[i] * WEIGHT_BINS).long(), flat_valid)

    def _objects(self, labels: torch.Tensor, correct: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Connected components of every class (CPU); per object: pixels, share, sum of w_s, correct pixels per method."""
        n, m = correct.shape[:2]
        height, width = labels.shape[-2:]
        labels_np = labels.cpu().numpy()
        for i in range(n):
            objects = find_objects(labels_np[i], self.num_classes, self.skip_classes)
            count = len(objects.classes)
            if count == 0:
                continue
            index = torch.from_numpy(objects.pixel_object).to(labels.device).reshape(-1)
            index = torch.where(index >= 0, index, count)
            per_method = torch.zeros(count + 1, m, dtype=torch.int64, device=labels.device)
            per_method.index_add_(0, index, correct[i].reshape(m, -1).T.long())
            if weights is not None:
                w = weights[i].double().reshape(weights.shape[1], -1).T  # [P, S]
                wsum = torch.zeros(count + 1, w.shape[1], dtype=torch.float64, device=w.device).index_add_(0, index, w)
            else:
                wsum = torch.zeros(count + 1, self.num_scales, dtype=torch.float64)
            pixels = torch.from_numpy(objects.pixels)
            self._obj["image"].append(torch.full((count,), self.images_done + i, dtype=torch.int64))
            self._obj["cls"].append(torch.from_numpy(objects.classes))
            self._obj["pixels"].append(pixels)
            self._obj["share"].append(pixels.double() / float(height * width))
            self._obj["weight"].append(wsum[:count].cpu())
            self._obj["correct"].append(per_method[:count].cpu())

    def _images(self, valid: torch.Tensor, correct: torch.Tensor, ids: Sequence[str]) -> None:
        self.image_ids += list(ids)
        self._img_valid.append(valid.reshape(valid.shape[0], -1).sum(1).cpu())
        self._img_correct.append(correct.reshape(*correct.shape[:2], -1).sum(2).cpu())

    # ------------------------------------------------------------------ read out

    def objects(self) -> dict[str, torch.Tensor]:
        """Per-object rows: ``image``, ``cls``, ``pixels`` [K]; ``share`` float [K]; ``weight`` [K, S] (sums); ``correct`` [K, M]."""
        m, s = len(self.keys), self.num_scales
        empty = {"image": torch.zeros(0, dtype=torch.int64), "cls": torch.zeros(0, dtype=torch.int64),
                 "pixels": torch.zeros(0, dtype=torch.int64), "share": torch.zeros(0, dtype=torch.float64),
                 "weight": torch.zeros(0, s, dtype=torch.float64), "correct": torch.zeros(0, m, dtype=torch.int64)}
        return {name: _cat(parts, empty[name]) for name, parts in self._obj.items()}

    def images(self) -> dict[str, Any]:
        """Per-image rows: ``ids``, ``valid`` [I] (scored pixels), ``correct`` [I, M]."""
        m = len(self.keys)
        return {
            "ids": list(self.image_ids),
            "valid": _cat(self._img_valid, torch.zeros(0, dtype=torch.int64)),
            "correct": _cat(self._img_correct, torch.zeros(0, m, dtype=torch.int64)),
        }

    # ------------------------------------------------------------------ persistence

    _TENSORS = ("confusion", "calib_count", "calib_confidence", "calib_correct", "class_pixels", "class_weight",
                "class_weight_sq", "class_entropy", "entropy_hist", "weight_hist", "gap_hist")

    def state_dict(self) -> dict[str, Any]:
        """Everything, as CPU tensors and plain values (loadable with ``weights_only=True``)."""
        state: dict[str, Any] = {name: getattr(self, name).cpu() for name in self._TENSORS}
        state.update(objects=self.objects(), images=self.images(), sizes=dict(self.sizes),
                     images_done=self.images_done, has_weights=self.has_weights, has_scores=self.has_scores,
                     keys=list(self.keys))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["keys"]) != self.keys:
            raise ValueError("the saved pass scored other methods")
        for name in self._TENSORS:
            getattr(self, name).copy_(state[name])
        objects, images = state["objects"], state["images"]
        self._obj = {name: [objects[name]] for name in self._obj}
        self.image_ids = list(images["ids"])
        self._img_valid, self._img_correct = [images["valid"]], [images["correct"]]
        self.sizes = dict(state["sizes"])
        self.images_done = int(state["images_done"])
        self.has_weights, self.has_scores = bool(state["has_weights"]), bool(state["has_scores"])


def as_numpy(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every tensor turned into a numpy array (for the summary)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.numpy()
        elif isinstance(value, dict):
            out[key] = as_numpy(value)
        else:
            out[key] = value
    return out
