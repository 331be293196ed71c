"""Training: a loop you can read top to bottom (in the spirit of nanoGPT).

``train(recipe, out_dir)`` builds the data, model, SGD optimizer and LambdaLR schedule,
then steps ``train.iterations`` times. Each step takes ``train.batch_size`` images as
micro-batches of ``train.micro_batch`` (gradient accumulation), split over DDP ranks when
launched by ``torchrun``. The run folder gets ``config.json``, ``metrics.jsonl``,
``last.pt`` / ``best.pt`` (atomic) and TensorBoard events when tensorboard is installed.

Reproducibility and resume: the training stream is a pure function of the seed. Global
sample number ``k`` (counting images over all iterations) is image
``perm(seed, k // n)[k % n]`` of an ``n``-image split, augmented with RNGs seeded from
``(seed, k)``; micro-batch ``j`` of iteration ``t`` holds samples
``t*B + j*m ... t*B + (j+1)*m - 1`` and goes to rank ``j % world``. A checkpoint stores
the model, optimizer, scheduler, GradScaler and every rank's torch/CUDA/numpy/python RNG
state, so ``--resume`` continues bit-for-bit (exactly on CPU; on GPU as far as the
kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, Sampler

from msattn.config import Recipe, format_recipe, load_recipe, recipe_diff, recipe_from_dict, recipe_to_dict
from msattn.engine.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from msattn.engine.metrics import format_miou
from msattn.engine.weights import (
    InputNorm,
    apply_initial_weights,
    checkpoint_input_norm,
    load_initial_weights,
    resolve_input_norm,
)
from msattn.engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    process_group,
)
from msattn.errors import CheckpointError, ConfigError, DataError, ResourceError, TrainingError, UsageError
from msattn.io import clean_temporaries, write_json

_AUG_STREAM = 1  # SeedSequence spawn keys: keep the augmentation and order streams apart
_ORDER_STREAM = 2


# ----------------------------------------------------------------------------- entry points


def train_from_recipe(
    recipe_path: Path,
    overrides: list[str],
    out: Path | None = None,
    resume: bool = False,
    dry_run: bool = False,
    device: str | None = None,
) -> Path | None:
    """``msattn train``: load and validate the recipe, then train (or only print it with ``dry_run``).

    The run folder defaults to ``runs/<recipe file stem>``. Returns the final checkpoint path.
    """
    recipe = load_recipe(recipe_path, overrides)
    out_dir = Path(out) if out is not None else Path("runs") / Path(recipe_path).stem
    if dry_run:
        dry_run_report(recipe, out_dir, resume=resume)
        return None
    return train(recipe, out_dir, resume=resume, device=device)


def dry_run_report(recipe: Recipe, out_dir: Path, resume: bool = False, console: Console | None = None) -> list[str]:
    """Print the resolved recipe and what training would do; returns the warnings printed."""
    console = console or Console(highlight=False, soft_wrap=True)
    recipe = resolve_paths(recipe)
    warnings: list[str] = []
    root = Path(recipe.data.root)
    if not (root / "dataset.json").is_file():
        if recipe.data.auto_prepare:
            console.print(f"data: {root} is missing; training will prepare it (data.auto_prepare = "
                          f"{recipe.data.auto_prepare!r})")
        else:
            warnings.append(f"data folder {root} not found or has no dataset.json (run msattn prepare-data first)")
    else:
        for split in (recipe.data.train_split, recipe.data.val_split):
            if not (root / f"{split}.txt").is_file():
                warnings.append(f"{root / (split + '.txt')}: split list not found")
    for key in ("pretrained", "init_from"):
        value = getattr(recipe.model, key)
        if value and value != "torchvision" and not Path(value).expanduser().is_file():
            warnings.append(f"model.{key}: {value} not found")
    if (out_dir / "last.pt").exists() and not resume:
        warnings.append(f"{out_dir} already holds a run (last.pt): training would refuse without --resume")
    accumulation = recipe.train.batch_size // recipe.micro_batch
    console.print(f"# resolved recipe (run folder: {out_dir})")
    console.print(format_recipe(recipe), markup=False)
    console.print(
        f"# batch {recipe.train.batch_size} = micro-batch {recipe.micro_batch} x {accumulation} accumulation "
        "step(s) (divided further over DDP ranks)"
    )
    for text in warnings:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: {text}", markup=False)
    console.print("recipe OK (dry run: nothing trained)")
    return warnings


def resolve_paths(recipe: Recipe) -> Recipe:
    """Make ``data.root`` (and weight paths) absolute, relative to the working directory."""

    def absolute(value: str | None) -> str | None:
        if value is None or value == "torchvision":
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


# ----------------------------------------------------------------------------- data stream


class TrainStream(Dataset):
    """Item ``(k, index)`` of a SegmentationFolder: image ``index`` augmented with a generator seeded by ``(seed, k)``.

    The augmentation of global sample ``k`` is thus fixed whatever the worker, rank or
    resume point, and never touches the process's RNGs (which drive dropout).
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        k, index = key
        image, label = self.dataset.read_pair(index)
        rng = np.random.default_rng([self.seed, _AUG_STREAM, k])
        image_t, label_t = self.dataset.transform(image, label, rng)
        return {"image": image_t, "label": label_t, "id": self.dataset.ids[index]}


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits an ``n``-image split."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


class StreamSampler(Sampler):
    """Yields ``(k, index)`` keys of this rank's micro-batches for iterations ``start`` .. ``stop - 1``."""

    def __init__(self, n: int, batch: int, micro: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.micro, self.seed = n, batch, micro, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.per_rank = batch // (micro * world)  # micro-batches per rank per iteration

    def __len__(self) -> int:
        return (self.stop - self.start) * self.per_rank * self.micro

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, order = -1, np.empty(0, dtype=np.int64)
        for t in range(self.start, self.stop):
            for a in range(self.per_rank):
                j = a * self.world + self.rank  # micro-batch j of the iteration goes to rank j % world
                first = t * self.batch + j * self.micro
                for k in range(first, first + self.micro):
                    if k // self.n != epoch:
                        epoch = k // self.n
                        order = epoch_order(self.seed, epoch, self.n)
                    yield k, int(order[k % self.n])


# ----------------------------------------------------------------------------- RNG state


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain tensors/numbers (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- schedule


def lr_factor(recipe: Recipe) -> Any:
    """The multiplier of every group's initial lr at iteration ``it`` (step or poly)."""
    optim, total = recipe.optim, recipe.train.iterations
    if optim.schedule == "poly":
        return lambda it: max(0.0, 1.0 - it / total) ** optim.power
    return lambda it: optim.gamma ** (it // optim.step_size)


# ----------------------------------------------------------------------------- the loop


def train(recipe: Recipe, out_dir: Path, resume: bool = False, device: str | None = None) -> Path:
    """Train ``recipe`` into ``out_dir`` (``device`` overrides ``train.device``); returns the last checkpoint."""
    with process_group(device if device is not None else recipe.train.device) as info:
        return _train(resolve_paths(recipe), Path(out_dir), resume, info)


def _train(recipe: Recipe, out_dir: Path, resume: bool, info: DistInfo) -> Path:  # noqa: C901 - the loop, on purpose
    from msattn.data import read_dataset_info
    from msattn.models import build_model, param_groups, segmentation_loss

    console = Console(highlight=False, soft_wrap=True, quiet=not info.is_main)
    dev, cfg = info.device, recipe.train
    cuda = dev.type == "cuda"

    # --- the run folder: refuse to overwrite a run, or resume it
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    state = None
    if last_path.exists():
        if not resume:
            raise UsageError(
                f"{out_dir}: already holds a run (last.pt); add --resume to continue it or pick another --out"
            )
        state = load_checkpoint(last_path)
    elif resume:
        console.print(f"no {last_path} yet: starting a new run")

    # --- data (prepared by rank 0 when the recipe says so)
    if info.is_main:
        maybe_prepare(recipe, console)
    barrier(info)
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
    initial = load_initial_weights(recipe) if state is None else None
    norm = resume_input_norm(state) if state is not None else resolve_input_norm(
        recipe, initial.input_norm, warn=console.print
    )
    train_set, val_set, select_set = build_datasets(recipe, dataset_info, console, norm)
    micro, world = recipe.micro_batch, info.world_size
    if cfg.batch_size % (micro * world):
        raise ConfigError(
            f"train.batch_size ({cfg.batch_size}) must be a multiple of train.micro_batch x GPUs ({micro} x {world})"
        )
    accumulation = cfg.batch_size // (micro * world)

    # --- model, optimizer, schedule
    seed_everything(cfg.seed)
    model = build_model(
        num_classes,
        scales=recipe.model.scales,
        merge=recipe.model.merge,
        extra_supervision=recipe.model.extra_supervision,
        width=recipe.model.width,
        dropout=recipe.model.dropout,
        attention_hidden=recipe.model.attention_hidden,
        attention_dropout=recipe.model.attention_dropout,
        **recipe.model.extra_model_args(),  # issue 15: attention head options, fc6 dilation
    )
    if initial is not None:
        apply_initial_weights(model, initial, console)
    model.to(dev)
    if cfg.channels_last:  # faster on CUDA and on CPU (see benchmarks/README.md)
        model.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    groups = param_groups(
        model, recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.head_lr_mult, recipe.optim.attention_lr_mult
    )
    optimizer = make_optimizer(groups, recipe.optim.optimizer, recipe.optim.lr, recipe.optim.momentum, dev)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    start, best_miou, last_metrics = 0, -math.inf, {}
    if state is None:
        seed_everything(cfg.seed + 1000 * info.rank)  # dropout differs per rank, like per image in one process
    else:
        start, best_miou = _load_training_state(state, recipe, model, optimizer, scheduler, scaler, info, console)
        last_metrics = state.get("metrics") or {}
    ddp_model = model
    if info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    if cfg.compile:  # the training forward/backward only; validation and checkpoints use the eager model
        ddp_model = torch.compile(ddp_model)

    dataset_meta = {
        "name": dataset_info.name,
        "classes": list(dataset_info.classes),
        "palette": [list(c) for c in dataset_info.palette],
        "ignore_index": int(dataset_info.ignore_index),
        "root": str(root),
        "input_norm": norm.name,
        "mean": list(norm.mean),
        "std": list(norm.std),
    }
    config = recipe_to_dict(recipe)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(out_dir)
        write_json(out_dir / "config.json", config)
    log = MetricsLog(out_dir, start, enabled=info.is_main)

    def checkpoint(iteration: int, path: Path | list[Path]) -> None:
        rng = all_gather_objects(capture_rng(dev), info)  # collective: every rank calls it
        if not info.is_main:
            return
        ckpt = make_checkpoint(
            model,
            dataset_meta,
            config,
            iteration,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            rng={"per_rank": rng},
            best_miou=best_miou if math.isfinite(best_miou) else None,
            metrics=last_metrics,
        )
        for p in path if isinstance(path, list) else [path]:
            save_checkpoint(p, ckpt)

    # --- the loop
    loader = make_train_loader(train_set, recipe, start, info)
    batches = iter(loader)
    step = functools.partial(
        train_step,
        ddp_model,
        optimizer=optimizer,
        scaler=scaler,
        device=dev,
        amp_dtype=amp_dtype,
        channels_last=cfg.channels_last,
        loss_fn=segmentation_loss,
        loss_options={"extra_supervision": recipe.model.extra_supervision, "label_mode": cfg.label_mode,
                      "ignore_index": dataset_info.ignore_index},
        scales=tuple(recipe.model.scales),
        info=info,
    )
    guard = NonFiniteGuard(dev)

    def stop_if_nonfinite() -> None:
        """Host check of the guard (a sync): at log, validation and checkpoint points only."""
        bad = guard.first_bad()
        if bad is None:
            return
        offset, value = bad
        checkpoint(start + offset, out_dir / "failed.pt")
        saved = "the weights at this point (the GradScaler skipped the non-finite steps)" if scaler.is_enabled() \
            else "the weights and optimizer state before that step"
        raise TrainingError(
            f"loss became {value} at iteration {start + offset + 1}; {saved} are saved in "
            f"{out_dir / 'failed.pt'} (last.pt keeps the last good checkpoint). Lower optim.lr, check the "
            "data, or use train.amp=bf16/off, then resume with --resume"
        )

    total = cfg.iterations
    console.print(
        f"training {total - start} iterations (from {start}) on {dev}{f' x {world} ranks' if world > 1 else ''}: "
        f"batch {cfg.batch_size} = {micro} x {accumulation} accumulation x {world}, {len(train_set)} images, "
        f"run folder {out_dir}"
    )
    ddp_model.train()
    window: dict[str, torch.Tensor] = {}
    window_iters, window_start = 0, time.perf_counter()
    with _progress(console, enabled=info.is_main) as progress:
        task = progress.add_task("train", total=total, completed=start, loss=float("nan"))
        for it in range(start, total):
            # one optimizer step = `accumulation` micro-batches on every rank; no host-device sync
            step_terms = step([next(batches) for _ in range(accumulation)], guard=guard)
            scheduler.step()
            done = it + 1

            # --- logging (terms averaged over the window and over ranks)
            for name, value in step_terms.items():
                window[name] = window.get(name, 0.0) + value
            window_iters += 1
            validate = (val_set is not None or select_set is not None) and (
                (cfg.val_every and done % cfg.val_every == 0) or done == total
            )
            save_last = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total
            if done % cfg.log_every == 0 or validate or save_last:
                stop_if_nonfinite()
            if done % cfg.log_every == 0 or done == total:
                names = sorted(window)
                means = all_reduce_mean(torch.stack([torch.as_tensor(window[n]) for n in names]) / window_iters, info)
                elapsed = time.perf_counter() - window_start
                record = {"iteration": done, **{n: float(v) for n, v in zip(names, means.tolist())}}
                record["lr"] = recipe.optim.lr * lr_factor(recipe)(it)  # the lr of this step (backbone weights)
                record["images_per_s"] = window_iters * cfg.batch_size / max(elapsed, 1e-9)
                record["memory_mb"] = memory_mb(dev)
                log.write(record)
                progress.update(task, loss=record["loss"])
                console.print(
                    f"it {done:>6}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                    f"{record['images_per_s']:.1f} img/s  {record['memory_mb']:.0f} MB"
                )
                window, window_iters, window_start = {}, 0, time.perf_counter()
            progress.update(task, completed=done)

            # --- validation, checkpoints
            select_miou = -math.inf
            if validate and val_set is not None:  # the scored split
                last_metrics = run_validation(model, val_set, recipe, dataset_info, info, amp_dtype)
                log.write({"iteration": done, "val_miou": last_metrics["miou"],
                           "val_pixel_accuracy": last_metrics["pixel_accuracy"]})
                console.print(f"it {done:>6}/{total}  val mIoU {format_miou(last_metrics['miou'])}  "
                              f"pixel acc {format_miou(last_metrics['pixel_accuracy'])}")
            if validate and select_set is not None:  # the held-out split that chooses best.pt
                select_miou = run_validation(model, select_set, recipe, dataset_info, info, amp_dtype)["miou"]
                log.write({"iteration": done, "select_miou": select_miou})
                console.print(f"it {done:>6}/{total}  {recipe.data.select_split} mIoU {format_miou(select_miou)} "
                              "(chooses best.pt)")
            improved = select_miou > best_miou
            if improved:
                best_miou = select_miou
            targets = ([last_path] if save_last else []) + ([best_path] if improved else [])
            if targets:
                checkpoint(done, targets)
            ddp_model.train()

    barrier(info)
    log.close()
    if start >= total:
        console.print(f"{last_path} is already at iteration {start} of {total}: nothing to train")
    if cfg.eval_at_end and info.is_main:
        report_final(recipe, out_dir, last_metrics, dataset_info, console)
    return last_path


def optimizer_kernels(device: torch.device) -> dict[str, bool | None]:
    """The optimizer implementation for ``device``: fused on CUDA, PyTorch's default on CPU.

    A fused step is one kernel and can skip an update on the device (see NonFiniteGuard). On
    CPU there is no device to wait for: the host reads the flag, and PyTorch's default
    kernels keep CPU runs identical to earlier versions.
    """
    return {"fused": True, "foreach": None} if device.type == "cuda" else {"fused": None, "foreach": None}


def make_optimizer(
    groups: list[dict[str, Any]], name: str, lr: float, momentum: float, device: torch.device
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW over DeepLab's parameter groups."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **optimizer_kernels(device))
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, **optimizer_kernels(device))


class NonFiniteGuard:
    """Watches the step loss on the device, so that the host need not look at every step.

    The first non-finite loss (on any rank: the loss is all-reduced first) sets ``halted``;
    from then on every update is skipped: on CUDA on the device, through the fused
    optimizer's ``found_inf`` (the protocol GradScaler uses); on CPU by the host, which can
    read the flag for free. The weights and optimizer state thus stay those before the
    first bad step until the host calls :meth:`first_bad` at its next log, validation or
    checkpoint point.
    """

    def __init__(self, device: torch.device) -> None:
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)  # steps taken before halting
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)  # the first non-finite loss

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Record this step's (all-reduced) loss; returns ``found_inf`` (1.0: skip the update)."""
        bad = ~torch.isfinite(loss).all()
        self.bad_loss = torch.where(bad & ~self.halted, loss.float().reshape(-1)[0], self.bad_loss)
        self.halted |= bad
        self.good_steps += (~self.halted).long()
        return self.halted.float()

    def first_bad(self) -> tuple[int, float] | None:
        """(steps taken before the first bad one, its loss), or None; synchronises with the device."""
        if not bool(self.halted):
            return None
        return int(self.good_steps), float(self.bad_loss)


def train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, Any]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    guard: NonFiniteGuard,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    loss_fn: Any,
    loss_options: dict[str, Any],
    scales: tuple[float, ...],
    info: DistInfo,
) -> dict[str, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (gradient accumulation), with no host-device sync.

    ``model`` may be DDP-wrapped and compiled. Returns the loss terms averaged over the
    micro-batches, as device tensors. With fp16 the GradScaler skips steps whose gradients
    are not finite itself; otherwise ``guard`` decides on the device (see NonFiniteGuard).
    """
    accumulation = len(micro_batches)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    step_terms: dict[str, torch.Tensor] = {}
    for a, batch in enumerate(micro_batches):
        images = batch["image"].to(device, non_blocking=True)  # [m, 3, crop, crop]
        labels = batch["label"].to(device, non_blocking=True)  # [m, crop, crop]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = a == accumulation - 1
        sync = model.no_sync() if info.distributed and not last else contextlib.nullcontext()
        with sync:
            try:
                with autocast:
                    outputs = model(images)
                loss, terms = loss_fn(outputs, labels, **loss_options)
                scaler.scale(loss / accumulation).backward()
            except torch.OutOfMemoryError:
                raise ResourceError(
                    f"out of GPU memory with micro-batches of {images.shape[0]} images at crop {images.shape[-1]} "
                    f"and scales {list(scales)}: lower train.micro_batch (accumulation keeps the batch), "
                    "data.crop_size or the scales, or use train.amp=bf16"
                ) from None
        for name, value in {"loss": loss.detach(), **terms}.items():
            step_terms[name] = step_terms.get(name, 0.0) + value.float() / accumulation

    found_inf = guard.update(all_reduce_mean(step_terms["loss"].reshape(1), info))
    if scaler.is_enabled():
        scaler.step(optimizer)  # fused optimizer: found_inf from the gradients, on the device
    elif all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = found_inf  # read by the fused step (GradScaler's protocol)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(found_inf):  # CPU kernels: the flag is in host memory, reading it waits for nothing
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_terms


def _load_training_state(
    state: dict[str, Any],
    recipe: Recipe,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    info: DistInfo,
    console: Console,
) -> tuple[int, float]:
    """Restore everything from a checkpoint; returns (iteration, best mIoU)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a checkpoint's groups bring the kernels of where it was written
            group.update(optimizer_kernels(info.device))
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot resume: the checkpoint does not match this recipe ({first})") from None
    try:
        previous = recipe_from_dict(state.get("config", {}), source="checkpoint config")
        changed = [key for key in recipe_diff(previous, recipe)]
        if changed:
            console.print(f"warning: resuming with changed keys: {', '.join(changed)}")
    except ConfigError:
        console.print("warning: the checkpoint's recipe is unreadable by this version; resuming anyway")
    states = (state.get("rng") or {}).get("per_rank") or []
    if len(states) == info.world_size:
        restore_rng(states[info.rank], info.device)
    else:
        console.print(f"warning: checkpoint has RNG states of {len(states)} rank(s), this run has "
                      f"{info.world_size}: data order is exact, dropout masks are not")
        seed_everything(recipe.train.seed + 1000 * info.rank + int(state["iteration"]))
    best = state.get("best_miou")
    iteration = int(state["iteration"])
    console.print(f"resumed from iteration {iteration}")
    return iteration, (best if isinstance(best, float) else -math.inf)


def resume_input_norm(state: dict[str, Any]) -> InputNorm:
    """The normalisation a checkpoint's run used (a resumed run keeps it)."""
    from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    meta = state.get("dataset") or {}
    mean = tuple(float(v) for v in meta.get("mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in meta.get("std") or IMAGENET_STD)
    return InputNorm(checkpoint_input_norm(state), mean, std)


def maybe_prepare(recipe: Recipe, console: Console) -> None:
    """Build the dataset folder when it is missing and ``data.auto_prepare`` says how."""
    root = Path(recipe.data.root)
    if (root / "dataset.json").is_file() or recipe.data.auto_prepare is None:
        return
    if recipe.data.auto_prepare == "demo":
        from msattn.data.prepare.demo import prepare_demo

        console.print(f"preparing the synthetic demo dataset in {root}")
        prepare_demo(out=root, num_train=240, num_val=60, image_size=96, seed=0, workers=recipe.data.workers)


def build_datasets(
    recipe: Recipe, info: Any, console: Console, norm: InputNorm
) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """The training split (TrainTransform), the scored split (data.val_split; None when its list is
    missing) and the split that chooses best.pt (data.select_split; None when not set)."""
    from msattn.data import SegmentationFolder
    from msattn.data.transforms import EvalTransform, TrainTransform

    data = recipe.data
    train_tf = TrainTransform(
        crop_size=data.crop_size,
        scale_range=data.scale_range,
        flip=data.flip,
        mean=norm.mean,
        std=norm.std,
        ignore_index=info.ignore_index,
    )
    root = Path(data.root)
    train_set = SegmentationFolder(root, data.train_split, transform=train_tf, max_pixels=data.max_pixels)
    if len(train_set) == 0:
        raise DataError(f"{root / (data.train_split + '.txt')}: the training split is empty")

    def eval_split(split: str) -> Dataset:
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


def make_train_loader(train_set: Dataset, recipe: Recipe, start: int, info: DistInfo) -> DataLoader:
    """A DataLoader over this rank's part of the seeded stream, from iteration ``start`` on."""
    cfg = recipe.train
    sampler = StreamSampler(
        len(train_set), cfg.batch_size, recipe.micro_batch, cfg.seed, start, cfg.iterations, info.rank, info.world_size
    )
    workers = recipe.data.workers
    return DataLoader(
        TrainStream(train_set, cfg.seed),
        batch_size=recipe.micro_batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # never draws from the global RNG
    )


def run_validation(
    model: torch.nn.Module, val_set: Dataset, recipe: Recipe, dataset_info: Any, info: DistInfo, amp_dtype: Any
) -> dict[str, Any]:
    """Validation mIoU of the current weights (sharded over ranks, reduced)."""
    from msattn.engine.evaluate import evaluate_model

    return evaluate_model(
        model,
        val_set,
        num_classes=len(dataset_info.classes),
        class_names=list(dataset_info.classes),
        ignore_index=dataset_info.ignore_index,
        scales=recipe.eval.scales,
        flip=recipe.eval.flip,
        batch_size=recipe.eval.batch_size,
        limit=recipe.eval.limit,
        device=info.device,
        amp_dtype=amp_dtype,
        rank=info.rank,
        world_size=info.world_size,
        progress=False,
        pad_to=recipe.eval.pad_to,
    )


def report_final(recipe: Recipe, out_dir: Path, metrics: dict[str, Any], dataset_info: Any, console: Console) -> None:
    """After training: the per-class table, the mIoU and where everything is."""
    from msattn.engine.evaluate import print_metrics_table
    from msattn.engine.metrics import json_safe

    if not metrics:
        console.print("no validation split: nothing to report")
        return
    select = recipe.data.select_split
    report = {
        "checkpoint": str(out_dir / "last.pt"),
        "split": recipe.data.val_split,
        "best_checkpoint_selected_on": select,
        **metrics,
    }
    write_json(out_dir / "eval.json", json_safe(report))
    print_metrics_table(metrics, title=f"{dataset_info.name} {recipe.data.val_split}: last.pt", console=console)
    console.print(
        f"mIoU {format_miou(metrics['miou'])} on {metrics['num_images']} {recipe.data.val_split} images (last.pt)",
        markup=False,
    )
    files = "last.pt, " + ("best.pt, " if (out_dir / "best.pt").is_file() else "") + "config.json, metrics.jsonl, eval.json"
    if select is not None:
        console.print(f"best.pt was chosen on the held-out split {select!r}; the score above is last.pt's", markup=False)
    console.print(f"outputs: {out_dir}/ ({files})", markup=False)


# ----------------------------------------------------------------------------- logging helpers


class MetricsLog:
    """metrics.jsonl (one JSON object a line, flushed) and TensorBoard scalars when available.

    On resume, lines after the checkpoint's iteration (written by the killed run) and a
    half-written last line are dropped.
    """

    def __init__(self, out_dir: Path, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.handle = None
        self.tb = None
        if not enabled:
            return
        path = out_dir / "metrics.jsonl"
        kept = []
        if start > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("iteration", 0) <= start:
                    kept.append(json.dumps(record))
        from msattn.io import write_text

        write_text(path, "".join(line + "\n" for line in kept))
        self.handle = path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start or None)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.handle is None:
            return
        from msattn.engine.metrics import json_safe

        self.handle.write(json.dumps(json_safe(record)) + "\n")
        self.handle.flush()
        if self.tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.tb is not None:
            self.tb.close()


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


@contextlib.contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress


__all__ = [
    "NonFiniteGuard",
    "StreamSampler",
    "TrainStream",
    "dry_run_report",
    "epoch_order",
    "lr_factor",
    "make_optimizer",
    "optimizer_kernels",
    "train",
    "train_from_recipe",
    "train_step",
]
