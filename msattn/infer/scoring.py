"""Scoring a model on a dataset: confusion-matrix mIoU at full label resolution (``evaluate_model``).

For every image the merged logits are upsampled (bilinear) to the image size, turned into
probabilities (averaged with the flipped image's with ``flip``), optionally refined by the
dense CRF, and their argmax is scored against the label (255 ignored). ``msattn evaluate``
(:mod:`msattn.infer.evaluate`) and training's validation call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch.utils.data import DataLoader, Subset

from msattn.config.crf import CRFParams
from msattn.crf.dense import dense_crf
from msattn.data.labels import WarningLog
from msattn.geometry import STRIDE
from msattn.infer.graphs import make_runner
from msattn.infer.options import InferenceOptions
from msattn.infer.tiled import predict_tiled
from msattn.runtime.distributed import DistInfo
from msattn.runtime.metrics import ConfusionMatrix
from msattn.tiling.memory import memory_model_from_args
from msattn.tiling.run import Planner


@dataclass(frozen=True)
class CrfInput:
    """The dense CRF's settings and the normalisation that turns network inputs back into RGB."""

    params: CRFParams
    mean: Sequence[float]
    std: Sequence[float]


def _collate_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    num_classes: int,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
    options: InferenceOptions = InferenceOptions(),
    *,
    crf: CrfInput | None = None,
    limit: int | None = None,
    dist: DistInfo | None = None,
    workers: int = 0,
    progress: bool = True,
    console: Console | None = None,
    runner: Any = None,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (items ``{"image", "label", "id"}`` at full resolution).

    ``options`` (:class:`InferenceOptions`) say how images go through the model: every image is
    padded to the next 8k+1 side (or to ``options.pad_to``, DeepLab's 513) and the prediction
    cropped back (:func:`msattn.infer.forward.predict_batch`); consecutive images of one size
    are batched (up to ``options.batch_size``); images over ``options.tiling``'s tile or memory
    budget are predicted tile by tile. ``runner`` (an :class:`msattn.infer.graphs.InferenceRunner`
    built from the same options) replaces the one made here, e.g. to keep its CUDA-graph summary.

    Images are sharded over ``dist``'s ranks (default: one process on CPU) and the confusion
    matrix is summed over them. ``crf`` refines the probabilities with the dense CRF. Returns
    :meth:`ConfusionMatrix.compute` plus ``num_images``, ``scored_pixels`` and ``warnings``.
    """
    dist = dist or DistInfo()
    device = dist.device
    total = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(dist.rank, total, dist.world_size))
    loader = _loader(dataset, indices, options.batch_size or 1, workers, device)
    was_training = model.training
    model.eval()
    runner = runner or make_runner(model, options, device)
    if options.tiling is not None:  # whole or tiles, decided per image by the memory planner
        runner = _PlannedRunner(runner, _planner(model, options, device))
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    progress_bar = _eval_progress(console or Console(highlight=False, soft_wrap=True), enabled=progress and dist.is_main)
    try:
        log = _score_all(loader, len(indices), runner, matrix, device, crf, progress_bar)
    finally:
        model.train(was_training)
    matrix.reduce()
    metrics = matrix.compute(class_names)
    metrics["num_images"] = total
    metrics["scored_pixels"] = int(matrix.mat.sum().item())  # 0: every pixel was ignore_index
    metrics["warnings"] = log.lines()  # this rank's (rank 0's under DDP)
    return metrics


def _planner(model: torch.nn.Module, options: InferenceOptions, device: torch.device) -> Planner:
    """The tiling planner (--tile, --max-memory: whole or tiles per image) for ``model``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    args = getattr(model, "model_args", None) or {"num_classes": model.num_classes, "scales": list(model.scales)}
    exact = bool(getattr(getattr(model, "backbone", None), "grid_exact", True))
    memory = memory_model_from_args(args, options.scales, weights, int(getattr(model, "stride", STRIDE)), exact)
    return Planner(options.tiling, memory, str(device))


def _loader(dataset: Any, indices: list[int], batch_size: int, workers: int, device: torch.device) -> Any:
    """A DataLoader over this rank's ``indices`` of ``dataset``, in order, as lists of items."""
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_list,
        pin_memory=device.type == "cuda",
    )


