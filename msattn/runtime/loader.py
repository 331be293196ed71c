"""A loader that keeps up: worker counts (``data.workers = "auto"``), compact batches, data-wait time.

- :func:`resolve_workers` turns ``data.workers`` into a number of DataLoader processes:
  an integer as given; ``"auto"`` from the CPUs this process may use (shared among the
  ranks of a node) and, for training on CUDA, from the measured decode + augment rate of
  one worker against :data:`TARGET_IMAGES_PER_S` (about the fastest training step measured
  on one GPU), so a small, fast-decoding dataset does not start 15 processes.
- Training batches travel as ``uint8`` (images ``[N, 3, H, W]`` and labels ``[N, H, W]``;
  ``TrainTransform(output="uint8")``): 5x fewer bytes through the workers' shared memory,
  the pinned-memory copy and PCIe than float32 images and int64 labels.
  :class:`DeviceBatches` copies them to the device (``non_blocking``, from pinned memory on
  CUDA) and normalises there through a 3 x 256 table made by
  :func:`msattn.data.transforms.normalize_image` itself, so the result is **bit for bit**
  what the workers computed before, on CPU and CUDA alike (a table lookup does no arithmetic).
- :class:`DeviceBatches` also counts the time the loop waited for the next batch; the
  training log shows it as a share of each log interval (``data_wait``), so a starved GPU
  is visible.

Why the crop, flip and rescale stay in the workers: the rescale is PIL's bilinear resize,
which a GPU resize would not reproduce bit for bit (and the training stream must stay a
pure function of the seed, identical to earlier versions); cropping on the GPU would ship
the whole rescaled image (up to 2.25x the crop's pixels at scale 1.5) instead of the crop;
a flip of a 321 x 321 uint8 crop costs the worker microseconds. There is no colour
augmentation in the recipe to move.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msattn.data.transforms import normalize_image
from msattn.errors import ConfigError

AUTO = "auto"
#: at most this many workers per rank from "auto" (each holds prefetched batches in memory)
MAX_AUTO_WORKERS = 16
#: images/s one GPU may consume: H200, crop 321, batch 30, one scale, bf16 (benchmarks/README.md)
TARGET_IMAGES_PER_S = 1000.0


# ----------------------------------------------------------------------------- worker counts


@dataclass(frozen=True)
class WorkerPlan:
    """A number of loader workers and the one line that says why."""

    count: int
    reason: str


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_ranks() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_workers(
    value: int | str,
    device: torch.device,
    *,
    cpus: int | None = None,
    ranks: int | None = None,
    decode_rate: Callable[[], float | None] | None = None,
    target: float = TARGET_IMAGES_PER_S,
) -> WorkerPlan:
    """``data.workers`` -> a :class:`WorkerPlan`.

    ``"auto"``: one CPU per rank stays with the process that runs the steps. On CPU the step,
    not the loader, is the bottleneck: 1 worker (0 with a single CPU). On CUDA: the CPUs
    left, at most :data:`MAX_AUTO_WORKERS`, and no more than ``ceil(target / rate)`` when
    ``decode_rate()`` measures one worker's images/s.
    """
    if isinstance(value, bool) or not (isinstance(value, int) or value == AUTO):
        raise ConfigError(f'data.workers must be an integer >= 0 or "auto", got {value!r}')
    if isinstance(value, int):
        return WorkerPlan(value, f"data.workers = {value}: {value} loader worker(s)")
    cpus = cpus or usable_cpus()
    ranks = ranks or local_ranks()
    per_rank = max(1, cpus // ranks)
    spare = per_rank - 1
    where = f"{cpus} CPUs" + (f" for {ranks} ranks" if ranks > 1 else "")
    if device.type != "cuda":
        count = min(1, spare)
        return WorkerPlan(count, f"data.workers = auto: {count} loader worker(s) ({where}; on CPU the step is the "
                                 "bottleneck)")
    cap = max(1, min(MAX_AUTO_WORKERS, spare))
    rate = decode_rate() if decode_rate is not None else None
    if not rate or rate <= 0:
        return WorkerPlan(cap, f"data.workers = auto: {cap} loader worker(s) ({where})")
    count = max(1, min(cap, math.ceil(target / rate)))
    return WorkerPlan(
        count,
        f"data.workers = auto: {count} loader worker(s) ({where}; one decodes + augments {rate:.0f} img/s, "
        f"{count} feed about {count * rate:.0f} img/s)",
    )


def measure_decode_rate(
    dataset: Any, items: int = 4, max_seconds: float = 1.0, clock: Callable[[], float] = time.perf_counter
) -> float | None:
    """Images/s of one process reading and augmenting items of a SegmentationFolder (its own
    ``read_pair`` + ``transform`` with a fixed generator: the training stream is not touched)."""
    n = len(dataset)
    if n == 0:
        return None
    start, done = clock(), 0
    for i in range(min(items, n)):
        image, label = dataset.read_pair(i)
        dataset.transform(image, label, np.random.default_rng([0, i]))
        done += 1
        if clock() - start > max_seconds:
            break
    seconds = clock() - start
    return done / seconds if seconds > 0 else None


def train_workers(value: int | str, dataset: Any, device: torch.device) -> WorkerPlan:
    """:func:`resolve_workers` for training: on CUDA with ``"auto"`` the decode rate is measured on ``dataset``."""
    probe = (lambda: measure_decode_rate(dataset)) if value == AUTO and device.type == "cuda" else None
    return resolve_workers(value, device, decode_rate=probe)


# ----------------------------------------------------------------------------- batches on the device


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 [3, 256]: entry [c, v] is what :func:`normalize_image` gives channel c of value v."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]: pixel v = (v, v, v)
    return normalize_image(values, mean, std)[:, 0, :].contiguous()


def normalize_uint8(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, H, W] by table lookup (``table`` [3, 256] on the same device)."""
    offsets = torch.arange(0, 3 * 256, 256, device=images.device).view(1, 3, 1, 1)
    return table.reshape(-1)[images.long() + offsets]


class DeviceBatches(Iterator[dict[str, Any]]):
    """Loader batches on ``device``: uint8 images normalised there, labels as int64; times the waits.

    ``waited`` accumulates the seconds spent in the loader's ``next`` (the loop had nothing
    to do but wait); :meth:`take_wait` returns and resets it.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, Any]],
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.batches = iter(batches)
        self.device = device
        self.table = normalize_table(mean, std).to(device)
        self.clock = clock
        self.waited = 0.0

    def __next__(self) -> dict[str, Any]:
        start = self.clock()
        try:
            batch = next(self.batches)
        finally:
            self.waited += self.clock() - start
        return self.to_device(batch)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch["image"].to(self.device, non_blocking=True)
        if image.dtype == torch.uint8:
            image = normalize_uint8(image, self.table)
        label = batch["label"].to(self.device, non_blocking=True)
        return {**batch, "image": image, "label": label.long()}

    def take_wait(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited
