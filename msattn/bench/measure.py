"""Measuring for ``msattn bench``: peak memory of one call (CUDA or CPU RSS), the load of other processes,
timing (interleaved rounds), FLOPs, and the large matmul the cases' GFLOP/s are compared with."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from msattn.bench.cases import Case, Settings

MB = 2**20


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


def run_interleaved(cases: Sequence[Case], settings: Settings, label: str = "") -> None:
    """``warmup`` untimed rounds then ``iters`` timed rounds; each round runs every case once."""
    rounds = settings.warmup + settings.iters
    for round_ in range(rounds):
        kind = "warm-up" if round_ < settings.warmup else "timed"
        settings.say(f"{label}round {round_ + 1}/{rounds} ({kind})", force=round_ in (0, rounds - 1))
        for case in cases:
            seconds = timed(case.step, settings.device)
            if round_ >= settings.warmup:
                case.times.append(seconds)


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (convolutions, matmuls, ... as counted by FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def probe_case(case: Case, settings: Settings) -> dict[str, Any]:
    """One extra untimed call for memory (and FLOPs, counted on the eager model).

    A CUDA graph allocates nothing when replayed (its pool is reserved at capture): its memory
    is measured on the eager forward, which needs about what the graph's pool holds.
    """
    memory = MemoryProbe(settings.device)
    if case.capture_s is not None:
        flops = count_flops(case.eager_step)
        with memory.measure():
            case.eager_step()
    elif settings.compile_model:  # FLOPs on the eager model, memory on the compiled one
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
