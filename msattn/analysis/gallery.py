"""The gallery: the images where merging gained and lost most, each with its maps side by side.

Gain of an image = pixel accuracy of the model's merge - that of its best single scale on
that image. The pass keeps only these numbers; the few gallery images are run again here.
"""

from __future__ import annotations

from typing import Any

import torch

from msattn.analysis.methods import SINGLE, forward_maps
from msattn.analysis.plots import gallery_figure
from msattn.data.transforms import denormalize_image
from msattn.visualize import colorize


def select(images: list[dict[str, Any]], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The ``count`` images with the largest positive gains and the ``count`` with the most negative."""
    scored = [r for r in images if r["gain"] is not None]
    gained = sorted((r for r in scored if r["gain"] > 0), key=lambda r: (-r["gain"], r["index"]))[:count]
    lost = sorted((r for r in scored if r["gain"] < 0), key=lambda r: (r["gain"], r["index"]))[:count]
    return [("gained", r) for r in gained] + [("lost", r) for r in lost]


def gallery(job: Any, images: list[dict[str, Any]], count: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Gallery entries (numbers for report.json) and their pictures (PNG bytes), in the same order."""
    if count == 0 or job.own.merge == "scale":
        return [], []
    entries, pictures = [], []
    for kind, row in select(images, count):
        entries.append({"kind": kind, "id": row["id"], "gain": row["gain"], "accuracy": row["accuracy"]})
        pictures.append(render(job, row, kind))
    return entries, pictures


def render(job: Any, row: dict[str, Any], kind: str) -> bytes:
    """Image, ground truth, every scale's prediction, the merged prediction and the weight maps."""
    item = job.dataset[row["index"]]
    images = item["image"][None].to(job.device)
    labels = item["label"][None].to(job.device)
    maps = forward_maps(job.model, images, labels, job.scales, job.methods, job.own, job.amp_dtype, job.settings.pad_to)
    label = item["label"].numpy()
    panels: list[tuple[str, Any, str]] = [
        ("image", denormalize_image(item["image"], job.mean, job.std), "rgb"),
        ("ground truth", colorize(label, job.palette), "rgb"),
    ]
    for method in job.methods:
        if method.merge == SINGLE:
            acc = row["accuracy"][method.key]
            panels.append((f"{method.key} ({100 * acc:.1f}%)", _colour(maps.preds[method.key], label, job), "rgb"))
    acc = row["accuracy"][job.own.key]
    panels.append((f"{job.own.key} ({100 * acc:.1f}%)", _colour(maps.preds[job.own.key], label, job), "rgb"))
    if maps.weights is not None and job.own.merge != "avg":
        for i, s in enumerate(job.scales):
            panels.append((f"weight of scale {s:g}", maps.weights[0, i].float().cpu().numpy(), "weight"))
    title = f"{item['id']}: merging {kind} {100 * row['gain']:+.1f} points of pixel accuracy"
    return gallery_figure(panels, title)


def _colour(pred: torch.Tensor, label: Any, job: Any) -> Any:
    """A prediction in palette colours, ignored ground-truth pixels shown in the void colour."""
    shown = pred[0].cpu().numpy().copy()
    shown[label >= len(job.class_names)] = 255
    return colorize(shown, job.palette)
