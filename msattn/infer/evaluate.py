"""Evaluation: confusion-matrix mIoU at full label resolution, optional multi-scale, flip and dense CRF.

For every image the merged logits are upsampled (bilinear) to the image size, turned into
probabilities (averaged with the flipped image's with ``flip``), optionally refined by the
dense CRF, and their argmax is scored against the label (255 ignored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from torch.utils.data import DataLoader, Subset

from msattn.config.crf import CRFParams
from msattn.config.recipe import recipe_from_dict
from msattn.crf.dense import dense_crf
from msattn.data.datasets import SegmentationFolder
from msattn.data.info import read_dataset_info
from msattn.data.labels import WarningLog
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from msattn.errors import ConfigError, DataError, UsageError
from msattn.infer.forward import amp_dtype_for
from msattn.infer.graphs import InferenceRunner, graph_policy, inference_batch_size
from msattn.infer.scales import resolve_scales
from msattn.io import check_id, write_json
from msattn.outputs import check_output_file, json_written_by
from msattn.runtime.checkpoint import dataset_meta, load_checkpoint, model_from_checkpoint, old_arch_warning
from msattn.runtime.distributed import DistInfo, process_group
from msattn.runtime.loader import resolve_workers
from msattn.runtime.metrics import ConfusionMatrix, format_miou, json_safe
from msattn.sizes import parse_memory
from msattn.tiling import run as tiling
from msattn.tiling.memory import memory_model_from_args
from msattn.tiling.run import Planner, TilingOptions


def _collate_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    num_classes: int,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    crf_params: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    progress: bool = True,
    console: Console | None = None,
    pad_to: int | None = None,
    runner: Any = None,
    tiling: Any = None,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (items ``{"image", "label", "id"}`` at full resolution).

    Every image is padded to the next 8k+1 side (or to ``pad_to``, DeepLab's 513) for the
    network and the prediction cropped back (:func:`msattn.infer.predict.predict_batch`).

    Images are sharded over ``world_size`` ranks and the confusion matrix is summed over
    them. Consecutive images of the same size are batched (up to ``batch_size``).
    ``crf_params`` (a :class:`msattn.crf.dense.CRFParams`) refines the probabilities with the dense
    CRF; it needs ``mean``/``std`` to recover the RGB image. Returns
    :meth:`ConfusionMatrix.compute` plus ``num_images``, ``scored_pixels`` and ``warnings``.

    ``runner`` (a :class:`msattn.infer.graphs.InferenceRunner` over ``model`` with the same
    scales, flip, amp and pad_to) runs the forward, e.g. as CUDA graphs over size buckets;
    None: the eager :func:`msattn.infer.predict.predict_batch`, exactly. ``tiling``
    (:class:`msattn.tiling.TilingOptions`) predicts images over the tile or the memory budget
    tile by tile (:mod:`msattn.tiling`); the others go through ``runner`` as usual.
    """
    device = torch.device(device)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(rank, total, world_size))
    loader = _loader(dataset, indices, batch_size, workers, device)
    was_training = model.training
    model.eval()
    runner = _eval_runner(model, runner, tiling, scales, flip, amp_dtype, pad_to, device)
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    progress_bar = _eval_progress(console or Console(highlight=False, soft_wrap=True), enabled=progress and rank == 0)
    try:
        log = _score_all(loader, len(indices), runner, matrix, device, crf_params, mean, std, progress_bar)
    finally:
        model.train(was_training)
    matrix.reduce()
    metrics = matrix.compute(class_names)
    metrics["num_images"] = total
    metrics["scored_pixels"] = int(matrix.mat.sum().item())  # 0: every pixel was ignore_index
    metrics["warnings"] = log.lines()  # this rank's (rank 0's under DDP)
    return metrics


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


def _eval_runner(
    model: torch.nn.Module, runner: Any, tiling: Any, scales: Sequence[float] | None, flip: bool,
    amp_dtype: torch.dtype | None, pad_to: int | None, device: torch.device,
) -> Any:
    """``runner``, else the eager forward; with ``tiling``, images too large for it go through tiles."""
    if runner is None:  # the eager forward (graphs and buckets: msattn.infer.graphs)
        runner = InferenceRunner(model, scales=scales, flip=flip, amp_dtype=amp_dtype, pad_to=pad_to)
    if tiling is not None:  # whole or tiles, decided per image by the memory planner
        runner = _PlannedRunner(runner, _planner(model, tiling, scales, device))
    return runner


