"""Before the first step: check what can be checked, then build what the loop needs.

:func:`prepare` runs in seconds and writes nothing, so that a wrong recipe, a missing
image, a busy or foreign run folder or a checkpoint that does not fit fails at once, not
after hours: the recipe resolves and its batch splits over the ranks; the run folder is
apart from the inputs, not another run's (unless ``--resume``/``--overwrite``) and
writable; ``last.pt`` loads (``--resume``); the dataset folder opens, every id of the
train, val and select lists has its image and label (:func:`build_datasets`) and
:func:`preflight_data_checks` passes; the initial weights load. Then the model, optimizer,
schedule and scaler are built and, on resume, restored (:mod:`msattn.train.resume`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import socket
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from msattn.config.recipe import ModelConfig, Recipe, TrainConfig, format_recipe, recipe_to_dict
from msattn.data.check import check_dataset
from msattn.data.datasets import SegmentationFolder
from msattn.data.info import read_dataset_info
from msattn.data.prepare.demo import prepare_demo
from msattn.data.transforms import EvalTransform, TrainTransform
from msattn.errors import ConfigError, DataError, UsageError
from msattn.models.norm import sync_batchnorm
from msattn.models.params import param_groups
from msattn.models.pretrained import WEIGHT_NAMES
from msattn.models.scale import build_model
from msattn.models.spec import DEFAULT_BACKBONE, RESNETS, ModelSpec
from msattn.runtime.distributed import DistInfo, all_gather_objects, barrier, launched_ranks
from msattn.runtime.loader import resolve_workers
from msattn.train.resume import load_resume_state, restore_training_state, resume_input_norm
from msattn.train.run_folder import RUN_FILES, check_inputs_apart, check_run_folder, on_rank0, refuse_reuse
from msattn.train.step import lr_factor, make_optimizer
from msattn.train.stream import backend_record, seed_everything, split_batch
from msattn.train.weights import (
    apply_initial_weights,
    load_initial_weights,
    random_batchnorm_warning,
    resolve_input_norm,
    spec_for_initial,
)


@dataclasses.dataclass
class TrainSetup:
    """Everything the loop needs, built and checked before the first step."""

    recipe: Recipe
    out_dir: Path
    info: DistInfo
    console: Console
    dataset_info: Any
    dataset_meta: dict[str, Any]  # what a checkpoint records about the data (classes, palette, normalisation)
    config: dict[str, Any]  # the resolved recipe (config.json, every checkpoint)
    train_set: Any
    val_set: Any  # scored split (data.val_split), None when its list is missing
    select_set: Any  # held-out split that chooses best.pt (data.select_split), None when not set
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model the step runs: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    accumulation: int  # micro-batches per rank per iteration
    start: int  # the iteration training starts from (resume)
    best_miou: float
    last_metrics: dict[str, Any]
    replaced: list[str]  # an earlier run's files that move aside at the first step (--overwrite)
    backends: dict[str, Any]  # the kernel settings the run uses (recorded in checkpoints)


def prepare(
    recipe: Recipe, out_dir: Path, resume: bool, overwrite: bool, info: DistInfo, console: Console
) -> TrainSetup:
    """Check everything that can be checked before the first step, then build the model and its state.

    Runs under the run folder's lock, after :func:`check_before_lock`.
    """
    accumulation = check_batch(recipe, info)
    replaced = on_rank0(info, lambda: check_run_folder(out_dir, resume, overwrite))
    state = on_rank0(info, lambda: load_resume_state(out_dir, resume, console))  # the run folder is rank 0's
    if info.is_main:
        maybe_prepare(recipe, console)
    barrier(info)
    check_data_on_every_machine(recipe, info)
    dataset_info = read_dataset(recipe)
    initial = load_initial_weights(recipe) if state is None else None
    warn = functools.partial(console.print, markup=False)
    norm = resume_input_norm(state) if state is not None else resolve_input_norm(recipe, initial, warn=warn)
    train_set, val_set, select_set = build_datasets(recipe, dataset_info, console, norm)
    preflight_data_checks(recipe, [s for s in (train_set, val_set, select_set) if s is not None], console)

    parts = build_training(recipe, len(dataset_info.classes), initial, info, console,
                           resumed_args=None if state is None else state.get("model_args"))  # fmt: skip
    model, optimizer, scheduler, scaler, amp_dtype = parts
    start, best_miou, last_metrics = 0, -math.inf, {}
    if state is None:
        seed_everything(recipe.train.seed + 1000 * info.rank)  # dropout differs per rank, like per image in one process
    else:
        start, best_miou, last_metrics = restore_training_state(
            state, out_dir / "last.pt", recipe, model, optimizer, scheduler, scaler, info, console
        )
    return TrainSetup(
        recipe=recipe, out_dir=out_dir, info=info, console=console, dataset_info=dataset_info,
        dataset_meta=dataset_record(dataset_info, recipe, norm), config=recipe_to_dict(recipe),
        train_set=train_set, val_set=val_set, select_set=select_set, model=model,
        train_model=wrap_for_training(model, recipe.train, info), optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, amp_dtype=amp_dtype, accumulation=accumulation, start=start, best_miou=best_miou,
        last_metrics=last_metrics, replaced=replaced, backends=backend_record(info.device),
    )  # fmt: skip


def check_before_lock(recipe: Recipe, out_dir: Path, resume: bool, overwrite: bool, info: DistInfo,
                      recipe_path: Path | None = None) -> None:  # fmt: skip
    """What needs no lock and must not leave one behind: the batch split, outputs apart from inputs, no reuse.

    The run folder is read on rank 0 alone (its verdict reaches every rank): on several
    machines without a shared file system it exists only on rank 0's.
    """
    check_batch(recipe, info)

    def run_folder_checks() -> None:
        check_inputs_apart(out_dir, recipe, recipe_path, resume)
        refuse_reuse(out_dir, resume, overwrite)

    on_rank0(info, run_folder_checks)


def check_batch(recipe: Recipe, info: DistInfo) -> int:
    """Micro-batches per rank per iteration: :func:`split_batch` of the batch over ``info``'s ranks (or its error).
    Also refuses ``model.batchnorm = "sync"`` where SyncBatchNorm cannot run (:func:`check_sync_batchnorm`)."""
    check_sync_batchnorm(recipe, info)
    return split_batch(recipe.train.batch_size, recipe.micro_batch, info.world_size).accumulation


def check_data_on_every_machine(recipe: Recipe, info: DistInfo) -> None:
    """Under torchrun, stop every rank at once when rank 0 sees the dataset folder and another machine does not."""
    if not info.distributed:
        return
    root = Path(recipe.data.root)
    seen = all_gather_objects(((root / "dataset.json").is_file(), socket.gethostname()), info)
    missing = [rank for rank, (found, _) in enumerate(seen) if not found]
    if not missing or missing[0] == 0:  # rank 0 lacks it too: read_dataset says so
        return
    hosts = sorted({seen[rank][1] for rank in missing})
    raise DataError(
        f"{root}: no dataset folder on {', '.join(hosts)} (rank(s) {format_ranks(missing)}), though rank 0 has one: "
        "every machine of a run reads data.root at the same path; put it on a shared file system or copy it to "
        "each machine"
    )


def format_ranks(ranks: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_sync_batchnorm(recipe: Recipe, info: DistInfo) -> None:
    """SyncBatchNorm runs on CUDA only: ``model.batchnorm = "sync"`` under torchrun on CPU (gloo) is refused."""
    if recipe.model.batchnorm == "sync" and info.distributed and info.device.type != "cuda":
        raise ConfigError(
            f'model.batchnorm = "sync": SyncBatchNorm runs on CUDA GPUs only, this run has {info.world_size} processes '
            f'on {info.device.type}; use model.batchnorm = "train" (BatchNorm per process) or train on GPUs'
        )


def read_dataset(recipe: Recipe) -> Any:
    """The dataset folder's dataset.json, checked against model.num_classes."""
    root = Path(recipe.data.root)
    if not (root / "dataset.json").is_file():
        raise DataError(
            f"{root}: no dataset folder here (dataset.json missing); build it with `msattn prepare-data ...` "
            "or point data.root at one (--set data.root=DIR)"
        )
    dataset_info = read_dataset_info(root)
    num_classes = len(dataset_info.classes)
    if recipe.model.num_classes is not None and recipe.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes is {recipe.model.num_classes} but {root} has {num_classes} classes")
    return dataset_info


