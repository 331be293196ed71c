"""``msattn bench``: latency, throughput, memory and FLOPs across scale sets and merges.

For each input size and mode the cases below are built on one shared backbone and timed
**interleaved** (round r runs every case once), so that whatever else the machine is doing
weighs on all cases alike and the multi-scale / single-scale ratios stay meaningful.

- ``inference``: one forward under ``torch.inference_mode()``; time per image.
- ``train``: the training engine's step (forward + loss + backward + SGD step with momentum and
  DeepLab parameter groups, fused on CUDA) on a ``size`` x ``size`` crop; images/s.
- ``data`` and ``train-e2e`` (the real loader + step): :mod:`msattn.engine.bench_data`.

On CUDA, ``inference`` replays each case's forward as a captured CUDA graph (``--no-graph``:
eager; with ``--compile`` the inductor-compiled forward is captured); the capture, a
one-time cost, is in the records as ``capture_s``. Progress goes to stderr as it runs; the
tables (:mod:`msattn.engine.bench_report`) fit 100 columns. The options are checked, the device
resolved and the run described by :mod:`msattn.engine.bench_setup`; timing, memory and FLOPs are
measured by :mod:`msattn.engine.bench_measure`.

Reported per case: median latency per image over ``iters`` timed rounds after ``warmup``
rounds, FLOPs per image (``torch.utils.flop_counter``, convolutions and matmuls), achieved
GFLOP/s and its fraction of a large matmul measured in the same run, and peak memory from one
extra untimed call: on CUDA ``max_memory_allocated`` during the call over what was allocated
before it; on CPU the peak RSS growth during the call (``VmHWM``, reset per call through
``/proc/self/clear_refs``, after ``malloc_trim``); both plus the case's own resident state
(weights, and optimizer momentum in training), i.e. what one model alone needs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msattn.engine.bench_measure import (  # timing, memory, FLOPs (re-exported: see __all__)
    MB,
    LoadMonitor,
    MemoryProbe,
    count_flops,
    matmul_case,
    probe_case,
    run_interleaved,
    synchronize,
    timed,
)
from msattn.engine.bench_setup import (  # options, device, context (re-exported: see __all__)
    MODES,
    check_json,
    check_options,
    device_name,
    resolve_device,
    run_context,
    workers_option,
)
from msattn.errors import UsageError
from msattn.models import build_model, param_groups, segmentation_loss
from msattn.models.spec import MERGES

__all__ = [
    "IGNORE_INDEX", "MB", "MODES", "NUM_CLASSES", "SCALE_SETS", "Case", "LoadMonitor", "MemoryProbe", "Settings",
    "add_ratios", "area_ratio", "bench_model", "build_cases", "case_name", "count_flops", "device_name", "matmul_case",
    "parse_case", "probe_case", "resolve_device", "run_bench", "run_interleaved", "scale_merge_pairs",
    "selected_pairs", "synchronize", "timed",
]  # fmt: skip

SCALE_SETS: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, 0.5), (1.0, 0.75, 0.5))
NUM_CLASSES = 21  # PASCAL VOC: the paper's network has 20,505,429 parameters with 21 classes
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One scale set + merge of one mode, with its timed step and the times measured."""

    scales: tuple[float, ...]
    merge: str | None  # None with one scale: nothing to merge
    step: Callable[[], None]  # one timed call (forward, or a full training step)
    eager_step: Callable[[], None]  # the same on the uncompiled model (FLOPs are counted on it)
    state_bytes: Callable[[], int]  # resident state of this case: weights (+ optimizer momentum)
    times: list[float] = field(default_factory=list)
    capture_s: float | None = None  # CUDA graph capture (and compile) time, once


def scale_merge_pairs() -> list[tuple[tuple[float, ...], str | None]]:
    """The benchmarked (scales, merge) pairs: one for a single scale, every merge for the others."""
    pairs: list[tuple[tuple[float, ...], str | None]] = []
    for scales in SCALE_SETS:
        pairs += [(scales, None)] if len(scales) == 1 else [(scales, merge) for merge in MERGES]
    return pairs


def area_ratio(scales: Sequence[float]) -> float:
    """Pure pixel-area cost of a scale set relative to scale 1: sum of s^2."""
    return sum(s * s for s in scales)


