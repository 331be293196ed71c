"""``msattn bench`` output: progress lines on stderr while it runs, then one table per mode and size.

Every table fits 100 columns (a log file or a narrow terminal): the inference and training
tables have 10 columns in 93 characters, the loader tables fewer; everything else (per-round
times, best-round ratios, GFLOP/s, memory kinds) is in the JSON records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from msattn.runtime.loader import TARGET_IMAGES_PER_S

#: the report's width when stdout is not a terminal (a log file, a pipe)
REPORT_WIDTH = 100


class ProgressLog:
    """``say(text)``: one line on stderr, at most one every ``every`` seconds unless ``force``."""

    def __init__(self, console: Any, every: float = 2.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.console, self.every, self.clock = console, every, clock
        self.last = -math.inf

    def __call__(self, text: str, force: bool = True) -> None:
        now = self.clock()
        if force or now - self.last >= self.every:
            self.console.print(f"bench: {text}", markup=False, highlight=False)
            self.last = now


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _scales(r: dict[str, Any]) -> str:
    return ", ".join(f"{s:g}" for s in r["scales"]) or r.get("stage", "")


def _flags(context: dict[str, Any]) -> str:
    flags = [f"batch {context['batch']}", "bf16 autocast" if context["amp"] else "fp32"]
    flags += ["channels_last" if context["channels_last"] else "contiguous"]
    flags += ["torch.compile"] * bool(context["compile"])
    backbone = [str(context.get("backbone") or "vgg16_largefov")]
    return ", ".join(backbone + flags + [f"width {context['width']:g}", f"{context['threads']} threads"])


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...] = ("scales", "merge", "stage")) -> Any:
    """A borderless table whose columns share one space of padding (10 columns fit in 93 characters)."""
    table = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)
    return table


def _model_table(mode: str, size: int, rows: list[dict[str, Any]], context: dict[str, Any]) -> Any:
    first = ("ms/img", "img/s") if mode == "inference" else ("img/s", "ms/img")
    columns = ("scales", "merge", *first, "GFLOP/img", "of peak", "mem MB", "time x1", "FLOPs x1", "gap")
    graphs = " (CUDA graphs)" if any(r.get("graph") for r in rows) else ""
    table = _table(f"{mode} {size}x{size}{graphs}", columns)
    for r in rows:
        ratio, arith = r.get("latency_ratio"), r.get("flop_ratio")
        multi = len(r["scales"]) > 1
        speed = {"ms/img": fmt(r["latency_ms"], ".1f" if r["latency_ms"] >= 10 else ".2f"),
                 "img/s": fmt(r["images_per_s"], ".1f")}
        table.add_row(
            _scales(r), r["merge"] or "-", speed[first[0]], speed[first[1]], fmt(r["gflops"], ".1f"),
            fmt(r.get("peak_fraction"), ".0%"), fmt(r["peak_mem_mb"], ".0f"), fmt(ratio if multi else None, ".3f"),
            fmt(arith if multi else None, ".3f"), fmt(ratio / arith - 1 if multi and ratio and arith else None, "+.1%"),
        )
    return table


def _e2e_table(size: int, rows: list[dict[str, Any]], context: dict[str, Any]) -> Any:
    columns = ("scales", "merge", "workers", "img/s", "data wait", "decode img/s", "mem MB")
    table = _table(f"train-e2e {size}x{size} (the real loader + step)", columns)
    for r in rows:
        table.add_row(_scales(r), r["merge"] or "-", str(r["workers"]), fmt(r["images_per_s"], ".1f"),
                      fmt(r["data_wait"], ".0%"), fmt(r.get("decode_images_per_s"), ".0f"), fmt(r["peak_mem_mb"], ".0f"))
    return table


def _data_table(size: int, rows: list[dict[str, Any]]) -> Any:
    table = _table(f"data {size}x{size} crops (one process)", ("stage", "img/s", "ms/img", "mem MB"))
    for r in rows:
        table.add_row(r["stage"], fmt(r["images_per_s"], ".1f"), fmt(r["latency_ms"], ".2f"), fmt(r["peak_mem_mb"], ".0f"))
    return table


def print_report(records: list[dict[str, Any]], context: dict[str, Any], console: Any) -> None:
    """One table per (mode, size), then the matmul reference, the loader advice and the notes."""
    print = _printer(console)
    print(f"msattn bench on {context['device_name']} ({context['device']}), torch {context['torch']}: {_flags(context)}")
    keys = list(dict.fromkeys((r["mode"], r["size"]) for r in records))
    for mode, size in keys:
        rows = [r for r in records if (r["mode"], r["size"]) == (mode, size)]
        if mode in ("inference", "train"):
            console.print(_model_table(mode, size, rows, context))
        elif mode == "train-e2e":
            console.print(_e2e_table(size, rows, context))
        else:
            console.print(_data_table(size, rows))
    if any(r["mode"] in ("inference", "train") for r in records):
        print("time x1: median over rounds of the time over the single-scale time of the same round; FLOPs x1: "
              "the FLOP ratio; gap: time x1 / FLOPs x1 - 1; of peak: GFLOP/s over a large matmul's in the same "
              "round")
    for r in records:
        if r["mode"] in ("inference", "train") and len(r["scales"]) == 1:
            print(f"{r['mode']} {r['size']}: {r['matmul']} timed in the same rounds: {r['matmul_gflops_s']:.1f} GFLOP/s "
                  f"(best {r['matmul_gflops_s_best']:.1f}); one scale reaches {r['peak_fraction']:.0%} of it")
        if r.get("capture_s") is not None and len(r["scales"]) == 1:
            print(f"{r['mode']} {r['size']}: CUDA graph capture (first call, once) took {r['capture_s']:.2f} s per case")
        if r.get("stage") == "decode_augment":
            need = math.ceil(TARGET_IMAGES_PER_S / r["images_per_s"])
            print(f"data {r['size']}: one worker decodes + augments {r['images_per_s']:.1f} img/s ({r['image_side']}px "
                  f"demo images, {r['size']}px crops): {need} worker(s) feed {TARGET_IMAGES_PER_S:.0f} img/s")
    for size in dict.fromkeys(r["size"] for r in records if r["mode"] == "train-e2e"):
        reason = next(r["workers_reason"] for r in records if r["mode"] == "train-e2e" and r["size"] == size)
        print(f"train-e2e {size}: {reason}")
    loads = [r["cpu_other_load"] for r in records if r.get("cpu_other_load") is not None]
    if loads and max(loads) > 0.05:
        print(f"note: other processes used up to {max(loads):.0%} of this machine's CPU while timing; absolute "
              "figures are pessimistic (cases are timed interleaved, so the ratios suffer less)")


def _printer(console: Any) -> Callable[[str], None]:
    """Plain text lines (no markup), wrapped at the console's width."""
    return lambda text: console.print(text, markup=False, highlight=False)