def dataset_record(dataset_info: Any, recipe: Recipe, norm: Any) -> dict[str, Any]:
    """What a checkpoint says about its data: evaluate/predict need nothing else."""
    return {
        "name": dataset_info.name,
        "classes": list(dataset_info.classes),
        "palette": [list(c) for c in dataset_info.palette],
        "ignore_index": int(dataset_info.ignore_index),
        "root": str(recipe.data.root),
        "input_norm": norm.name,
        "mean": list(norm.mean),
        "std": list(norm.std),
    }


def build_datasets(recipe: Recipe, info: Any, console: Console, norm: Any) -> tuple[Any, Any, Any]:
    """The training split (TrainTransform), the scored split (data.val_split; None when its list is
    missing) and the split that chooses best.pt (data.select_split; None when not set).

    Opening a split checks that every listed id has its image and label, so a missing file of
    the val or select split stops training before its first step.
    """
    data = recipe.data
    train_tf = TrainTransform(crop_size=data.crop_size, scale_range=data.scale_range, flip=data.flip,
                              mean=norm.mean, std=norm.std, ignore_index=info.ignore_index,
                              output="uint8")  # normalised on the device (msattn.runtime.loader.DeviceBatches)  # fmt: skip
    root = Path(data.root)
    train_set = SegmentationFolder(root, data.train_split, transform=train_tf, max_pixels=data.max_pixels)
    if len(train_set) == 0:
        raise DataError(f"{root / (data.train_split + '.txt')}: the training split is empty")

    def eval_split(split: str) -> Any:
        return SegmentationFolder(
            root, split, transform=EvalTransform(mean=norm.mean, std=norm.std), max_pixels=data.max_pixels
        )

    val_set = None
    if (root / f"{data.val_split}.txt").is_file():
        val_set = eval_split(data.val_split)
    else:
        console.print(f"warning: {root / (data.val_split + '.txt')} not found: no validation", markup=False)
    select_set = None
    if data.select_split is not None:
        if not (root / f"{data.select_split}.txt").is_file():
            raise DataError(f"{root / (data.select_split + '.txt')}: data.select_split's id list not found")
        select_set = eval_split(data.select_split)
    return train_set, val_set, select_set


