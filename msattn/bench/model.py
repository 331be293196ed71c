"""The ``inference`` and ``train`` modes of ``msattn bench``: every case on one shared backbone, timed interleaved.

- ``inference``: one forward under ``torch.inference_mode()``; time per image. On CUDA each
  case's forward is replayed as a captured CUDA graph (``--no-graph``: eager); the capture, a
  one-time cost, is in the records as ``capture_s``.
- ``train``: the training engine's step (forward + loss + backward + SGD step with momentum and
  DeepLab parameter groups, fused on CUDA) on a ``size`` x ``size`` crop; images/s.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from msattn.bench.cases import (
    IGNORE_INDEX,
    NUM_CLASSES,
    Case,
    Settings,
    area_ratio,
    case_model,
    case_name,
    selected_pairs,
)
from msattn.bench.measure import LoadMonitor, matmul_case, probe_case, run_interleaved, synchronize
from msattn.infer.graphs import capture_cuda_graph
from msattn.models.loss import segmentation_loss
from msattn.models.params import param_groups
from msattn.runtime.distributed import DistInfo
from msattn.train.step import NonFiniteGuard, make_optimizer, train_step


def build_cases(mode: str, size: int, settings: Settings) -> list[Case]:
    """Models for every (scales, merge) pair sharing ONE backbone, with inputs and a step each."""
    torch.manual_seed(0)
    dev, n = settings.device, settings.batch
    images = torch.randn(n, 3, size, size, device=dev).contiguous(memory_format=settings.memory_format)
    labels = torch.randint(0, NUM_CLASSES, (n, size, size), device=dev)
    labels[:, : max(1, size // 16)] = IGNORE_INDEX  # a band of ignored pixels, as in padded crops
    backbone: nn.Module | None = None
    cases = []
    pairs = selected_pairs(settings, mode=mode)
    for number, (scales, merge) in enumerate(pairs, 1):
        settings.say(f"{mode} {size}: building case {number}/{len(pairs)} ({case_name(scales, merge)})")
        model, run_scales = case_model(scales, merge, mode, settings.model_kwargs())
        if backbone is None:
            backbone = model.backbone
        else:
            model.backbone = backbone  # same weights for every case, and memory for one copy only
        model = model.to(device=dev, memory_format=settings.memory_format)
        if mode == "inference":
            model.eval()
            optimizer = None
            make_step = functools.partial(_inference_step, images=images, settings=settings, scales=run_scales)
        else:
            model.train()
            optimizer = make_optimizer(param_groups(model, lr=1e-3, weight_decay=5e-4), "sgd", 1e-3, 0.9, dev)
            make_step = functools.partial(_train_step, optimizer=optimizer, images=images, labels=labels,
                                          settings=settings)
        eager_step = make_step(model)
        compiled = torch.compile(model) if settings.compile_model else model
        step = make_step(compiled) if settings.compile_model else eager_step
        case = Case(scales, merge, step, eager_step, _state_bytes(model, optimizer),
                    params=sum(p.numel() for p in model.parameters()))  # fmt: skip
        case.trained_scales = tuple(model.scales) if run_scales is not None else None
        if mode == "inference" and settings.graph:  # the (compiled) forward, captured: compiles during the capture
            _capture_case(case, compiled, images, settings, run_scales)
        cases.append(case)
    return cases


def _inference_step(
    model: nn.Module, images: torch.Tensor, settings: Settings, scales: tuple[float, ...] | None = None
) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), settings.autocast():
            model(images, scales=scales)

    return step


def _capture_case(
    case: Case, model: Callable[..., Any], images: torch.Tensor, settings: Settings, scales: tuple[float, ...] | None
) -> None:
    """Make ``case.step`` a CUDA graph replay of the forward (copy the input in, replay); time the capture."""
    def forward(x: torch.Tensor) -> Any:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if settings.amp \
            else contextlib.nullcontext()
        with autocast:
            return model(x, scales=scales)

    start = time.perf_counter()
    with torch.inference_mode():
        replay = capture_cuda_graph(forward, images)
    synchronize(settings.device)
    case.capture_s = time.perf_counter() - start

    def step() -> None:
        with torch.inference_mode():
            replay(images)

    case.step = step


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, settings: Settings
) -> Callable[[], None]:
    """The training engine's own step (one micro-batch; on CUDA fused SGD and no host-device sync)."""
    step = functools.partial(
        train_step,
        model,
        [{"image": images, "label": labels}],
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        guard=NonFiniteGuard(settings.device),
        device=settings.device,
        amp_dtype=torch.bfloat16 if settings.amp else None,
        channels_last=settings.channels_last,
        loss_fn=segmentation_loss,
        loss_options={"ignore_index": IGNORE_INDEX},
        scales=tuple(getattr(model, "scales", (1.0,))),
        info=DistInfo(device=settings.device),
    )

    def run() -> None:
        step()

    return run


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Callable[[], int]:
    def count() -> int:
        tensors = list(model.parameters()) + list(model.buffers())
        if optimizer is not None:
            tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    return count


