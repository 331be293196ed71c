"""``msattn bench``: latency, throughput, memory and FLOPs across scale sets and merges.

For each input size and mode the cases below are built on one shared backbone and timed
**interleaved** (round r runs every case once), so that whatever else the machine is doing
weighs on all cases alike and the multi-scale / single-scale ratios stay meaningful.

- ``inference``: one forward under ``torch.inference_mode()``; time per image.
- ``train``: the training engine's step (forward + loss + backward + SGD step with momentum and
  DeepLab parameter groups, fused on CUDA) on a ``size`` x ``size`` crop; images/s.
- ``data`` and ``train-e2e`` (the real loader + step): :mod:`msattn.bench.data`.

On CUDA, ``inference`` replays each case's forward as a captured CUDA graph (``--no-graph``:
eager; with ``--compile`` the inductor-compiled forward is captured); the capture, a
one-time cost, is in the records as ``capture_s``. Progress goes to stderr as it runs; the
tables (:mod:`msattn.bench.report`) fit 100 columns. The options are checked, the device
resolved and the run described by :mod:`msattn.bench.setup`; timing, memory and FLOPs are
measured by :mod:`msattn.bench.measure`.

Reported per case: median latency per image over ``iters`` timed rounds after ``warmup``
rounds, FLOPs per image (``torch.utils.flop_counter``, convolutions and matmuls), achieved
GFLOP/s and its fraction of a large matmul measured in the same run, and peak memory from one
extra untimed call: on CUDA ``max_memory_allocated`` during the call over what was allocated
before it; on CPU the peak RSS growth during the call (``VmHWM``, reset per call through
``/proc/self/clear_refs``, after ``malloc_trim``); both plus the case's own resident state
(weights, and optimizer momentum in training), i.e. what one model alone needs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from msattn.bench import deploy as bench_deploy
from msattn.bench.cases import Settings, check_bench_backbone, check_cases, parse_case
from msattn.bench.data import bench_data, bench_train_e2e
from msattn.bench.model import add_ratios, bench_model
from msattn.bench.report import REPORT_WIDTH, ProgressLog, print_report
from msattn.bench.setup import check_json, check_options, resolve_device, run_context, workers_option
from msattn.io import write_json
from msattn.models.spec import DEFAULT_BACKBONE


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
    backbone: str = DEFAULT_BACKBONE,
) -> list[dict[str, Any]]:
    """Run the benchmark, print progress (stderr), the tables and the ratios, optionally write JSON.

    ``graph`` (None: on for CUDA) replays inference as CUDA graphs; ``cases`` (``--case``) picks
    (scales, merge) pairs; ``workers`` (an integer or ``auto``) is train-e2e's loader. ``image``
    (HxW) and ``tile`` are the large image and tile side of the ``tiled`` mode
    (:mod:`msattn.bench.deploy`). ``backbone`` (``--backbone``) is the network every case is built on.
    """
    console, errors = Console(highlight=False), Console(stderr=True, highlight=False)
    if not console.is_terminal:  # a log file or pipe: the tables are made for 100 columns
        console = Console(width=REPORT_WIDTH, highlight=False)
    check_options(modes, sizes, width, batch, iters, warmup)
    check_cases([parse_case(c) for c in cases or ()], modes)  # a hierarchical case no chosen mode can run
    check_bench_backbone(backbone, width)
    if json_path is not None:
        check_json(Path(json_path))  # a folder or an unwritable place fails now, not after minutes of timing
    settings, workers_value = _settings(errors, device, batch, amp, compile_model, channels_last, width, iters, warmup,
                                        graph, cases, workers)  # fmt: skip
    settings = dataclasses.replace(settings, backbone=backbone)
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
    add_ratios(records)
    model_records = [r for r in records if r["mode"] not in bench_deploy.DEPLOY_MODES]
    if model_records:
        print_report(model_records, context, console)
    bench_deploy.print_deploy_report(records, console)
    if json_path is not None:
        write_json(json_path, records)
        console.print(f"wrote {len(records)} records to {json_path}", markup=False)
