"""``msattn bench``: latency, throughput, memory and FLOPs across scale sets and merges.

For each input size and mode the cases below are built on one shared backbone and timed
**interleaved** (round r runs every case once), so that whatever else the machine is doing
weighs on all cases alike and the multi-scale / single-scale ratios stay meaningful.

- ``inference``: one forward under ``torch.inference_mode()``; time per image.
- ``train``: the training engine's step (forward + loss + backward + SGD step with momentum and
  DeepLab parameter groups, fused on CUDA) on a ``size`` x ``size`` crop; images/s.
- ``data``: ``prepare_demo`` into a temporary folder (images/s, one process) and decode +
  augment (``SegmentationFolder`` + ``TrainTransform``) in one process, i.e. per loader worker.

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
import io
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msattn.errors import UsageError
from msattn.models import build_model, param_groups, segmentation_loss
from msattn.models.scale import MERGES

MODES = ("inference", "train", "data", "tiled", "onnx")  # tiled, onnx: msattn.engine.bench_deploy
SCALE_SETS: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, 0.5), (1.0, 0.75, 0.5))
NUM_CLASSES = 21  # PASCAL VOC: the paper's network has 20,505,429 parameters with 21 classes
IGNORE_INDEX = 255
MB = 2**20


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

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when --amp (CUDA only; refused on CPU before we get here)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


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
    for scales, merge in scale_merge_pairs():
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
        step = make_step(torch.compile(model)) if settings.compile_model else eager_step
        cases.append(Case(scales, merge, step, eager_step, _state_bytes(model, optimizer)))
    return cases


def _inference_step(model: nn.Module, images: torch.Tensor, settings: Settings) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), settings.autocast():
            model(images)

    return step


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


# ----------------------------------------------------------------------------- timing, memory, FLOPs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def run_interleaved(cases: Sequence[Case], settings: Settings) -> None:
    """``warmup`` untimed rounds then ``iters`` timed rounds; each round runs every case once."""
    for round_ in range(settings.warmup + settings.iters):
        for case in cases:
            seconds = timed(case.step, settings.device)
            if round_ >= settings.warmup:
                case.times.append(seconds)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (convolutions, matmuls, ... as counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS before a call is not inflated."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class MemoryProbe:
    """Peak memory of one call over what was in use before it (see the module docstring)."""

    device: torch.device
    peak_bytes: int | None = None  # growth during the call
    peak_rss_bytes: int | None = None  # CPU: absolute peak RSS of the process during the call
    kind: str = ""

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - before
            self.kind = "cuda max_memory_allocated during the call - allocated before + case state"
            return
        gc.collect()
        _malloc_trim()
        before = _proc_status_kb("VmRSS")
        ok = before is not None and _reset_peak_rss()
        yield
        peak = _proc_status_kb("VmHWM") if ok else None
        if ok and peak is not None and before is not None:
            self.peak_bytes = max(0, peak - before) * 1024
            self.peak_rss_bytes = peak * 1024
            self.kind = "cpu peak RSS (VmHWM) during the call - RSS before + case state"
        else:
            self.kind = "unavailable (needs Linux /proc/self/clear_refs)"


def probe_case(case: Case, settings: Settings) -> dict[str, Any]:
    """One extra untimed call for memory (and FLOPs, counted on the eager model)."""
    memory = MemoryProbe(settings.device)
    if settings.compile_model:  # FLOPs on the eager model, memory on the compiled one
        flops = count_flops(case.eager_step)
        with memory.measure():
            case.step()
    else:
        with memory.measure():
            flops = count_flops(case.step)
    state = case.state_bytes()
    return {
        "flops": flops,
        "peak_mem_mb": None if memory.peak_bytes is None else (memory.peak_bytes + state) / MB,
        "peak_rss_mb": None if memory.peak_rss_bytes is None else memory.peak_rss_bytes / MB,
        "state_mb": state / MB,
        "peak_mem_kind": memory.kind,
    }


def matmul_case(settings: Settings) -> tuple[Callable[[], None], int, str]:
    """A large square matmul in the dtype the convolutions run in: (step, FLOPs, description).

    It is timed in the same interleaved rounds as the cases, so the achieved fraction of its
    GFLOP/s compares like with like even on a busy machine.
    """
    dev = settings.device
    n = 8192 if dev.type == "cuda" else (2048 if settings.width >= 0.5 else 512)
    dtype = torch.bfloat16 if settings.amp else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    # fp32 convolutions use TF32 on CUDA by default (cudnn.allow_tf32): let the matmul do the same
    tf32 = dev.type == "cuda" and not settings.amp and torch.backends.cudnn.allow_tf32

    def step() -> None:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            torch.mm(a, b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    dtype_name = "bf16" if settings.amp else ("tf32" if tf32 else "fp32")
    return step, 2 * n**3, f"{n}x{n} {dtype_name} matmul"


class LoadMonitor:
    """CPU time used by OTHER processes while we time, as a fraction of the machine (Linux)."""

    def __init__(self) -> None:
        self.start = (self._busy(), time.process_time(), time.perf_counter())

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as handle:
                fields = handle.readline().split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def other_load(self) -> float | None:
        busy0, own0, wall0 = self.start
        busy1 = self._busy()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        own = time.process_time() - own0
        return max(0.0, (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------- modes


def bench_model(mode: str, size: int, settings: Settings, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Time every (scales, merge) case of ``mode`` at ``size`` interleaved; one record per case."""
    cases = build_cases(mode, size, settings)
    matmul_step, matmul_flops, matmul_name = matmul_case(settings)
    matmul = Case((), None, matmul_step, matmul_step, lambda: 0)
    monitor = LoadMonitor()
    run_interleaved([matmul, *cases], settings)
    other = monitor.other_load()
    peak = {
        "matmul": matmul_name,
        "matmul_gflops_s": matmul_flops / statistics.median(matmul.times) / 1e9,
        "matmul_gflops_s_best": matmul_flops / min(matmul.times) / 1e9,
    }
    probe_case(cases[0], settings)  # the first probe of a process pays one-time costs: throw it away
    records = []
    for case in cases:
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
        }
        records.append(record)
    del cases
    gc.collect()
    return records


