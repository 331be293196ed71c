"""Measuring for ``msattn bench``: peak memory of one call (CUDA or CPU RSS) and the load of other processes."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


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
            _synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            _synchronize(self.device)
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["LoadMonitor", "MemoryProbe"]