@dataclass(frozen=True)
class Settings:
    """What every case of a run shares (the CLI options)."""

    device: torch.device
    batch: int
    amp: bool
    compile_model: bool
    channels_last: bool
    width: float
    iters: int
    warmup: int
    graph: bool = False  # inference as captured CUDA graphs
    cases: tuple[tuple[tuple[float, ...], str | None], ...] | None = None  # --case filter; None: all
    say: Callable[..., None] = field(default=lambda text, force=True: None, compare=False)  # progress on stderr

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when --amp (CUDA only; refused on CPU before we get here)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def parse_case(text: str) -> tuple[tuple[float, ...], str | None]:
    """``--case`` text -> (scales, merge): ``1``, ``1,0.5:max``, ``1,0.75,0.5:attention``."""
    scales_text, _, merge = text.partition(":")
    try:
        scales = tuple(float(v) for v in scales_text.split(","))
    except ValueError:
        raise UsageError(f"--case {text}: expected scales[:merge], e.g. 1 or 1,0.75,0.5:attention") from None
    if len(scales) == 1:
        return scales, None
    if merge not in MERGES:
        raise UsageError(f"--case {text}: name the merge of a multi-scale case ({', '.join(MERGES)})")
    return scales, merge


def selected_pairs(
    settings: Settings, pairs: Sequence[tuple[tuple[float, ...], str | None]] | None = None
) -> list[tuple[tuple[float, ...], str | None]]:
    """The (scales, merge) pairs to run: ``pairs`` (default: every pair of SCALE_SETS) filtered by ``--case``."""
    pairs = list(pairs if pairs is not None else scale_merge_pairs())
    if settings.cases is None:
        return pairs
    return [p for p in pairs if p in settings.cases] or list(settings.cases)