def _score_all(
    loader: Any, count: int, runner: Any, matrix: ConfusionMatrix, device: torch.device, crf_params: Any, mean: Any,
    std: Any, progress_bar: Any,
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
                _score_group(runner, group, matrix, device, crf_params, mean, std)
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


def _planner(model: torch.nn.Module, options: Any, scales: Sequence[float] | None, device: torch.device) -> Any:
    """The tiling planner (--tile, --max-memory: whole or tiles per image) for ``model``."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    args = getattr(model, "model_args", None) or {"num_classes": model.num_classes, "scales": list(model.scales)}
    return Planner(options, memory_model_from_args(args, scales, weights), str(device))


class _PlannedRunner:
    """A runner (:class:`msattn.infer.graphs.InferenceRunner`'s interface) that sends the images the
    planner says are too large through tiles (:func:`msattn.tiling.predict_tiled`), the rest to ``runner``."""

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
            probs, attention = tiling.predict_tiled(r.model, image[None], r.scales, r.flip, r.amp_dtype, r.pad_to,
                                                    tiling=plan)  # fmt: skip
            out.append((probs[0], None if attention is None else attention[0]))
        return out

    def summary(self) -> str:
        return self.runner.summary()


def _score_group(
    runner: Any, group: list[dict[str, Any]], matrix: ConfusionMatrix, device: torch.device, crf_params: Any,
    mean: Any, std: Any,
) -> None:
    """Predict one group of images (one size, or one bucket) and count it into ``matrix``."""
    images = [item["image"].to(device, non_blocking=True) for item in group]  # [3, H_i, W_i] each
    for image, item, (probs, _) in zip(images, group, runner.predict(images)):
        if crf_params is not None:
            probs = _refine(probs[None], image[None], crf_params, mean, std)[0]
        matrix.update(probs.argmax(0), item["label"].to(device, non_blocking=True))


def _refine(probs: torch.Tensor, images: torch.Tensor, params: Any, mean: Any, std: Any) -> torch.Tensor:
    """Dense CRF on every image of the batch (CPU, numpy)."""
    if mean is None or std is None:
        raise UsageError("the dense CRF needs the normalisation mean/std to recover the RGB image")
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    rgb = ((images.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image, p in zip(rgb, probs.float().cpu().numpy()):
        refined = dense_crf(np.ascontiguousarray(image), np.ascontiguousarray(p, dtype=np.float32), params)
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


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path | None = None,
    split: str = "val",
    scales: list[float] | None = None,
    flip: bool = False,
    crf: bool = False,
    json_path: Path | None = None,
    limit: int | None = None,
    device: str | None = None,
    amp: bool = True,
    batch_size: int | None = None,
    workers: int | None = None,
    pad_to: int | None = None,
    compile_graphs: bool = True,
    bucket: int | None = None,
    tiling: Any = None,
) -> dict[str, Any]:
    """``msattn evaluate``: score a checkpoint on a split of its dataset (or of ``data``).

    ``amp`` runs the network under bf16 autocast on CUDA (never on CPU); ``batch_size`` and
    ``workers`` default to the checkpoint recipe's ``eval.batch_size`` and ``data.workers``, ``pad_to``
    (pad every image to this 8k+1 side, e.g. 513) to its ``eval.pad_to``.
    Prints the per-class table and returns (and with ``json_path`` writes) a dict with
    ``miou``, ``pixel_accuracy``, ``mean_accuracy``, ``per_class`` {class: IoU or null},
    ``num_images``, ``checkpoint``, ``data``, ``split``, ``scales``, ``flip``, ``crf``, ``amp``.
    Under ``torchrun`` the images are sharded over the ranks, the confusion matrices summed,
    and rank 0 alone prints and writes.

    On CUDA, ``compile_graphs`` (the default; ``--no-compile`` turns it off) pads images to
    size buckets of ``bucket`` pixels (default 64) and replays one CUDA graph per batch shape,
    and ``batch_size`` defaults to at least 8 (:mod:`msattn.infer.graphs`). ``tiling``
    (:class:`msattn.tiling.TilingOptions`, from --tile/--overlap/--max-memory) overrides the
    recipe's ``eval.tile``/``overlap``/``max_memory``.
    """
    with process_group(device) as info:
        return _evaluate_checkpoint(
            info, checkpoint, data, split, scales, flip, crf, json_path, limit, amp, batch_size, workers, pad_to,
            compile_graphs, bucket, tiling,
        )


def _evaluate_checkpoint(
    dist_info: DistInfo,
    checkpoint: Path,
    data: Path | None,
    split: str,
    scales: list[float] | None,
    flip: bool,
    crf: bool,
    json_path: Path | None,
    limit: int | None,
    amp: bool,
    batch_size: int | None,
    workers: int | None,
    pad_to: int | None,
    compile_graphs: bool = True,
    bucket: int | None = None,
    tiling: Any = None,
) -> dict[str, Any]:
    console = Console(highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    errors = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    if json_path is not None:
        _check_json(json_path, checkpoint)
    dev = dist_info.device
    state, model, config, eval_scales = _load_model(checkpoint, scales, dev, errors)
    dataset, info, mean, std = _open_split(state, checkpoint, data, split, config)
    for line in dataset.warnings:
        errors.print(f"warning: {line}", markup=False)
    settings = _run_settings(config, dev, amp, batch_size, workers, pad_to, crf)
    # CUDA graphs over size buckets and batches of several images on CUDA; the eager forward on CPU
    runner = InferenceRunner(model, scales=eval_scales, flip=flip, amp_dtype=settings["amp_dtype"],
                             pad_to=settings["pad_to"], policy=graph_policy(dev, compile_graphs, bucket))  # fmt: skip
    settings["batch_size"] = _batch_size(batch_size, config, runner)
    tiling = _recipe_tiling(tiling, config)
    start = time.perf_counter()
    metrics = evaluate_model(
        model, dataset, num_classes=len(info.classes), class_names=list(info.classes),
        ignore_index=info.ignore_index, scales=eval_scales, flip=flip, crf_params=settings["crf_params"],
        mean=mean, std=std, batch_size=settings["batch_size"], limit=limit, device=dev,
        amp_dtype=settings["amp_dtype"], rank=dist_info.rank, world_size=dist_info.world_size,
        workers=settings["workers"], progress=dist_info.is_main, console=console, pad_to=settings["pad_to"],
        runner=runner, tiling=tiling,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    _check_scored(metrics, info, split, errors)
    result = {
        "checkpoint": str(checkpoint), "data": str(info.root), "split": split, "scales": list(eval_scales),
        "flip": flip, "crf": crf, "amp": "bf16" if settings["amp_dtype"] is not None else "off",
        "pad_to": settings["pad_to"], "tile": tiling.tile, "overlap": tiling.overlap,
        "arch_version": state.get("arch_version", 1), "batch_size": settings["batch_size"],
        "cuda_graphs": runner.policy.enabled, "bucket": runner.policy.bucket if runner.policy.enabled else None,
        **metrics,
        "seconds": seconds, "images_per_s": metrics["num_images"] / max(seconds, 1e-9),
    }  # fmt: skip
    _report(result, f"{info.name} {split}: {checkpoint}", runner.summary(), dev, console)
    if json_path is not None and dist_info.is_main:
        write_json(json_path, json_safe(result))
        console.print(f"metrics written to {json_path}", markup=False)
    return result


def _load_model(
    checkpoint: Path, scales: list[float] | None, device: torch.device, errors: Console
) -> tuple[dict[str, Any], torch.nn.Module, Any, Sequence[float]]:
    """The checkpoint's state, its model on ``device``, its recipe (or None) and the scales to evaluate at;
    warnings and notes about them go to ``errors``."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device, memory_format=torch.channels_last)
    warning = old_arch_warning(state, checkpoint)
    if warning:
        errors.print(f"warning: {warning}", markup=False)
    config = _checkpoint_recipe(state)
    option = "--scales" if scales else "eval.scales (the checkpoint's recipe)"
    eval_scales, note = resolve_scales(scales or (config.eval.scales if config else None), model, option)
    if note:
        errors.print(f"note: {note}", markup=False)
    return state, model, config, eval_scales


def _check_scored(metrics: dict[str, Any], info: Any, split: str, errors: Console) -> None:
    """Print the images' warnings; a DataError when not one label pixel could be scored."""
    for line in metrics["warnings"]:
        errors.print(f"warning: {line}", markup=False)
    if metrics["scored_pixels"] == 0:
        raise DataError(
            f"{info.root / (split + '.txt')}: every label pixel of the {metrics['num_images']} image(s) is "
            f"{info.ignore_index} (ignore): there is nothing to score (binary 0/255 masks? see the warnings above)"
        )


def _report(result: dict[str, Any], title: str, runner_summary: str, device: torch.device, console: Console) -> None:
    """The per-class table, the mIoU and the speed of an evaluation."""
    print_metrics_table(result, title=title, console=console)
    console.print(f"mIoU {format_miou(result['miou'])} on {result['num_images']} images", markup=False)
    console.print(f"{result['num_images']} images in {result['seconds']:.1f} s: {result['images_per_s']:.1f} img/s "
                  f"(batch {result['batch_size']}, {device})", markup=False)  # fmt: skip
    if runner_summary:
        console.print(runner_summary, markup=False)


def _batch_size(given: int | None, config: Any, runner: Any) -> int:
    """--batch-size, else the recipe's eval.batch_size, raised to a GPU-sized batch when graphs run."""
    return inference_batch_size(given, config.eval.batch_size if config is not None else 1, runner.policy)


def _check_json(json_path: Path, checkpoint: Path) -> None:
    """``--json`` must be a writable file name, not an input, not a file that evaluate did not write."""
    check_output_file(
        Path(json_path), "--json", inputs=[checkpoint], ours=lambda path: json_written_by(path, ("miou", "checkpoint"))
    )


def _open_split(
    state: dict[str, Any], checkpoint: Path, data: Path | None, split: str, config: Any
) -> tuple[Any, Any, Sequence[float], Sequence[float]]:
    """The split's dataset (checked against the checkpoint's classes), its info, and the input mean/std."""
    meta = dataset_meta(state, checkpoint)
    root = Path(data) if data is not None else Path(meta["root"])
    if not str(meta["root"] if data is None else data) or not (root / "dataset.json").is_file():
        raise DataError(f"{root}: dataset folder not found (pass --data DIR; the checkpoint's was {meta['root']!r})")
    check_id(split, "--split")
    info = read_dataset_info(root)
    if list(info.classes) != list(meta["classes"] or []):
        raise DataError(
            f"{root}: its classes ({len(info.classes)}) differ from the checkpoint's ({len(meta['classes'] or [])}); "
            "evaluate on the dataset the model was trained on"
        )
    max_pixels = config.data.max_pixels if config is not None else None
    mean, std = meta["mean"] or IMAGENET_MEAN, meta["std"] or IMAGENET_STD
    dataset = SegmentationFolder(root, split, transform=EvalTransform(mean=mean, std=std), max_pixels=max_pixels)
    return dataset, info, mean, std


def _run_settings(
    config: Any, device: torch.device, amp: bool, batch_size: int | None, workers: int | None, pad_to: int | None,
    crf: bool,
) -> dict[str, Any]:
    """Batch size, workers, padding and CRF: the command line's, else the checkpoint recipe's, else defaults."""
    if batch_size is None:
        batch_size = config.eval.batch_size if config is not None else 1
    if workers is None:
        workers = resolve_workers(config.data.workers if config is not None else 0, device).count
    if pad_to is None and config is not None:
        pad_to = config.eval.pad_to
    if pad_to is not None and (pad_to < 9 or (pad_to - 1) % 8):
        raise UsageError(f"--pad-to: must be a side of 8k+1 pixels (e.g. 321, 513), got {pad_to}")
    crf_params = None
    if crf:
        crf_params = config.crf if config is not None else CRFParams()
    return {"batch_size": batch_size, "workers": workers, "pad_to": pad_to, "crf_params": crf_params,
            "amp_dtype": amp_dtype_for(device, amp)}  # fmt: skip


def _recipe_tiling(given: Any, config: Any) -> Any:
    """--tile/--overlap/--max-memory, each defaulting to the recipe's eval.tile/overlap/max_memory."""
    given = given or TilingOptions()
    section = config.eval if config is not None else None
    budget = getattr(section, "max_memory", None)
    return TilingOptions(
        tile=given.tile if given.tile is not None else getattr(section, "tile", None),
        overlap=given.overlap if given.overlap is not None else getattr(section, "overlap", None),
        max_memory=given.max_memory if given.max_memory is not None else (
            parse_memory(budget, "eval.max_memory") if budget else None),
    )  # fmt: skip


def _checkpoint_recipe(state: dict[str, Any]) -> Any:
    """The checkpoint's recipe, or None when it has none or this version cannot read it."""
    if not state.get("config"):
        return None
    try:
        return recipe_from_dict(state["config"], source="checkpoint config")
    except ConfigError:
        return None
