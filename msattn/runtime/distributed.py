"""Device choice and DistributedDataParallel set-up, in one place.

``torchrun --nproc_per_node=N -m msattn.cli train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them
and joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them everything
runs in one process. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import gc
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from msattn.errors import UsageError


@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> CUDA when available else CPU; ``"cuda"`` without a GPU is a UsageError."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return dev


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer") from None


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process, (0, 1) without torchrun; joins nothing."""
    return _env_int("RANK", 0), max(1, _env_int("WORLD_SIZE", 1))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(device=resolve_device(device))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        initialized_here = True
    return DistInfo(rank, world, local_rank, dev, initialized_here)


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the length of a command, then :func:`cleanup`.

    An exception leaving the block has the local variables of its frames cleared first, so a
    DDP model held only by the traceback is gone before the process group is destroyed.
    """
    info = init_distributed(device)
    try:
        yield info
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        cleanup(info)


def cleanup(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` joined it.

    Unreachable DDP wrappers are collected first: a DDP reducer that outlives its gloo
    process group aborts the process at exit now and then (torch 2.13, "terminate called
    without an active exception").
    """
    if info.initialized_here and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (returns it unchanged in one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def all_reduce_total(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks, on the device (the host waits for nothing; unchanged in one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_sum(values: list[int], info: DistInfo) -> list[int]:
    """Sum a few integers over ranks (unchanged in one process)."""
    if not info.distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.int64, device=info.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(v) for v in total.tolist()]


def all_gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Gather one picklable object per rank (a one-element list in one process)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's object on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
