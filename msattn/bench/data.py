"""``msattn bench`` loader modes on a synthetic demo dataset in a temporary folder.

- ``data``: ``prepare_demo`` (images/s, one process) and decode + augment (``SegmentationFolder``
  + ``TrainTransform``) in one process, i.e. per loader worker.
- ``train-e2e``: the real training input path and step: ``TrainStream`` over the demo images
  (1.5x the crop, about a VOC image), ``make_train_loader`` with ``--workers`` (``auto`` as
  in training), pinned uint8 batches normalised on the device (``DeviceBatches``) and the
  engine's ``train_step``. After ``warmup`` steps, ``iters`` steps run back to back (no
  sync between them, as in training); reported: images/s and the share of that time the
  loop waited for the loader (``data_wait``). A starved GPU shows as a high share.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from msattn.bench.cases import Settings, case_model, case_name, selected_pairs
from msattn.bench.measure import MB, LoadMonitor, MemoryProbe, synchronize
from msattn.data.datasets import SegmentationFolder
from msattn.data.prepare.demo import prepare_demo
from msattn.data.transforms import TrainTransform
from msattn.models.loss import segmentation_loss
from msattn.models.params import param_groups
from msattn.runtime.distributed import DistInfo
from msattn.runtime.loader import DeviceBatches, measure_decode_rate, resolve_workers
from msattn.train.step import NonFiniteGuard, make_optimizer, train_step
from msattn.train.stream import make_train_loader

#: the train-e2e cases: one scale, and the paper's 3-scale attention model
E2E_PAIRS: tuple[tuple[tuple[float, ...], str | None], ...] = (((1.0,), None), ((1.0, 0.75, 0.5), "attention"))


def data_image_side(size: int) -> int:
    """Side of the demo images for the loader benches: 1.5 x the crop (321 -> 481, about a VOC image)."""
    return max(16, size + size // 2)


@contextlib.contextmanager
def demo_folder(num_train: int, side: int) -> Iterator[tuple[Path, float]]:
    """A temporary demo dataset: (its folder, seconds prepare_demo took in one process)."""
    with tempfile.TemporaryDirectory(prefix="msattn-bench-") as tmp:
        root = Path(tmp) / "demo"
        quiet = io.StringIO()  # prepare_demo's own progress bar and summary table
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            start = time.perf_counter()
            prepare_demo(out=root, num_train=num_train, num_val=2, image_size=side, seed=0, workers=0)
            seconds = time.perf_counter() - start
        yield root, seconds


def bench_data(size: int, settings: Settings, context: dict[str, Any]) -> list[dict[str, Any]]:
    """prepare_demo throughput and decode + augment throughput of one process (= one loader worker)."""
    side = data_image_side(size)
    num_train = 8 * settings.iters
    common = {"mode": "data", "scales": [], "merge": None, "size": size, **context, "gflops": None}
    common.update({"image_side": side, "gflops_per_s": None, "peak_fraction": None})
    memory, monitor = MemoryProbe(torch.device("cpu")), LoadMonitor()
    settings.say(f"data {size}: preparing {num_train + 2} demo images of {side}x{side}")
    with contextlib.ExitStack() as stack:
        with memory.measure():
            root, seconds = stack.enter_context(demo_folder(num_train, side))
        count = num_train + 2
        prepare = _data_record(common, "prepare_demo", seconds / count, [seconds / count], memory, count)
        prepare["cpu_other_load"] = monitor.other_load()

        dataset = SegmentationFolder(root, "train", transform=TrainTransform(size, scale_range=(0.5, 1.5), flip=True))
        times: list[float] = []
        memory, monitor = MemoryProbe(torch.device("cpu")), LoadMonitor()
        with memory.measure():
            for round_ in range(settings.warmup + settings.iters):
                settings.say(f"data {size}: decode + augment, round {round_ + 1}/{settings.warmup + settings.iters}",
                             force=round_ == 0)
                dataset.set_epoch(round_)
                for index in range(len(dataset)):
                    start = time.perf_counter()
                    dataset[index]
                    if round_ >= settings.warmup:
                        times.append(time.perf_counter() - start)
        load = _data_record(common, "decode_augment", sum(times) / len(times), times, memory, len(times))
        load["cpu_other_load"] = monitor.other_load()
    return [prepare, load]


def _data_record(
    common: dict[str, Any], stage: str, per_image: float, times: list[float], memory: MemoryProbe, count: int
) -> dict[str, Any]:
    return {
        **common,
        "stage": stage,
        "workers": 1,
        "images": count,
        "latency_ms": per_image * 1e3,
        "latency_ms_min": min(times) * 1e3,
        "images_per_s": 1.0 / per_image,
        "peak_mem_mb": None if memory.peak_bytes is None else memory.peak_bytes / MB,
        "peak_rss_mb": None if memory.peak_rss_bytes is None else memory.peak_rss_bytes / MB,
        "peak_mem_kind": memory.kind.replace(" + case state", ""),
    }


# ----------------------------------------------------------------------------- train-e2e


def bench_train_e2e(size: int, settings: Settings, context: dict[str, Any], workers: int | str) -> list[dict[str, Any]]:
    """The real loader + the engine's step, per case of :data:`E2E_PAIRS` (or ``--case``)."""
    side, batch = data_image_side(size), settings.batch
    num_train = max(16, 2 * batch)  # images repeat over epochs: decoding costs the same every time
    settings.say(f"train-e2e {size}: preparing {num_train} demo images of {side}x{side}")
    records = []
    with demo_folder(num_train, side) as (root, _):
        transform = TrainTransform(size, scale_range=(0.5, 1.5), flip=True, output="uint8")
        dataset = SegmentationFolder(root, "train", transform=transform)
        rate = measure_decode_rate(dataset, items=min(8, num_train))
        plan = resolve_workers(workers, settings.device, decode_rate=lambda: rate)
        for scales, merge in selected_pairs(settings, E2E_PAIRS, mode="train-e2e"):
            settings.say(f"train-e2e {size} {case_name(scales, merge)}: {plan.count} loader worker(s), "
                         f"{settings.warmup}+{settings.iters} steps of {batch}")
            record = _e2e_case(dataset, scales, merge, size, plan.count, settings)
            record.update({"mode": "train-e2e", "scales": list(scales), "merge": merge, "size": size, **context,
                           "image_side": side, "workers": plan.count, "workers_setting": workers,
                           "workers_reason": plan.reason, "decode_images_per_s": rate, "gflops": None,
                           "gflops_per_s": None, "peak_fraction": None})
            records.append(record)
    return records