#: ids per split that ``data.check = "sample"`` reads before training
PREFLIGHT_SAMPLE = 32


def preflight_data_checks(recipe: Recipe, splits: list[Any], console: Console) -> None:
    """Check the dataset before the first step (``data.check``): ``sample`` reads a few ids of every
    split used (label values, palettes, sizes, binary 0/255 masks), ``full`` every id, ``off`` none.

    Errors stop training with one line (``msattn check-data DIR`` lists them all); warnings are printed.
    """
    mode = recipe.data.check
    if mode == "off" or not splits:
        return
    names = list(dict.fromkeys(str(s.split) for s in splits))
    report = check_dataset(Path(recipe.data.root), names, sample=None if mode == "full" else PREFLIGHT_SAMPLE,
                           seed=recipe.train.seed)  # fmt: skip
    for finding in report.warnings[:5]:
        console.print(f"warning: {finding}", markup=False)
    if len(report.warnings) > 5:
        console.print(f"warning: ... and {len(report.warnings) - 5} more (msattn check-data {recipe.data.root})",
                      markup=False)
    if not report.ok:
        raise DataError(
            f"{report.summary_line()}; run `msattn check-data {recipe.data.root}` for every problem, or "
            "--set data.check=off to train anyway"
        )


def maybe_prepare(recipe: Recipe, console: Console) -> None:
    """Build the dataset folder when it is missing and ``data.auto_prepare`` says how."""
    root = Path(recipe.data.root)
    if (root / "dataset.json").is_file() or recipe.data.auto_prepare is None:
        return
    if recipe.data.auto_prepare in ("demo", "demo-silhouettes"):
        style = "silhouettes" if recipe.data.auto_prepare == "demo-silhouettes" else "figures"
        console.print(f"preparing the synthetic demo dataset ({style}) in {root}", markup=False)
        workers = resolve_workers(recipe.data.workers, torch.device("cpu")).count  # "auto" -> a number
        prepare_demo(out=root, num_train=240, num_val=60, image_size=96, seed=0, workers=workers, style=style)