def bench_model(mode: str, size: int, settings: Settings, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Time every (scales, merge) case of ``mode`` at ``size`` interleaved; one record per case."""
    cases = build_cases(mode, size, settings)
    matmul_step, matmul_flops, matmul_name = matmul_case(settings)
    matmul = Case((), None, matmul_step, matmul_step, lambda: 0)
    monitor = LoadMonitor()
    run_interleaved([matmul, *cases], settings, label=f"{mode} {size}: {len(cases)} cases, ")
    other = monitor.other_load()
    peak = {
        "matmul": matmul_name,
        "matmul_gflops_s": matmul_flops / statistics.median(matmul.times) / 1e9,
        "matmul_gflops_s_best": matmul_flops / min(matmul.times) / 1e9,
    }
    probe_case(cases[0], settings)  # the first probe of a process pays one-time costs: throw it away
    records = []
    for number, case in enumerate(cases, 1):
        settings.say(f"{mode} {size}: memory and FLOPs, case {number}/{len(cases)} ({case_name(case.scales, case.merge)})")
        probe = probe_case(case, settings)
        median = statistics.median(case.times)
        per_image = median / settings.batch
        gflops = probe.pop("flops") / settings.batch / 1e9
        record = {
            "mode": mode,
            "scales": list(case.scales),
            "merge": case.merge,
            **({"trained_scales": list(case.trained_scales)} if case.trained_scales else {}),
            "size": size,
            **context,
            "latency_ms": per_image * 1e3,
            "latency_ms_min": min(case.times) / settings.batch * 1e3,
            "times_ms": [t / settings.batch * 1e3 for t in case.times],  # per image, one per timed round
            "images_per_s": 1.0 / per_image,
            "params": case.params,
            "gflops": gflops,
            "gflops_per_s": gflops / per_image,
            # per round: this case's GFLOP/s over the matmul's, both timed moments apart
            "peak_fraction": statistics.median(
                gflops * settings.batch / t / (matmul_flops / 1e9 / m) for t, m in zip(case.times, matmul.times)
            ),
            **peak,
            **probe,
            "cpu_other_load": other,
            "graph": case.capture_s is not None,
            "capture_s": case.capture_s,
        }
        records.append(record)
    del cases
    gc.collect()
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each multi-scale record's cost over the single-scale record of the same mode and size.

    With per-round times (``times_ms``) the ratio is the median over rounds of the ratio within
    a round, whose cases ran moments apart: load from other processes that comes and goes
    between rounds then cancels out. Otherwise it is the ratio of the medians.
    """
    timed = ("inference", "train")  # the interleaved modes; data and train-e2e have no FLOP ratios
    single = {(r["mode"], r["size"]): r for r in records if r["mode"] in timed and len(r["scales"]) == 1}
    for record in records:
        base = single.get((record["mode"], record["size"]))
        if record["mode"] not in timed or base is None:
            continue
        times, base_times = record.get("times_ms"), base.get("times_ms")
        if times and base_times and len(times) == len(base_times):
            record["latency_ratio"] = statistics.median(t / b for t, b in zip(times, base_times))
        else:
            record["latency_ratio"] = record["latency_ms"] / base["latency_ms"]
        if "latency_ms_min" in record and "latency_ms_min" in base:  # best round over best round
            record["latency_ratio_min"] = record["latency_ms_min"] / base["latency_ms_min"]
        record["flop_ratio"] = record["gflops"] / base["gflops"] if base["gflops"] else None
        record["area_ratio"] = area_ratio(record["scales"])