def _e2e_case(
    dataset: Any, scales: tuple[float, ...], merge: str | None, size: int, workers: int, settings: Settings
) -> dict[str, Any]:
    dev, batch = settings.device, settings.batch
    steps = settings.warmup + settings.iters
    # the training engine's loader: seeded stream, one rank, batch = micro-batch, `workers` processes
    loader = make_train_loader(dataset, batch, batch, 0, 0, steps, 0, 1, workers, dev.type == "cuda")
    batches = DeviceBatches(loader, dev, dataset.transform.mean, dataset.transform.std)
    step, state_bytes = _engine_step(scales, merge, settings)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    monitor = LoadMonitor()
    for _ in range(settings.warmup):
        step(next(batches))
    synchronize(dev)
    batches.take_wait()
    start = time.perf_counter()
    for _ in range(settings.iters):
        step(next(batches))
    synchronize(dev)
    seconds = time.perf_counter() - start
    waited = batches.take_wait()
    peak = torch.cuda.max_memory_allocated(dev) / MB if dev.type == "cuda" else None
    del loader, batches
    return {
        "latency_ms": seconds / (settings.iters * batch) * 1e3,
        "images_per_s": settings.iters * batch / seconds,
        "data_wait": min(1.0, waited / seconds),
        "seconds": seconds,
        "peak_mem_mb": peak,
        "state_mb": state_bytes / MB,
        "peak_mem_kind": "cuda max_memory_allocated over the run" if peak is not None else "not measured on CPU",
        "cpu_other_load": monitor.other_load(),
    }


def _engine_step(
    scales: tuple[float, ...], merge: str | None, settings: Settings
) -> tuple[Callable[[dict[str, Any]], None], int]:
    """(step(batch) = the training engine's train_step on one micro-batch, bytes of weights + momentum)."""
    torch.manual_seed(0)
    dev = settings.device
    model, _ = case_model(scales, merge, "train-e2e", settings.model_kwargs())
    model = model.to(device=dev, memory_format=settings.memory_format).train()
    optimizer = make_optimizer(param_groups(model, lr=1e-3, weight_decay=5e-4), "sgd", 1e-3, 0.9, dev)
    run = functools.partial(
        train_step, model, optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=False),
        guard=NonFiniteGuard(dev), device=dev, amp_dtype=torch.bfloat16 if settings.amp else None,
        channels_last=settings.channels_last, loss_fn=segmentation_loss, loss_options={"ignore_index": 255},
        scales=scales, info=DistInfo(device=dev),
    )
    state = sum(p.numel() * p.element_size() for p in model.parameters()) * 2  # weights + momentum
    return lambda batch: run([batch]), state