def model_spec(cfg: ModelConfig, num_classes: int, stride_in_1x1: bool = False) -> ModelSpec:
    """The model a recipe's ``[model]`` describes, for ``num_classes`` classes.

    ``stride_in_1x1`` is the ResNet layout of the initial weights (Caffe's for DeepLab-v2's converted
    caffemodels: :func:`msattn.models.pretrained.spec_for_weights`), not a recipe key.
    """
    return ModelSpec(
        num_classes, scales=cfg.scales, merge=cfg.merge, extra_supervision=cfg.extra_supervision, width=cfg.width,
        dropout=cfg.dropout, attention_hidden=cfg.attention_hidden, attention_dropout=cfg.attention_dropout,
        pool5a=cfg.pool5a, attention_init=cfg.attention_init, attention_temperature=cfg.attention_temperature,
        attention_norm=cfg.attention_norm, fc6_dilation=cfg.fc6_dilation, backbone=cfg.backbone,
        head=None if cfg.head == "auto" else cfg.head, batchnorm=cfg.batchnorm, aspp_dilations=cfg.aspp_dilations,
        stride_in_1x1=stride_in_1x1,
    )  # fmt: skip


def training_spec(
    recipe: Recipe, num_classes: int, initial: Any, resumed_args: dict[str, Any] | None = None
) -> ModelSpec:
    """The spec training builds: the recipe's, with the backbone checked against the initial weights (or a
    checkpoint to start from) and their ResNet stride layout; on resume, the layout ``last.pt`` was built with."""
    spec = model_spec(recipe.model, num_classes)
    if resumed_args is None:
        return spec_for_initial(spec, initial)
    layout = bool(resumed_args.get("stride_in_1x1", False))
    same = resumed_args.get("backbone", DEFAULT_BACKBONE) == spec.backbone
    return spec.replace(stride_in_1x1=layout) if same and spec.backbone in RESNETS else spec


def build_training(recipe: Recipe, num_classes: int, initial: Any, info: DistInfo, console: Console,
                   resumed_args: dict[str, Any] | None = None) -> tuple:  # fmt: skip
    """Model (initial weights applied, on the device), optimizer, LambdaLR schedule, GradScaler, AMP dtype.

    ``resumed_args`` are the ``model_args`` of the checkpoint a resumed run continues (None: a new run).
    """
    cfg, dev = recipe.train, info.device
    seed_everything(cfg.seed)
    spec = training_spec(recipe, num_classes, initial, resumed_args)
    warning = random_batchnorm_warning(spec, initial) if resumed_args is None and info.is_main else None
    if warning:
        console.print(warning, markup=False)
    model = build_model(spec)
    if initial is not None:
        apply_initial_weights(model, initial, console)
    model.to(dev)
    if cfg.channels_last:  # faster on CUDA and on CPU (see benchmarks/README.md)
        model.to(memory_format=torch.channels_last)
    optim = recipe.optim
    groups = param_groups(model, optim.lr, optim.weight_decay, optim.head_lr_mult, optim.attention_lr_mult)
    optimizer = make_optimizer(groups, optim.optimizer, optim.lr, optim.momentum, dev)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if dev.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    return model, optimizer, scheduler, scaler, amp_dtype


