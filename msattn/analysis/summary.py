"""From the sums of a pass to the numbers of the report (sections 1-6 of ``report.json``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from msattn.analysis.accumulate import CALIBRATION_BINS, GAP_BINS, WEIGHT_BINS
from msattn.analysis.methods import ORACLE, SINGLE, Method
from msattn.analysis.objects import bin_index, bin_labels


def _nan_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def confusion_scores(mat: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean accuracy and per-class IoU of a [C, C] confusion matrix (as ConfusionMatrix)."""
    mat = mat.astype(np.float64)
    tp = np.diag(mat)
    union = mat.sum(0) + mat.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        acc = np.where(mat.sum(1) > 0, tp / np.maximum(mat.sum(1), 1), np.nan)
    total = mat.sum()
    return {
        "miou": _nan_none(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "pixel_accuracy": _nan_none(tp.sum() / total) if total else None,
        "mean_accuracy": _nan_none(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "per_class": {name: _nan_none(v) for name, v in zip(class_names, iou)},
    }


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool | None]:
    """For (accuracy, cost) pairs: True when no other point is at least as accurate and as cheap and better in one.

    Points with a missing value get None.
    """
    marks: list[bool | None] = []
    for i, (acc, cost) in enumerate(points):
        if acc is None or cost is None:
            marks.append(None)
            continue
        dominated = any(
            j != i and a is not None and c is not None and a >= acc and c <= cost and (a > acc or c < cost)
            for j, (a, c) in enumerate(points)
        )
        marks.append(not dominated)
    return marks


def method_table(state: dict[str, Any], methods: Sequence[Method], own: Method, class_names: Sequence[str],
                 costs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Section 1 and 5: one row per method with its scores, cost and Pareto marks."""
    rows = []
    for m, method in enumerate(methods):
        row = {"key": method.key, "merge": method.merge, "scales": list(method.scales), "is_model": method == own,
               **confusion_scores(state["confusion"][m], class_names)}
        cost = costs.get(method.key, {})
        row["gflops"] = cost.get("gflops")
        row["latency_ms"] = cost.get("latency_ms")
        row["latency_source"] = cost.get("latency_source")
        rows.append(row)
    measured = [r for r in rows if r["merge"] != ORACLE]
    for field, mark in (("gflops", "pareto"), ("latency_ms", "pareto_latency")):
        marks = pareto_front([(r["miou"], r[field]) for r in measured])
        for row, flag in zip(measured, marks):
            row[mark] = flag
    for row in rows:
        row.setdefault("pareto", None)
        row.setdefault("pareto_latency", None)
    return rows


def attention_by_class(state: dict[str, Any], scales: Sequence[float], class_names: Sequence[str]) -> dict[str, Any] | None:
    """Section 2: mean and spread (std over pixels) of every scale's weight on each class's pixels."""
    if not state["has_weights"]:
        return None
    pixels = state["class_pixels"].astype(np.float64)
    out = {}
    for c, name in enumerate(class_names):
        n = pixels[c]
        if n == 0:
            out[name] = {"pixels": 0, "mean": None, "std": None, "entropy": None}
            continue
        mean = state["class_weight"][c] / n
        var = np.maximum(state["class_weight_sq"][c] / n - mean**2, 0.0)
        out[name] = {"pixels": int(n), "mean": mean.tolist(), "std": np.sqrt(var).tolist(),
                     "entropy": float(state["class_entropy"][c] / n)}
    return {"scales": list(scales), "classes": out}


def _weighted_corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def size_bins(state: dict[str, Any], methods: Sequence[Method], own: Method, scales: Sequence[float],
              edges: Sequence[float]) -> dict[str, Any]:
    """Sections 3 and 4 by size: per bin the objects, every scale's mean weight, every method's accuracy."""
    obj = state["objects"]
    keys = [m.key for m in methods]
    singles = [m.key for m in methods if m.merge == SINGLE]
    pixels = obj["pixels"].astype(np.float64)
    which = bin_index(obj["share"], edges)
    names = bin_labels(edges)
    bounds = [0.0, *edges, 1.0]
    has_weights = state["has_weights"]
    mean_w = obj["weight"] / np.maximum(pixels, 1)[:, None] if len(pixels) else np.zeros((0, len(scales)))
    bins = []
    for b, name in enumerate(names):
        inside = which == b
        n = int(inside.sum())
        row: dict[str, Any] = {"label": name, "lo": bounds[b], "hi": bounds[b + 1], "objects": n,
                               "pixels": int(pixels[inside].sum())}
        if n and has_weights:
            row["weight_mean"] = mean_w[inside].mean(0).tolist()  # over objects
            row["weight_std"] = mean_w[inside].std(0).tolist()
            row["weight_pixel_mean"] = (obj["weight"][inside].sum(0) / pixels[inside].sum()).tolist()
        else:
            row["weight_mean"] = row["weight_std"] = row["weight_pixel_mean"] = None
        if n:
            acc = obj["correct"][inside].sum(0) / pixels[inside].sum()
            row["accuracy"] = {k: float(a) for k, a in zip(keys, acc)}
            best = max(singles, key=lambda k: row["accuracy"][k])
            row["best_single"] = best
            row["gain"] = row["accuracy"][own.key] - row["accuracy"][best] if own.merge != SINGLE else 0.0
        else:
            row["accuracy"], row["best_single"], row["gain"] = None, None, None
        bins.append(row)
    correlation = None
    if has_weights and len(pixels) >= 3:
        logs = np.log(obj["share"])
        correlation = {f"{s:g}": _weighted_corr(logs, mean_w[:, i]) for i, s in enumerate(scales)}
    return {"edges": list(edges), "labels": names, "bins": bins, "objects": int(len(pixels)),
            "weight_size_correlation": correlation}


def merge_gain_by_class(rows: list[dict[str, Any]], own: Method, class_names: Sequence[str]) -> dict[str, Any]:
    """Section 4 by class: the model's IoU against the best single scale's, per class."""
    by_key = {r["key"]: r for r in rows}
    singles = [r for r in rows if r["merge"] == SINGLE]
    out = {}
    for name in class_names:
        candidates = [(r["per_class"][name], r["key"]) for r in singles if r["per_class"][name] is not None]
        model = by_key[own.key]["per_class"][name]
        if not candidates or model is None:
            out[name] = {"model": model, "best_single": None, "best_single_key": None, "gain": None}
            continue
        best, key = max(candidates)
        out[name] = {"model": model, "best_single": best, "best_single_key": key, "gain": model - best}
    best_row = max(singles, key=lambda r: r["miou"] if r["miou"] is not None else -1)
    return {"per_class": out, "best_single": best_row["key"],
            "miou_gain": (by_key[own.key]["miou"] or 0.0) - (best_row["miou"] or 0.0)}


def calibration(state: dict[str, Any], calibration_keys: Sequence[str]) -> dict[str, Any]:
    """Section 6: expected calibration error and the reliability diagram of every calibrated map."""
    out = {}
    for k, key in enumerate(calibration_keys):
        count = state["calib_count"][k].astype(np.float64)
        total = count.sum()
        conf = np.where(count > 0, state["calib_confidence"][k] / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, state["calib_correct"][k] / np.maximum(count, 1), np.nan)
        gaps = np.where(count > 0, np.abs(acc - conf), 0.0)
        ece = float((count / total * gaps).sum()) if total else None
        out[key] = {
            "ece": ece,
            "bins": [{"lo": b / CALIBRATION_BINS, "hi": (b + 1) / CALIBRATION_BINS, "count": int(count[b]),
                      "confidence": _nan_none(conf[b]), "accuracy": _nan_none(acc[b])} for b in range(CALIBRATION_BINS)],
        }
    return {"bins": CALIBRATION_BINS, "maps": out}


def _hist_quantile(hist: np.ndarray, q: float) -> float | None:
    total = hist.sum()
    if not total:
        return None
    return float(np.searchsorted(np.cumsum(hist), q * total, side="left"))


def attention_entropy(state: dict[str, Any], scales: Sequence[float]) -> dict[str, Any] | None:
    """Section 6: does the model hedge? Entropy of the weights over scales (0 one scale, 1 uniform), histograms."""
    if not state["has_weights"]:
        return None
    pixels = state["class_pixels"].sum()
    hist = state["entropy_hist"]
    weight_hist = state["weight_hist"]
    out: dict[str, Any] = {
        "mean": float(state["class_entropy"].sum() / pixels) if pixels else None,
        "histogram": hist.tolist(),
        "histogram_edges": [b / WEIGHT_BINS for b in range(WEIGHT_BINS + 1)],
        "near_one_hot_share": float(hist[0] / hist.sum()) if hist.sum() else None,
        "weight_histograms": {f"{s:g}": weight_hist[i].tolist() for i, s in enumerate(scales)},
        "mean_weight": {f"{s:g}": float(state["class_weight"][:, i].sum() / pixels) if pixels else None
                        for i, s in enumerate(scales)},
    }
    if state["has_scores"]:
        gap = state["gap_hist"]
        out["score_gap"] = {
            "median": _hist_quantile(gap, 0.5),
            "p90": _hist_quantile(gap, 0.9),
            "share_over_10": float(gap[10:].sum() / gap.sum()) if gap.sum() else None,
            "histogram": gap.tolist(),
            "histogram_step": 1.0,
            "saturates_at": GAP_BINS - 1,
        }
    else:
        out["score_gap"] = None
    return out


def image_rows(state: dict[str, Any], methods: Sequence[Method], own: Method) -> list[dict[str, Any]]:
    """Per image: pixel accuracy of every single scale, the model and the oracle; gain = model - best single."""
    images = state["images"]
    keys = [m.key for m in methods]
    wanted = [m.key for m in methods if m.merge in (SINGLE, ORACLE)] + [own.key]
    rows = []
    for i, image_id in enumerate(images["ids"]):
        valid = int(images["valid"][i])
        acc = {k: (float(images["correct"][i][keys.index(k)]) / valid if valid else None) for k in dict.fromkeys(wanted)}
        singles = [acc[m.key] for m in methods if m.merge == SINGLE and acc[m.key] is not None]
        gain = acc[own.key] - max(singles) if singles and acc[own.key] is not None else None
        rows.append({"index": i, "id": image_id, "pixels": valid, "accuracy": acc, "gain": gain})
    return rows