def data_image_side(size: int) -> int:
    """Side of the demo images for the data bench: 1.5 x the crop (321 -> 481, about a VOC image)."""
    return max(16, size + size // 2)


def bench_data(size: int, settings: Settings, context: dict[str, Any]) -> list[dict[str, Any]]:
    """prepare_demo throughput and decode + augment throughput of one process (= one loader worker)."""
    from msattn.data import SegmentationFolder
    from msattn.data.prepare.demo import prepare_demo
    from msattn.data.transforms import TrainTransform

    side = data_image_side(size)
    num_train, num_val = 8 * settings.iters, 2
    common = {"mode": "data", "scales": [], "merge": None, "size": size, **context, "gflops": None}
    common.update({"image_side": side, "gflops_per_s": None, "peak_fraction": None})
    with tempfile.TemporaryDirectory(prefix="msattn-bench-") as tmp:
        root = Path(tmp) / "demo"
        memory, monitor = MemoryProbe(torch.device("cpu")), LoadMonitor()
        with memory.measure():
            quiet = io.StringIO()  # prepare_demo's own progress bar and summary table
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                start = time.perf_counter()
                prepare_demo(out=root, num_train=num_train, num_val=num_val, image_size=side, seed=0, workers=0)
                seconds = time.perf_counter() - start
        count = num_train + num_val
        prepare = _data_record(common, "prepare_demo", seconds / count, [seconds / count], memory, count)
        prepare["cpu_other_load"] = monitor.other_load()

        dataset = SegmentationFolder(root, "train", transform=TrainTransform(size, scale_range=(0.5, 1.5), flip=True))
        times: list[float] = []
        memory, monitor = MemoryProbe(torch.device("cpu")), LoadMonitor()
        with memory.measure():
            for round_ in range(settings.warmup + settings.iters):
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


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each multi-scale record's cost over the single-scale record of the same mode and size.

    With per-round times (``times_ms``) the ratio is the median over rounds of the ratio within
    a round, whose cases ran moments apart: load from other processes that comes and goes
    between rounds then cancels out. Otherwise it is the ratio of the medians.
    """
    model_modes = ("inference", "train")
    single = {(r["mode"], r["size"]): r for r in records if r["mode"] in model_modes and len(r["scales"]) == 1}
    for record in records:
        base = single.get((record["mode"], record["size"]))
        if record["mode"] not in model_modes or base is None:
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


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a clear error when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name}: not a device (use cpu, cuda or cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: bench runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available to this PyTorch ({torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
    image: str = "3000x4000",
    tile: int = 1025,
) -> list[dict[str, Any]]:
    """Run the benchmark, print a table and the ratios, optionally write the records as JSON.

    ``image`` (HxW) and ``tile`` are the large image and tile side of the ``tiled`` mode
    (:mod:`msattn.engine.bench_deploy`).
    """
    from rich.console import Console

    console, errors = Console(), Console(stderr=True)
    if not console.is_terminal:  # a log file or pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UsageError(f"--mode {unknown[0]}: unknown mode (choose from {', '.join(MODES)})")
    if any(s < 8 for s in sizes):
        raise UsageError(f"--size {min(sizes)}: the input side must be at least 8 pixels")
    if not 0 < width <= 4 or batch < 1 or iters < 1 or warmup < 0:
        raise UsageError("need 0 < --width <= 4, --batch >= 1, --iters >= 1, --warmup >= 0")
    from msattn.engine import bench_deploy

    dev = resolve_device(device)
    if amp and dev.type != "cuda":
        errors.print("msattn: warning: --amp ignored on CPU (bf16 is ~100x slower there); measuring fp32")
        amp = False
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = Settings(dev, batch, amp, compile_model, channels_last, width, iters, warmup)
    modes = list(dict.fromkeys(modes))
    context: dict[str, Any] = {
        "device": dev.type,
        "device_name": device_name(dev),
        "batch": batch,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile_model,
        "width": width,
        "iters": iters,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    records: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")
        for size in sizes:
            for mode in modes:
                if mode == "tiled":
                    continue  # one large image, not per --size: below
                with errors.status(f"bench {mode} at {size}x{size} on {context['device_name']}"):
                    if mode == "data":
                        records += bench_data(size, settings, context)
                    elif mode == "onnx":
                        records += bench_deploy.bench_onnx(size, settings, context)
                    else:
                        records += bench_model(mode, size, settings, context)
        if "tiled" in modes:
            with errors.status(f"bench tiled on a {image} image on {context['device_name']}"):
                records += bench_deploy.bench_tiled(settings, context, image, tile)
    add_ratios(records)
    model_records = [r for r in records if r["mode"] not in bench_deploy.DEPLOY_MODES]
    if model_records:
        print_report(model_records, context, console)
    bench_deploy.print_deploy_report(records, console)
    if json_path is not None:
        from msattn.io import write_json

        write_json(json_path, records)
        console.print(f"wrote {len(records)} records to {json_path}")
    return records


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_report(records: list[dict[str, Any]], context: dict[str, Any], console: Any) -> None:
    """Rich table of every record with the ratios to one scale, then the matmul peak and notes."""
    from rich.table import Table

    flags = [f"batch {context['batch']}", "bf16 autocast" if context["amp"] else "fp32"]
    flags += ["channels_last" if context["channels_last"] else "contiguous"]
    flags += ["torch.compile"] * context["compile"] + [f"width {context['width']:g}", f"{context['threads']} threads"]
    caption = (
        "time x1: median over rounds of the time over the single-scale time in the same round; "
        "best x1: fastest round over fastest round; "
        "arith x1: FLOP ratio; gap: time x1 / arith x1 - 1; pure area ratio: {1, 0.5} 1.25, {1, 0.75, 0.5} 1.8125; "
        "of peak: GFLOP/s over the matmul's in the same round (median)"
    )
    title = f"msattn bench: {context['device_name']} ({context['device']}), {', '.join(flags)}"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ("mode", "size", "scales", "merge", "ms/img", "img/s", "GFLOP/img", "GFLOP/s", "of peak", "mem MB",
               "time x1", "best x1", "arith x1", "gap")
    for name in columns:
        table.add_column(name, justify="left" if name in ("mode", "scales", "merge") else "right")
    for r in records:
        ratio, arith = r.get("latency_ratio"), r.get("flop_ratio")
        multi = len(r["scales"]) > 1
        table.add_row(
            r["mode"], str(r["size"]), ", ".join(f"{s:g}" for s in r["scales"]) or r.get("stage", ""),
            r["merge"] or "-", _fmt(r["latency_ms"], ".1f"), _fmt(r["images_per_s"], ".2f"),
            _fmt(r["gflops"], ".1f"), _fmt(r["gflops_per_s"], ".1f"), _fmt(r.get("peak_fraction"), ".0%"),
            _fmt(r["peak_mem_mb"], ".0f"), _fmt(ratio if multi else None, ".3f"),
            _fmt(r.get("latency_ratio_min") if multi else None, ".3f"), _fmt(arith if multi else None, ".3f"),
            _fmt(ratio / arith - 1 if multi and ratio and arith else None, "+.1%"),
        )
    console.print(table)
    for r in records:
        if r["mode"] != "data" and len(r["scales"]) == 1:
            console.print(
                f"{r['mode']} {r['size']}: {r['matmul']} timed in the same rounds: {r['matmul_gflops_s']:.1f} GFLOP/s "
                f"(best {r['matmul_gflops_s_best']:.1f}); one scale reaches {r['peak_fraction']:.0%} of it"
            )
    loads = [r["cpu_other_load"] for r in records if r.get("cpu_other_load") is not None]
    if loads and max(loads) > 0.05:
        console.print(
            f"note: other processes used up to {max(loads):.0%} of this machine's CPU while timing; "
            "absolute figures are pessimistic (cases are timed interleaved, so the ratios suffer less)"
        )
    for r in records:
        if r.get("stage") == "decode_augment":
            console.print(
                f"data {r['size']}: one worker decodes + augments {r['images_per_s']:.1f} img/s "
                f"({r['image_side']}px demo images, {r['size']}px crops): "
                f"{math.ceil(150 / r['images_per_s'])} worker(s) feed 150 img/s"
            )
