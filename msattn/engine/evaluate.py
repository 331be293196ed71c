"""Evaluation: confusion-matrix mIoU at full label resolution, optional multi-scale, flip and dense CRF.

For every image the merged logits are upsampled (bilinear) to the image size, turned into
probabilities (averaged with the flipped image's with ``flip``), optionally refined by the
dense CRF, and their argmax is scored against the label (255 ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from msattn.engine.distributed import DistInfo
from msattn.engine.metrics import ConfusionMatrix, format_miou, json_safe
from msattn.engine.predict import amp_dtype_for, predict_batch
from msattn.errors import DataError, UsageError


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
    tiling: Any = None,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (items ``{"image", "label", "id"}`` at full resolution).

    Every image is padded to the next 8k+1 side (or to ``pad_to``, DeepLab's 513) for the
    network and the prediction cropped back (:func:`msattn.engine.predict.predict_batch`).
    ``tiling`` (:class:`msattn.tiling.TilingOptions`) predicts images over the tile or the
    memory budget tile by tile (:func:`msattn.tiling.tiled_forward`); None: never.

    Images are sharded over ``world_size`` ranks and the confusion matrix is summed over
    them. Consecutive images of the same size are batched (up to ``batch_size``).
    ``crf_params`` (a :class:`msattn.crf.CRFParams`) refines the probabilities with the dense
    CRF; it needs ``mean``/``std`` to recover the RGB image. Returns
    :meth:`ConfusionMatrix.compute` plus ``num_images``.
    """
    from torch.utils.data import DataLoader, Subset

    device = torch.device(device)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(rank, total, world_size))
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_list,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    forward = predict_batch if tiling is None else _tiled_forward(model, tiling, scales, device)
    matrix = ConfusionMatrix(num_classes, ignore_index, device)
    console = console or Console(highlight=False, soft_wrap=True)
    progress_bar = _eval_progress(console, enabled=progress and rank == 0)
    try:
        with progress_bar:
            task = progress_bar.add_task("evaluate", total=len(indices))
            for items in loader:
                for group in _same_size_groups(items):
                    images = torch.stack([item["image"] for item in group]).to(device, non_blocking=True)
                    labels = torch.stack([item["label"] for item in group]).to(device, non_blocking=True)
                    probs, _ = forward(model, images, scales=scales, flip=flip, amp_dtype=amp_dtype, pad_to=pad_to)
                    if crf_params is not None:
                        probs = _refine(probs, images, crf_params, mean, std)
                    matrix.update(probs.argmax(1), labels)
                progress_bar.update(task, advance=len(items))
    finally:
        model.train(was_training)
    matrix.reduce()
    metrics = matrix.compute(class_names)
    metrics["num_images"] = total
    return metrics


def _tiled_forward(model: torch.nn.Module, options: Any, scales: Sequence[float] | None, device: torch.device) -> Any:
    """predict_batch, or tiles for the images ``options`` (--tile, --max-memory) says are too large."""
    from msattn.tiling import Planner, tiled_forward
    from msattn.tiling.memory import memory_model_from_args

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    args = getattr(model, "model_args", None) or {"num_classes": model.num_classes, "scales": list(model.scales)}
    return tiled_forward(Planner(options, memory_model_from_args(args, scales, weights), str(device)))


def _same_size_groups(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: list[list[dict[str, Any]]] = []
    for item in items:
        if groups and groups[-1][0]["image"].shape == item["image"].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _refine(probs: torch.Tensor, images: torch.Tensor, params: Any, mean: Any, std: Any) -> torch.Tensor:
    """Dense CRF on every image of the batch (CPU, numpy)."""
    import numpy as np

    from msattn.crf import dense_crf

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
    table = Table(title=title or None)
    table.add_column("class")
    table.add_column("IoU (%)", justify="right")
    for name, value in metrics["per_class"].items():
        table.add_row(name, "-" if value is None or math.isnan(value) else f"{100 * value:.2f}")
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
    and rank 0 alone prints and writes. ``tiling`` (:class:`msattn.tiling.TilingOptions`, from
    --tile/--overlap/--max-memory) overrides the recipe's ``eval.tile``/``overlap``/``max_memory``.
    """
    from msattn.engine.distributed import process_group

    with process_group(device) as info:
        return _evaluate_checkpoint(
            info, checkpoint, data, split, scales, flip, crf, json_path, limit, amp, batch_size, workers, pad_to,
            tiling,
        )  # fmt: skip


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
    tiling: Any = None,
) -> dict[str, Any]:
    from msattn.data import SegmentationFolder, read_dataset_info
    from msattn.data.transforms import EvalTransform
    from msattn.engine.checkpoint import load_checkpoint, model_from_checkpoint, old_arch_warning
    from msattn.io import check_id, write_json

    console = Console(highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    dev = dist_info.device
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(dev, memory_format=torch.channels_last)
    warning = old_arch_warning(state, checkpoint)
    if warning:
        Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist_info.is_main).print(
            f"warning: {warning}", markup=False
        )
    meta = state["dataset"]
    root = Path(data) if data is not None else Path(str(meta.get("root", "")))
    if not str(root) or not (root / "dataset.json").is_file():
        raise DataError(f"{root}: dataset folder not found (pass --data DIR; the checkpoint's was {meta.get('root')})")
    check_id(split, "--split")
    info = read_dataset_info(root)
    if list(info.classes) != list(meta.get("classes", [])):
        raise DataError(
            f"{root}: its classes ({len(info.classes)}) differ from the checkpoint's ({len(meta.get('classes', []))}); "
            "evaluate on the dataset the model was trained on"
        )
    config = _checkpoint_recipe(state)
    eval_scales = list(scales) if scales else (list(config.eval.scales) if config and config.eval.scales else None)
    if eval_scales is not None:
        trained = list(state["model_args"].get("scales", [1.0]))
        if getattr(model, "head", None) is not None and len(eval_scales) != len(trained):
            raise UsageError(
                f"--scales: this attention model was trained on {len(trained)} scales {trained}; give as many "
                "(max/avg and single-scale models take any number)"
            )
        if any(not (0 < s <= 4) for s in eval_scales) or len(set(eval_scales)) != len(eval_scales):
            raise UsageError(f"--scales: need distinct values in (0, 4], got {eval_scales}")
    crf_params = None
    if crf:
        from msattn.crf import CRFParams

        crf_params = config.crf if config is not None else CRFParams()
    max_pixels = config.data.max_pixels if config is not None else None
    from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = meta.get("mean") or IMAGENET_MEAN, meta.get("std") or IMAGENET_STD
    dataset = SegmentationFolder(root, split, transform=EvalTransform(mean=mean, std=std), max_pixels=max_pixels)
    if len(dataset) == 0:
        raise DataError(f"{root / (split + '.txt')}: the split is empty")
    amp_dtype = amp_dtype_for(dev, amp)
    if batch_size is None:
        batch_size = config.eval.batch_size if config is not None else 1
    if workers is None:
        workers = config.data.workers if config is not None else 0
    if pad_to is None and config is not None:
        pad_to = config.eval.pad_to
    if pad_to is not None and (pad_to < 9 or (pad_to - 1) % 8):
        raise UsageError(f"--pad-to: must be a side of 8k+1 pixels (e.g. 321, 513), got {pad_to}")
    tiling = _recipe_tiling(tiling, config)
    metrics = evaluate_model(
        model,
        dataset,
        num_classes=len(info.classes),
        class_names=list(info.classes),
        ignore_index=info.ignore_index,
        scales=eval_scales,
        flip=flip,
        crf_params=crf_params,
        mean=mean,
        std=std,
        batch_size=batch_size,
        limit=limit,
        device=dev,
        amp_dtype=amp_dtype,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        workers=workers,
        progress=dist_info.is_main,
        console=console,
        pad_to=pad_to,
        tiling=tiling,
    )
    result = {
        "checkpoint": str(checkpoint),
        "data": str(root),
        "split": split,
        "scales": eval_scales or list(state["model_args"].get("scales", [1.0])),
        "flip": flip,
        "crf": crf,
        "amp": "bf16" if amp_dtype is not None else "off",
        "pad_to": pad_to,
        "tile": tiling.tile,
        "overlap": tiling.overlap,
        "arch_version": state.get("arch_version", 1),
        **metrics,
    }
    print_metrics_table(metrics, title=f"{info.name} {split}: {checkpoint}", console=console)
    console.print(f"mIoU {format_miou(metrics['miou'])} on {metrics['num_images']} images", markup=False)
    if json_path is not None and dist_info.is_main:
        write_json(json_path, json_safe(result))
        console.print(f"metrics written to {json_path}")
    return result


def _recipe_tiling(given: Any, config: Any) -> Any:
    """--tile/--overlap/--max-memory, each defaulting to the recipe's eval.tile/overlap/max_memory."""
    from msattn.tiling import TilingOptions, parse_memory

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
    from msattn.config import recipe_from_dict
    from msattn.errors import ConfigError

    if not state.get("config"):
        return None
    try:
        return recipe_from_dict(state["config"], source="checkpoint config")
    except ConfigError:
        return None