def _score_all(
    loader: Any, count: int, runner: Any, matrix: ConfusionMatrix, device: torch.device, crf: CrfInput | None,
    progress_bar: Any,
) -> WarningLog:
    """Predict and count every image of ``loader`` into ``matrix`` (``count`` images, a progress bar);
    returns the images' warnings."""
    log = WarningLog()
    with progress_bar:
        task = progress_bar.add_task("evaluate", total=count)
        for items in loader:
            for item in items:
                for file, message in item.get("warnings", ()):
                    log.add(file, message)
            for group in _same_size_groups(items, runner.group_key):
                _score_group(runner, group, matrix, device, crf)
            progress_bar.update(task, advance=len(items))
    return log


def _same_size_groups(items: list[dict[str, Any]], key: Any) -> list[list[dict[str, Any]]]:
    """Runs of consecutive items with the same ``key(image size)`` (the size, or its bucket with graphs)."""
    groups: list[list[dict[str, Any]]] = []
    for item in items:
        if groups and key(groups[-1][0]["image"].shape[-2:]) == key(item["image"].shape[-2:]):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


class _PlannedRunner:
    """A runner (:class:`msattn.infer.graphs.InferenceRunner`'s interface) that sends the images the
    planner says are too large through tiles (:func:`msattn.infer.tiled.predict_tiled`), the rest to ``runner``."""

    def __init__(self, runner: Any, planner: Any) -> None:
        self.runner, self.planner = runner, planner
        self.group_key = runner.group_key

    def predict(self, images: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        images = list(images)  # [3, H, W] each
        plans = [self.planner.plan(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        whole = [i for i, plan in zip(images, plans) if plan is None]
        results = iter(self.runner.predict(whole) if whole else [])
        out = []
        for image, plan in zip(images, plans):
            if plan is None:
                out.append(next(results))
                continue
            r = self.runner
            probs, attention = predict_tiled(r.model, image[None], r.scales, r.flip, r.amp_dtype, tiling=plan)
            out.append((probs[0], None if attention is None else attention[0]))
        return out

    def summary(self) -> str:
        return self.runner.summary()


def _score_group(
    runner: Any, group: list[dict[str, Any]], matrix: ConfusionMatrix, device: torch.device, crf: CrfInput | None
) -> None:
    """Predict one group of images (one size, or one bucket) and count it into ``matrix``."""
    images = [item["image"].to(device, non_blocking=True) for item in group]  # [3, H_i, W_i] each
    for image, item, (probs, _) in zip(images, group, runner.predict(images)):
        if crf is not None:
            probs = _refine(probs[None], image[None], crf)[0]
        matrix.update(probs.argmax(0), item["label"].to(device, non_blocking=True))


def _refine(probs: torch.Tensor, images: torch.Tensor, crf: CrfInput) -> torch.Tensor:
    """Dense CRF on every image of the batch (CPU, numpy)."""
    m = torch.tensor(crf.mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(crf.std, device=images.device).view(1, 3, 1, 1)
    rgb = ((images.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image, p in zip(rgb, probs.float().cpu().numpy()):
        refined = dense_crf(np.ascontiguousarray(image), np.ascontiguousarray(p, dtype=np.float32), crf.params)
        out.append(torch.from_numpy(np.asarray(refined, dtype=np.float32)))
    return torch.stack(out).to(probs.device)


def _eval_progress(console: Console, enabled: bool) -> Any:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def print_metrics_table(metrics: dict[str, Any], title: str = "", console: Console | None = None) -> None:
    """Per-class IoU (%) like the paper's Table 2, then mean IoU and pixel accuracy."""
    console = console or Console(highlight=False, soft_wrap=True)
    table = Table(title=Text(title) if title else None)  # Text: paths and class names print verbatim, never as markup
    table.add_column("class")
    table.add_column("IoU (%)", justify="right")
    for name, value in metrics["per_class"].items():
        table.add_row(Text(str(name)), "-" if value is None or math.isnan(value) else f"{100 * value:.2f}")
    table.add_section()
    table.add_row("[bold]mean IoU", f"[bold]{_pct(metrics['miou'])}")
    table.add_row("pixel accuracy", _pct(metrics["pixel_accuracy"]))
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