def wrap_for_training(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """DDP under torchrun, torch.compile with train.compile (the training step only; checkpoints use ``model``)."""
    wrapped = model
    if info.distributed:
        wrapped = sync_batchnorm(model)  # batchnorm = "sync" only: BatchNorm2d -> SyncBatchNorm (same state-dict keys)
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def resolve_paths(recipe: Recipe) -> Recipe:
    """Make ``data.root`` (and weight paths) absolute, relative to the working directory."""

    def absolute(value: str | None) -> str | None:
        if value is None or value in WEIGHT_NAMES:
            return value
        return str(Path(value).expanduser().resolve())

    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, root=absolute(recipe.data.root)),
        model=dataclasses.replace(
            recipe.model,
            pretrained=absolute(recipe.model.pretrained),
            init_from=absolute(recipe.model.init_from),
        ),
    )


def dry_run_report(
    recipe: Recipe, out_dir: Path, resume: bool = False, console: Console | None = None, overwrite: bool = False,
    recipe_path: Path | None = None,
) -> list[str]:  # fmt: skip
    """Print the resolved recipe and what training would do; returns the warnings printed.

    Under torchrun the batch is split over its processes as a real start would (the same
    error when it cannot be), and rank 0 alone prints; no process group is joined. The
    resolved recipe alone goes to stdout (``--dry-run > resolved.toml`` is a recipe); what
    training would do, the warnings and the verdict go to stderr.
    """
    rank, world = launched_ranks()
    dealt = split_batch(recipe.train.batch_size, recipe.micro_batch, world)
    console = console or Console(highlight=False, soft_wrap=True, quiet=rank != 0)
    status = Console(stderr=True, highlight=False, soft_wrap=True, quiet=rank != 0)
    recipe = resolve_paths(recipe)
    warnings: list[str] = []
    root = Path(recipe.data.root)
    if not (root / "dataset.json").is_file():
        if recipe.data.auto_prepare:
            status.print(f"data: {root} is missing; training will prepare it (data.auto_prepare = "
                         f"{recipe.data.auto_prepare!r})", markup=False)  # fmt: skip
        else:
            warnings.append(f"data folder {root} not found or has no dataset.json (run msattn prepare-data first)")
    else:
        for split in (recipe.data.train_split, recipe.data.val_split):
            if not (root / f"{split}.txt").is_file():
                warnings.append(f"{root / (split + '.txt')}: split list not found")
    for key in ("pretrained", "init_from"):
        value = getattr(recipe.model, key)
        if value and value not in WEIGHT_NAMES and not Path(value).expanduser().is_file():
            warnings.append(f"model.{key}: {value} not found")
    if recipe.model.pretrained is None and recipe.model.init_from is None:
        spec = model_spec(recipe.model, recipe.model.num_classes or 2)
        warning = random_batchnorm_warning(spec, None)
        warnings += [warning.removeprefix("warning: ")] if warning else []
    warnings += _run_folder_warnings(recipe, out_dir, resume, overwrite, recipe_path)
    source = f" of {recipe_path}" if recipe_path is not None else ""
    console.print(f"# the resolved recipe{source} (msattn train --dry-run; run folder: {out_dir})", markup=False)
    console.print(format_recipe(recipe), markup=False)
    status.print(dealt.describe(), markup=False)
    for text in warnings:
        status.print(f"warning: {text}", markup=False)
    status.print("recipe OK (dry run: nothing trained)")
    return warnings


def _run_folder_warnings(
    recipe: Recipe, out_dir: Path, resume: bool, overwrite: bool, recipe_path: Path | None
) -> list[str]:
    """What the run folder checks of :func:`prepare` would say, as warnings (nothing is created)."""
    warnings = []
    try:
        check_inputs_apart(out_dir, recipe, recipe_path, resume)
    except UsageError as exc:
        warnings.append(str(exc))
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and resume and overwrite:
        warnings.append("--resume and --overwrite exclude each other")
    elif found and overwrite:
        warnings.append(f"{out_dir} holds a run ({', '.join(found)}): --overwrite moves it aside at the first step")
    elif found and not resume:
        warnings.append(f"{out_dir} already holds a run ({', '.join(found)}): training would refuse without --resume "
                        "or --overwrite")  # fmt: skip
    return warnings