def build_cases(mode: str, size: int, settings: Settings) -> list[Case]:
    """Models for every (scales, merge) pair sharing ONE backbone, with inputs and a step each."""
    from msattn.engine.train import make_optimizer

    torch.manual_seed(0)
    dev, n = settings.device, settings.batch
    images = torch.randn(n, 3, size, size, device=dev).contiguous(memory_format=settings.memory_format)
    labels = torch.randint(0, NUM_CLASSES, (n, size, size), device=dev)
    labels[:, : max(1, size // 16)] = IGNORE_INDEX  # a band of ignored pixels, as in padded crops
    backbone: nn.Module | None = None
    cases = []
    pairs = selected_pairs(settings)
    for number, (scales, merge) in enumerate(pairs, 1):
        settings.say(f"{mode} {size}: building case {number}/{len(pairs)} ({case_name(scales, merge)})")
        model = build_model(NUM_CLASSES, scales=scales, merge=merge or "avg", width=settings.width)
        if backbone is None:
            backbone = model.backbone
        else:
            model.backbone = backbone  # same weights for every case, and memory for one copy only
        model = model.to(device=dev, memory_format=settings.memory_format)
        if mode == "inference":
            model.eval()
            optimizer = None
            make_step = functools.partial(_inference_step, images=images, settings=settings)
        else:
            model.train()
            optimizer = make_optimizer(param_groups(model, lr=1e-3, weight_decay=5e-4), "sgd", 1e-3, 0.9, dev)
            make_step = functools.partial(_train_step, optimizer=optimizer, images=images, labels=labels,
                                          settings=settings)
        eager_step = make_step(model)
        compiled = torch.compile(model) if settings.compile_model else model
        step = make_step(compiled) if settings.compile_model else eager_step
        case = Case(scales, merge, step, eager_step, _state_bytes(model, optimizer))
        if mode == "inference" and settings.graph:  # the (compiled) forward, captured: compiles during the capture
            _capture_case(case, compiled, images, settings)
        cases.append(case)
    return cases


def case_name(scales: Sequence[float], merge: str | None) -> str:
    return "{" + ", ".join(f"{s:g}" for s in scales) + "}" + (f" {merge}" if merge else "")


def _inference_step(model: nn.Module, images: torch.Tensor, settings: Settings) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), settings.autocast():
            model(images)

    return step


def _capture_case(case: Case, model: Callable[..., Any], images: torch.Tensor, settings: Settings) -> None:
    """Make ``case.step`` a CUDA graph replay of the forward (copy the input in, replay); time the capture."""
    from msattn.engine.graphs import capture_cuda_graph

    def forward(x: torch.Tensor) -> Any:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if settings.amp \
            else contextlib.nullcontext()
        with autocast:
            return model(x)

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
    from msattn.engine.distributed import DistInfo
    from msattn.engine.train import NonFiniteGuard, train_step

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


# ----------------------------------------------------------------------------- modes


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
            "size": size,
            **context,
            "latency_ms": per_image * 1e3,
            "latency_ms_min": min(case.times) / settings.batch * 1e3,
            "times_ms": [t / settings.batch * 1e3 for t in case.times],  # per image, one per timed round
            "images_per_s": 1.0 / per_image,
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


# ----------------------------------------------------------------------------- entry point


def run_bench(
    *,
    device: str = "cpu",
    sizes: Sequence[int] = (321,),
    batch: int = 1,
    amp: bool = False,
    compile_model: bool = False,
    channels_last: bool = False,
    width: float = 1.0,
    iters: int = 5,
    warmup: int = 2,
    modes: Sequence[str] = ("inference", "train"),
    json_path: Path | None = None,
    graph: bool | None = None,
    cases: Sequence[str] | None = None,
    workers: str = "auto",
    image: str = "3000x4000",
    tile: int = 1025,
) -> list[dict[str, Any]]:
    """Run the benchmark, print progress (stderr), the tables and the ratios, optionally write JSON.

    ``graph`` (None: on for CUDA) replays inference as CUDA graphs; ``cases`` (``--case``) picks
    (scales, merge) pairs; ``workers`` (an integer or ``auto``) is train-e2e's loader. ``image``
    (HxW) and ``tile`` are the large image and tile side of the ``tiled`` mode
    (:mod:`msattn.engine.bench_deploy`).
    """
    from rich.console import Console

    from msattn.engine.bench_report import REPORT_WIDTH

    console, errors = Console(highlight=False), Console(stderr=True, highlight=False)
    if not console.is_terminal:  # a log file or pipe: the tables are made for 100 columns
        console = Console(width=REPORT_WIDTH, highlight=False)
    check_options(modes, sizes, width, batch, iters, warmup)
    if json_path is not None:
        check_json(Path(json_path))  # a folder or an unwritable place fails now, not after minutes of timing
    settings, workers_value = _settings(errors, device, batch, amp, compile_model, channels_last, width, iters, warmup,
                                        graph, cases, workers)  # fmt: skip
    context = run_context(settings.device, settings)
    records = _run_modes(settings, context, sizes, modes, workers_value, image, tile)
    _report(records, context, console, json_path)
    return records


def _settings(
    errors: Any, device: str, batch: int, amp: bool, compile_model: bool, channels_last: bool, width: float,
    iters: int, warmup: int, graph: bool | None, cases: Sequence[str] | None, workers: str,
) -> tuple[Settings, int | str]:
    """The run's :class:`Settings` (device resolved, --amp and --graph dropped on CPU with a warning on
    ``errors``) and train-e2e's loader workers (an integer or ``auto``)."""
    from msattn.engine.bench_report import ProgressLog

    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        errors.print("msattn: warning: --amp ignored on CPU (bf16 is ~100x slower there); measuring fp32")
        amp = False
    if graph and dev.type != "cuda":
        errors.print("msattn: warning: --graph ignored on CPU (CUDA graphs need a CUDA device)")
    graph = dev.type == "cuda" and graph is not False
    workers_value = workers_option(workers)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    selected = tuple(parse_case(c) for c in cases) if cases else None
    settings = Settings(dev, batch, amp, compile_model, channels_last, width, iters, warmup, graph, selected,
                        ProgressLog(errors))
    return settings, workers_value


def _run_modes(
    settings: Settings, context: dict[str, Any], sizes: Sequence[int], modes: Sequence[str], workers: int | str,
    image: str, tile: int,
) -> list[dict[str, Any]]:
    """Every mode at every size (``tiled``: once, on one large image); the records in run order."""
    from msattn.engine import bench_deploy
    from msattn.engine.bench_data import bench_data, bench_train_e2e

    records: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")
        for size in sizes:
            for mode in dict.fromkeys(modes):
                if mode == "tiled":
                    continue  # one large image, not per --size: below
                settings.say(f"{mode} at {size}x{size} on {context['device_name']}")
                if mode == "data":
                    records += bench_data(size, settings, context)
                elif mode == "train-e2e":
                    records += bench_train_e2e(size, settings, context, workers)
                elif mode == "onnx":
                    records += bench_deploy.bench_onnx(size, settings, context)
                else:
                    graph = settings.graph and mode == "inference"
                    records += bench_model(mode, size, settings, {**context, "graph": graph})
        if "tiled" in modes:
            settings.say(f"tiled on a {image} image on {context['device_name']}")
            records += bench_deploy.bench_tiled(settings, context, image, tile)
    return records


def _report(records: list[dict[str, Any]], context: dict[str, Any], console: Any, json_path: Path | None) -> None:
    """The ratios added to the records, the tables printed, the records written to ``json_path``."""
    from msattn.engine import bench_deploy
    from msattn.engine.bench_report import print_report

    add_ratios(records)
    model_records = [r for r in records if r["mode"] not in bench_deploy.DEPLOY_MODES]
    if model_records:
        print_report(model_records, context, console)
    bench_deploy.print_deploy_report(records, console)
    if json_path is not None:
        from msattn.io import write_json

        write_json(json_path, records)
        console.print(f"wrote {len(records)} records to {json_path}", markup=False)
