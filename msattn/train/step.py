"""One optimizer step and what it steps: optimizer choice, lr schedule, the non-finite guard.

:func:`train_step` takes this rank's micro-batches of one iteration (gradient accumulation)
and never makes the host wait for the GPU; :class:`NonFiniteGuard` decides on the device
whether an update is skipped. ``msattn bench`` times exactly this function. The loss of a
step is the mean over the whole batch (:class:`BatchCounts`): how the batch is split into
micro-batches and over ranks (:func:`msattn.train.stream.split_batch`) changes the float
rounding only.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from msattn.config.recipe import Recipe
from msattn.errors import ResourceError
from msattn.models.loss import valid_pixels
from msattn.runtime.distributed import DistInfo, all_reduce_mean, all_reduce_total


def lr_factor(recipe: Recipe) -> Any:
    """The multiplier of every group's initial lr at iteration ``it`` (step or poly)."""
    optim, total = recipe.optim, recipe.train.iterations
    if optim.schedule == "poly":
        return lambda it: max(0.0, 1.0 - it / total) ** optim.power
    return lambda it: optim.gamma ** (it // optim.step_size)


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

    The step's loss is that of one forward pass over the whole batch (every micro-batch of
    every rank): each term is summed over the batch's valid pixels and divided by their count
    over the batch (:class:`BatchCounts`), whatever the micro-batch sizes and the number of
    ranks. ``model`` may be DDP-wrapped and compiled. Returns this rank's share of the loss
    terms, as device tensors, scaled so that their mean over the ranks is the batch's value.
    With fp16 the GradScaler skips steps whose gradients are not finite itself; otherwise
    ``guard`` decides on the device (see NonFiniteGuard).
    """
    accumulation = len(micro_batches)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    labels = [batch["label"].to(device, non_blocking=True) for batch in micro_batches]  # each [m, crop, crop]
    norm: BatchCounts | None = None  # None: one pass in one process, whose own mean is the batch's
    step_terms: dict[str, torch.Tensor] = {}
    for a, batch in enumerate(micro_batches):
        images = batch["image"].to(device, non_blocking=True)  # [m, 3, crop, crop]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = a == accumulation - 1
        sync = model.no_sync() if info.distributed and not last else contextlib.nullcontext()
        with sync:
            try:
                with autocast:
                    outputs = model(images)
                if norm is None and (accumulation > 1 or info.distributed):
                    norm = BatchCounts.over_ranks(outputs, labels, loss_options, info)
                options = loss_options if norm is None else {**loss_options, "normalizers": norm.pixels}
                loss, terms = loss_fn(outputs, labels[a], **options)
                scaler.scale(loss).backward()
            except torch.OutOfMemoryError:
                raise ResourceError(
                    f"out of GPU memory with micro-batches of {images.shape[0]} images at crop {images.shape[-1]} "
                    f"and scales {list(scales)}: lower train.micro_batch (accumulation keeps the batch), "
                    "data.crop_size or the scales, or use train.amp=bf16"
                ) from None
        share = 1.0 if norm is None else images.shape[0] / norm.images  # this pass's part of the batch's images
        for name, value in {"loss": loss.detach(), **terms}.items():
            part = value.float() if norm is None or name == "loss" or name in norm.pixels else value.float() * share
            step_terms[name] = step_terms.get(name, 0.0) + part
    _update(optimizer, scaler, guard.update(all_reduce_mean(step_terms["loss"].reshape(1), info)))
    return step_terms


class BatchCounts:
    """What a training step divides by: the whole batch's valid pixels per loss term and its image count.

    Both are summed over the ranks (one small all-reduce, no host wait) and divided by the
    world size: DDP averages the ranks' gradients, so each rank's loss is ``world`` times its
    share, and the mean over the ranks of what :func:`train_step` returns is the batch's value.
    """

    def __init__(self, pixels: dict[str, torch.Tensor], images: torch.Tensor) -> None:
        self.pixels, self.images = pixels, images

    @classmethod
    def over_ranks(cls, outputs: dict, labels: list[torch.Tensor], loss_options: dict[str, Any],
                   info: DistInfo) -> BatchCounts:  # fmt: skip
        """From the first pass's ``outputs`` (the grids) and every micro-batch's ``labels`` of this rank."""
        counts = valid_pixels(outputs, labels, **loss_options)
        names = list(counts)
        images = counts[names[0]].new_full((), sum(lab.shape[0] for lab in labels))  # a fill, not a host copy
        totals = all_reduce_total(torch.stack([*(counts[n] for n in names), images]), info)
        shares = totals.clamp(min=1).double() / info.world_size  # an all-ignored batch: loss 0
        return cls({n: shares[i].float() for i, n in enumerate(names)}, shares[-1].float())


def _update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, found_inf: torch.Tensor) -> None:
    """The optimizer step (skipped when ``found_inf``), the scaler's update, gradients cleared."""
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
