"""``msattn bench --mode tiled`` and ``--mode onnx``: huge images and the exported model.

- ``tiled``: one ``--image`` (default 3000x4000, i.e. 4000 wide) through the predict pipeline
  of :mod:`msattn.tiling` (3-scale attention, 21 classes, ``--backbone``, ``--width``):
  whole-image prediction when the estimate fits the memory budget of the device, and tiles of
  ``--tile`` pixels (quarter overlap). Time per image, peak memory
  (:class:`msattn.bench.run.MemoryProbe`: RSS growth on CPU, allocator peak on CUDA, plus the
  weights), tiles, the estimate, and the labels' agreement between the two.
- ``onnx``: PyTorch vs onnxruntime (CPU, the same number of threads) on the demo model (the
  demo recipe's: width 1/8, scales 2 and 1, 5 classes, 96x96 images) and the full-size model
  (``--backbone``, ``--width``, scales 1, 0.75, 0.5, attention, 21 classes, ``--size``
  images), each exported with ``msattn export``'s graph and timed interleaved with its
  PyTorch twin; the ratio is the median over rounds of onnxruntime's time over PyTorch's in
  the same round.
"""

from __future__ import annotations

import contextlib
import gc
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from msattn.bench.measure import MB, LoadMonitor, MemoryProbe, synchronize
from msattn.errors import UsageError
from msattn.export.format import require
from msattn.export.onnx import export_checkpoint
from msattn.export.runtime import OnnxBackend
from msattn.infer.backends import TorchBackend, memory_model
from msattn.infer.options import InferenceOptions
from msattn.models.scale import build_model
from msattn.models.spec import DEFAULT_BACKBONE
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint
from msattn.sizes import format_bytes
from msattn.tiling.images import predict_image_tiled
from msattn.tiling.layout import count_tiles, scale_quantum
from msattn.tiling.run import Planner, TilingOptions
from msattn.tiling.stitch import Scratch

DEPLOY_MODES = ("tiled", "onnx")
FULL = {"num_classes": 21, "scales": (1.0, 0.75, 0.5), "merge": "attention"}
DEMO = {"num_classes": 5, "scales": (2.0, 1.0), "merge": "attention", "width": 0.125, "side": 96}


def _checkpoint(folder: Path, name: str, num_classes: int, scales: Any, merge: str, width: float,
                backbone: str = DEFAULT_BACKBONE) -> Path:  # fmt: skip
    """A randomly initialised checkpoint (speed does not depend on the weights)."""
    torch.manual_seed(0)
    model = build_model(num_classes, scales=scales, merge=merge, width=width, backbone=backbone).eval()
    dataset = {"name": "bench", "classes": [f"c{i}" for i in range(num_classes)], "ignore_index": 255, "root": ""}
    path = folder / f"{name}.pt"
    save_checkpoint(path, make_checkpoint(model, dataset))
    return path


def _test_image(height: int, width: int) -> np.ndarray:
    """A smooth synthetic photo-like uint8 image (gradients and blobs), deterministic."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    channels = [np.sin(7 * y + 3 * x), np.cos(5 * x - 2 * y), np.sin(11 * x * y)]
    return np.stack([((c + 1) * 127.5).astype(np.uint8) for c in np.broadcast_arrays(*channels)], axis=-1)


def parse_image(text: str) -> tuple[int, int]:
    """``"3000x4000"`` (height x width) -> (3000, 4000)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 8 for p in parts):
        raise UsageError(f"--image: expected HEIGHTxWIDTH such as 3000x4000, got {text!r}")
    return int(parts[0]), int(parts[1])


def _probe(settings: Any, fn: Any) -> tuple[float, float | None, Any]:
    """(seconds, peak MB during the call or None, result) of one call."""
    memory = MemoryProbe(settings.device)
    with memory.measure():
        synchronize(settings.device)
        start = time.perf_counter()
        result = fn()
        synchronize(settings.device)
        seconds = time.perf_counter() - start
    return seconds, None if memory.peak_bytes is None else memory.peak_bytes / MB, result


