"""One optimizer step and what it steps: optimizer choice, lr schedule, the non-finite guard.

:func:`train_step` takes this rank's micro-batches of one iteration (gradient accumulation)
and never makes the host wait for the GPU; :class:`NonFiniteGuard` decides on the device
whether an update is skipped. ``msattn bench`` times exactly this function.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from msattn.config.recipe import Recipe
from msattn.errors import ResourceError
from msattn.runtime.distributed import DistInfo, all_reduce_mean


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
