"""The training stream and the random state: what makes a resumed run continue bit for bit.

The loader position needs no state. Global sample number ``k`` (counting images over all
iterations) is image ``perm(seed, k // n)[k % n]`` of an ``n``-image split, augmented with a
generator seeded from ``(seed, k)``; iteration ``t`` reads samples ``t*B ... t*B + B - 1``
(``B = train.batch_size``, the global batch). :func:`split_batch` deals them out to the ranks
and their micro-batches (:class:`BatchSplit`). Iteration ``t`` thus reads the same images with
the same augmentation whatever the worker count, the number of processes, the micro-batch
cap or the iteration the process started from: a checkpoint only needs its iteration, and a
run resumes exactly with another world size.

Everything else random lives in the process: dropout draws from torch's CPU generator (CPU
runs) or the CUDA generator of the device, and numpy/python generators may be used by
user code. :func:`capture_rng` takes all of them (torch CPU, every CUDA device, numpy,
python) as plain tensors and numbers, so that a checkpoint loads with ``weights_only=True``;
:func:`restore_rng` puts them back. :func:`rng_neutral` runs validation without moving them,
so that the random stream of training does not depend on when it is validated.
:func:`backend_flags` sets the kernel settings of a run (and undoes them afterwards);
:func:`backend_record` writes them into checkpoints, and a resume that runs with other
settings says so.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from msattn.config.recipe import TrainConfig
from msattn.errors import ConfigError

_AUG_STREAM = 1  # SeedSequence spawn keys: keep the augmentation and order streams apart
_ORDER_STREAM = 2


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


@dataclass(frozen=True)
class BatchSplit:
    """How one global batch of ``batch`` images is dealt out: ``sizes[r][a]`` images in micro-batch ``a`` of rank ``r``.

    Every rank runs the same number of micro-batches (DDP and SyncBatchNorm run one collective
    per forward pass on every rank). Within an iteration the samples go out round by round:
    micro-batch 0 of rank 0, of rank 1, ..., then micro-batch 1 of every rank, and so on.
    """

    batch: int
    cap: int
    sizes: tuple[tuple[int, ...], ...]

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def accumulation(self) -> int:
        """Micro-batches (forward passes) per rank per iteration."""
        return len(self.sizes[0])

    def firsts(self, rank: int) -> list[int]:
        """Offset in the iteration's batch of the first sample of each of ``rank``'s micro-batches."""
        offsets, at = [], 0
        for a in range(self.accumulation):
            for r in range(self.world):
                if r == rank:
                    offsets.append(at)
                at += self.sizes[r][a]
        return offsets

    def describe(self) -> str:
        """One line: the batch over the processes and each process's micro-batches."""
        a = self.accumulation
        passes = f"{a} micro-batch{'es' if a > 1 else ''}"
        head = f"batch {self.batch} over {self.world} process{'es' if self.world > 1 else ''}, {passes}"
        head += " each" if self.world > 1 else ""
        head += f" (train.micro_batch: at most {_images(self.cap)} per pass)" if a > 1 else ""
        groups: list[tuple[int, int, tuple[int, ...]]] = []  # (first rank, last rank, sizes)
        for r, sizes in enumerate(self.sizes):
            if groups and groups[-1][2] == sizes:
                groups[-1] = (groups[-1][0], r, sizes)
            else:
                groups.append((r, r, sizes))
        parts = []
        for first, last, sizes in groups:
            images = "+".join(str(n) for n in sizes) + " images" if len(sizes) > 1 else _images(sizes[0])
            if self.world == 1:
                parts.append(images)
            else:
                who = f"rank {first}" if first == last else f"ranks {first}-{last}"
                parts.append(f"{who} take{'s' if first == last else ''} {images}")
        return f"{head}: {', '.join(parts)}"


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def split_batch(batch: int, cap: int, world: int) -> BatchSplit:
    """Deal a global batch of ``batch`` images out to ``world`` ranks in micro-batches of at most ``cap``.

    Rank ``r`` takes ``batch // world`` images, one more when ``r < batch % world``; every rank
    runs the fewest micro-batches that keep each within ``cap`` (the same count on every rank),
    sized as evenly as possible, larger first. An even share whose size the count divides is
    thus split into equal micro-batches. Refused: fewer images than ranks, and an uneven batch
    with ``cap`` 1 (a rank would need an empty micro-batch). The step's loss and gradient do not depend on the
    split (:func:`msattn.train.step.train_step` normalises over the whole batch).
    """
    if batch < world:
        raise ConfigError(
            f"train.batch_size ({batch}) is smaller than the number of processes ({world}): every process needs "
            f"at least one image per step; use train.batch_size >= {world} or fewer processes"
        )
    shares = [batch // world + (1 if r < batch % world else 0) for r in range(world)]
    count = -(-shares[0] // cap)  # ceil: rank 0 holds the largest share
    if shares[-1] < count:  # only with train.micro_batch = 1 and an uneven batch: an empty forward pass
        lower, upper = batch // world * world, (batch // world + 1) * world
        raise ConfigError(
            f"train.batch_size ({batch}) does not split evenly over {world} processes, and with train.micro_batch = "
            f"{cap} the processes with fewer images would run fewer forward passes; use train.batch_size = {lower} or "
            f"{upper}, or train.micro_batch >= 2"
        )
    sizes = tuple(tuple(n // count + (1 if a < n % count else 0) for a in range(count)) for n in shares)
    return BatchSplit(batch, cap, sizes)


class StreamSampler(Sampler):
    """Yields this rank's micro-batches, as lists of ``(k, index)`` keys, for iterations ``start`` .. ``stop - 1``."""

    def __init__(self, n: int, split: BatchSplit, seed: int, start: int, stop: int, rank: int = 0):
        self.n, self.split, self.seed = n, split, seed
        self.start, self.stop, self.rank = start, stop, rank

    def __len__(self) -> int:
        return (self.stop - self.start) * self.split.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, np.empty(0, dtype=np.int64)
        firsts, sizes = self.split.firsts(self.rank), self.split.sizes[self.rank]
        for t in range(self.start, self.stop):
            for first, size in zip(firsts, sizes):
                keys = []
                for k in range(t * self.split.batch + first, t * self.split.batch + first + size):
                    if k // self.n != epoch:
                        epoch = k // self.n
                        order = epoch_order(self.seed, epoch, self.n)
                    keys.append((k, int(order[k % self.n])))
                yield keys


def make_train_loader(
    train_set: Dataset, batch_size: int, micro: int, seed: int, start: int, stop: int,
    rank: int, world: int, workers: int, pin_memory: bool,
) -> DataLoader:  # fmt: skip
    """A DataLoader over this rank's part of the seeded stream, iterations ``start`` .. ``stop - 1``.

    ``micro`` is the cap of a micro-batch (:func:`split_batch`).
    """
    sampler = StreamSampler(len(train_set), split_batch(batch_size, micro, world), seed, start, stop, rank)
    return DataLoader(
        TrainStream(train_set, seed),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),  # never draws from the global RNG
    )


# ----------------------------------------------------------------------------- the process's random state


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain tensors/numbers (loadable with weights_only=True).

    ``cuda`` is the training device's generator, ``cuda_all`` every visible device's (read on
    the host: no wait for the GPU).
    """
    return plain_rng(snapshot_rng(device))


def snapshot_rng(device: torch.device) -> tuple[Any, ...]:
    """The RNG states as the libraries return them (a few microseconds: taken after every step)."""
    cuda = (torch.cuda.get_rng_state(device), torch.cuda.get_rng_state_all()) if device.type == "cuda" else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def plain_rng(snapshot: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`snapshot_rng`'s states as plain tensors and numbers (what a checkpoint holds)."""
    torch_state, (version, py_state, gauss), (_, keys, pos, has_gauss, cached), cuda = snapshot
    state: dict[str, Any] = {
        "torch": torch_state,
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
    }  # fmt: skip
    if cuda is not None:
        state["cuda"], state["cuda_all"] = cuda
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng` (every CUDA device's state when the device count matches)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    if device.type != "cuda":
        return
    every = state.get("cuda_all")
    if isinstance(every, list) and len(every) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(every)
    if "cuda" in state:  # the training device last: it wins where the lists disagree
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_neutral(device: torch.device) -> Iterator[None]:
    """Run a block (validation) without moving any RNG of the process.

    A DataLoader draws its base seed from torch's global generator each time it is iterated;
    without this, validating at iteration t would change the dropout masks of every later
    step, and a run validated at other iterations (or resumed after one that validated at its
    end) would train differently.
    """
    saved = capture_rng(device)
    try:
        yield
    finally:
        restore_rng(saved, device)


# ----------------------------------------------------------------------------- kernel settings


@contextlib.contextmanager
def backend_flags(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """The kernel settings of a run (cudnn.benchmark, TF32, deterministic algorithms), undone afterwards.

    With ``train.deterministic`` on CUDA, cuBLAS also gets its deterministic workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, unless set) when this is the process's first cuBLAS use.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    try:
        if device.type == "cuda":
            cudnn.benchmark = not cfg.deterministic
            matmul.allow_tf32 = cudnn.allow_tf32 = True
            if cfg.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if cfg.deterministic:
            cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def backend_record(device: torch.device) -> dict[str, Any]:
    """The kernel settings in force (compared on resume: a change makes the continuation inexact on GPU)."""
    return {
        "device": device.type,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if device.type == "cuda" else None,
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG") if device.type == "cuda" else None,
    }