def bench_tiled(settings: Any, context: dict[str, Any], image_size: str, tile: int) -> list[dict[str, Any]]:
    """Whole (where the estimate fits the budget) vs tiled prediction of one large image."""
    height, width = parse_image(image_size)
    image = _test_image(height, width)
    with tempfile.TemporaryDirectory(prefix="msattn-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp), "full", FULL["num_classes"], FULL["scales"], FULL["merge"], settings.width,
                           settings.backbone)  # fmt: skip
        backend = TorchBackend(ckpt, settings.device, InferenceOptions(amp="bf16" if settings.amp else "off"))
        memory = memory_model(backend)
        planner = Planner(TilingOptions(tile=tile), memory, str(settings.device))
        budget = Planner(TilingOptions(), memory, str(settings.device)).budget
        weights_mb = backend.weight_bytes / MB
        common = {"mode": "tiled", "scales": list(FULL["scales"]), "merge": FULL["merge"], "size": max(height, width),
                  "image": [height, width], **context, "budget_mb": budget / MB}  # fmt: skip
        records = []
        plan = planner.plan(height, width) or planner.fixed
        backend.forward(image[None, :257, :257])  # warm-up (first-call costs)
        quantum = scale_quantum(backend.scales)
        monitor = LoadMonitor()
        seconds, peak, tiled = _probe(settings, lambda: predict_image_tiled(backend, image, plan, planner, Scratch(tmp)))
        records.append({**common, "case": "tiles", "tile": plan.tile, "overlap": plan.overlap, "quantum": quantum,
                        "tiles": count_tiles(height, width, plan), "seconds": seconds,
                        "peak_mem_mb": None if peak is None else peak + weights_mb,
                        "estimate_mb": memory.tiled_bytes(height, width, plan) / MB,
                        "cpu_other_load": monitor.other_load()})  # fmt: skip
        whole_need = memory.forward_bytes(height, width)
        record = {**common, "case": "whole", "estimate_mb": whole_need / MB}
        if whole_need <= budget:
            gc.collect()
            monitor = LoadMonitor()
            seconds, peak, out = _probe(settings, lambda: backend.forward(image[None])[0][0].argmax(0))
            record.update(seconds=seconds, peak_mem_mb=None if peak is None else peak + weights_mb,
                          agreement=float((out == tiled.labels).mean()), cpu_other_load=monitor.other_load())  # fmt: skip
        else:
            record["skipped"] = f"estimate {format_bytes(whole_need)} over the budget {format_bytes(budget)}"
        records.append(record)
    return records


def bench_onnx(size: int, settings: Any, context: dict[str, Any]) -> list[dict[str, Any]]:
    """PyTorch vs onnxruntime on the demo model and the full-size model, timed interleaved."""
    require("onnx", "onnxscript", "onnxruntime", what="msattn bench --mode onnx")
    if settings.device.type != "cpu":
        raise UsageError("--mode onnx compares onnxruntime and PyTorch on CPU: use --device cpu")
    models = {"demo": ({**DEMO}, DEMO["side"]),
              "full": ({**FULL, "width": settings.width, "backbone": settings.backbone}, size)}  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory(prefix="msattn-bench-") as tmp:
        for name, (spec, side) in models.items():
            ckpt = _checkpoint(Path(tmp), name, spec["num_classes"], spec["scales"], spec["merge"], spec["width"],
                               spec.get("backbone", DEFAULT_BACKBONE))  # fmt: skip
            onnx_path = Path(tmp) / f"{name}.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                export_checkpoint(ckpt, onnx_path, verify=False)  # msattn export, dynamic size
            runners = {"torch": TorchBackend(ckpt, settings.device, InferenceOptions(amp="off")),
                       "onnxruntime": OnnxBackend(onnx_path, threads=torch.get_num_threads())}  # fmt: skip
            records += _time_pair(name, spec, side, runners, settings, context)
    return records


def _time_pair(name: str, spec: dict, side: int, runners: dict, settings: Any, context: dict) -> list[dict[str, Any]]:
    image = _test_image(side, side)[None]
    times: dict[str, list[float]] = {k: [] for k in runners}
    monitor = LoadMonitor()
    for round_ in range(settings.warmup + settings.iters):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.forward(image)
            if round_ >= settings.warmup:
                times[key].append(time.perf_counter() - start)
    ratio = statistics.median(o / t for o, t in zip(times["onnxruntime"], times["torch"]))
    other = monitor.other_load()
    records = []
    for key, values in times.items():
        records.append({
            "mode": "onnx", "model": name, "runtime": key, "scales": list(spec["scales"]), "merge": spec["merge"],
            "size": side, **context, "width": spec["width"], "num_classes": spec["num_classes"],
            "latency_ms": statistics.median(values) * 1e3, "latency_ms_min": min(values) * 1e3,
            "times_ms": [v * 1e3 for v in values], "onnx_over_torch": ratio, "cpu_other_load": other,
        })  # fmt: skip
    return records


def print_deploy_report(records: list[dict[str, Any]], console: Any) -> None:
    """Tables for the tiled and onnx records (the other modes have their own)."""
    tiled = [r for r in records if r["mode"] == "tiled"]
    if tiled:
        table = Table(title="tiled vs whole: one image through the predict pipeline", title_justify="left")
        for column in ("image", "case", "tile", "tiles", "s/img", "peak MB", "estimate MB", "agreement"):
            table.add_column(column, justify="left" if column in ("image", "case") else "right")
        for r in tiled:
            fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
            table.add_row(
                f"{r['image'][1]}x{r['image'][0]}", r["case"], str(r.get("tile", "—")), str(r.get("tiles", "—")),
                fmt(r.get("seconds"), ".2f"), fmt(r.get("peak_mem_mb"), ".0f"), fmt(r.get("estimate_mb"), ".0f"),
                r.get("skipped") or fmt(r.get("agreement"), ".4f"),
            )  # fmt: skip
        console.print(table)
    onnx = [r for r in records if r["mode"] == "onnx"]
    if onnx:
        table = Table(title="PyTorch vs onnxruntime (CPU, same threads)", title_justify="left")
        for column in ("model", "size", "runtime", "ms/img", "best ms", "onnx / torch"):
            table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
        for r in onnx:
            table.add_row(r["model"], str(r["size"]), r["runtime"], f"{r['latency_ms']:.1f}",
                          f"{r['latency_ms_min']:.1f}", f"{r['onnx_over_torch']:.3f}")  # fmt: skip
        console.print(table)
