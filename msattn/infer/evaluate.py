"""``msattn evaluate``: a checkpoint scored on a split of its dataset (or of another folder).

The checkpoint's recipe supplies every option not given on the command line (``eval.scales``,
``eval.batch_size``, ``eval.pad_to``, ``eval.tile``...; :meth:`InferenceOptions.filled_from`);
the scoring itself is :func:`msattn.infer.scoring.evaluate_model`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from msattn.config.crf import CRFParams
from msattn.config.recipe import Recipe
from msattn.data.datasets import SegmentationFolder
from msattn.data.info import DatasetInfo, read_dataset_info
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from msattn.errors import DataError
from msattn.infer.graphs import inference_batch_size, make_runner
from msattn.infer.options import InferenceOptions
from msattn.infer.scales import resolve_scales
from msattn.infer.scoring import CrfInput, evaluate_model, print_metrics_table
from msattn.io import check_id, write_json
from msattn.outputs import check_output_file, json_written_by
from msattn.runtime.checkpoint import (
    checkpoint_recipe,
    dataset_meta,
    load_checkpoint,
    model_from_checkpoint,
    old_arch_warning,
)
from msattn.runtime.distributed import DistInfo, process_group
from msattn.runtime.loader import resolve_workers
from msattn.runtime.metrics import format_miou, json_safe


def evaluate_checkpoint(
    checkpoint: Path,
    options: InferenceOptions = InferenceOptions(),
    *,
    data: Path | None = None,
    split: str = "val",
    crf: bool = False,
    json_path: Path | None = None,
    limit: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """``msattn evaluate``: score a checkpoint on a split of its dataset (or of ``data``).

    ``options`` (:class:`InferenceOptions`) not given are the checkpoint recipe's ``[eval]``;
    ``workers`` defaults to its ``data.workers``. Prints the per-class table and returns (and
    with ``json_path`` writes) a dict with ``miou``, ``pixel_accuracy``, ``mean_accuracy``,
    ``per_class`` {class: IoU or null}, ``num_images``, ``checkpoint``, ``data``, ``split``,
    ``scales``, ``flip``, ``crf``, ``amp`` and the speed. Under ``torchrun`` the images are
    sharded over the ranks, the confusion matrices summed, and rank 0 alone prints and writes.

    On CUDA, ``options.compile_graphs`` (the default; ``--no-compile`` turns it off) pads images
    to size buckets and replays one CUDA graph per batch shape, and the batch size defaults to at
    least 8 (:mod:`msattn.infer.graphs`).
    """
    with process_group(options.device) as info:
        return _evaluate(info, Path(checkpoint), options, data, split, crf, json_path, limit, workers)


def _evaluate(
    dist: DistInfo, checkpoint: Path, options: InferenceOptions, data: Path | None, split: str, crf: bool,
    json_path: Path | None, limit: int | None, workers: int | None,
) -> dict[str, Any]:
    console = Console(highlight=False, soft_wrap=True, quiet=not dist.is_main)
    errors = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist.is_main)
    if json_path is not None:
        _check_json(json_path, checkpoint)
    state, model, config, options = _load_model(checkpoint, options, dist.device, errors)
    dataset, info, mean, std = _open_split(state, checkpoint, data, split, config)
    for line in dataset.warnings:
        errors.print(f"warning: {line}", markup=False)
    runner = make_runner(model, options, dist.device)  # CUDA graphs over size buckets on CUDA, else eager
    default_batch = config.eval.batch_size if config is not None else 1
    options = options.replace(batch_size=inference_batch_size(options.batch_size, default_batch, runner.policy))
    if workers is None:
        workers = resolve_workers(config.data.workers if config is not None else 0, dist.device).count
    crf_input = CrfInput(config.crf if config is not None else CRFParams(), mean, std) if crf else None
    start = time.perf_counter()
    metrics = evaluate_model(
        model, dataset, len(info.classes), list(info.classes), info.ignore_index, options, crf=crf_input,
        limit=limit, dist=dist, workers=workers, progress=dist.is_main, console=console, runner=runner,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    _check_scored(metrics, info, split, errors)
    result = _result(checkpoint, info, split, options, dist.device, crf, state, runner, metrics, seconds)
    _report(result, f"{info.name} {split}: {checkpoint}", runner.summary(), dist.device, console)
    if json_path is not None and dist.is_main:
        write_json(json_path, json_safe(result))
        console.print(f"metrics written to {json_path}", markup=False)
    return result


def _result(
    checkpoint: Path, info: DatasetInfo, split: str, options: InferenceOptions, device: torch.device, crf: bool,
    state: dict[str, Any], runner: Any, metrics: dict[str, Any], seconds: float,
) -> dict[str, Any]:
    """What an evaluation reports: what made it (checkpoint, data, options) beside the scores and the speed."""
    tiling = options.tiling
    return {
        "checkpoint": str(checkpoint), "data": str(info.root), "split": split, "scales": list(options.scales or ()),
        "flip": options.flip, "crf": crf, "amp": options.amp if options.amp_dtype(device) is not None else "off",
        "pad_to": options.pad_to, "tile": tiling.tile, "overlap": tiling.overlap,
        "arch_version": state.get("arch_version", 1), "batch_size": options.batch_size,
        "cuda_graphs": runner.policy.enabled, "bucket": runner.policy.bucket if runner.policy.enabled else None,
        **metrics,
        "seconds": seconds, "images_per_s": metrics["num_images"] / max(seconds, 1e-9),
    }  # fmt: skip


def _load_model(
    checkpoint: Path, options: InferenceOptions, device: torch.device, errors: Console
) -> tuple[dict[str, Any], torch.nn.Module, Recipe | None, InferenceOptions]:
    """The checkpoint's state, its model on ``device``, its recipe (or None) and the options filled from the
    recipe with the scales resolved for the model; warnings and notes go to ``errors``."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device, memory_format=torch.channels_last)
    warning = old_arch_warning(state, checkpoint)
    if warning:
        errors.print(f"warning: {warning}", markup=False)
    config = checkpoint_recipe(state)
    option = "--scales" if options.scales else "eval.scales (the checkpoint's recipe)"
    options = options.filled_from(config.eval if config is not None else None)
    scales, note = resolve_scales(options.scales, model, option)
    if note:
        errors.print(f"note: {note}", markup=False)
    return state, model, config, options.replace(scales=scales)


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
