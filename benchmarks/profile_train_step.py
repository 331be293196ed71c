"""Profile the training engine's step with torch.profiler: where the time goes besides convolution.

    python benchmarks/profile_train_step.py --out DIR [--device cuda] [--size 321] [--batch 30]
        [--scales 1 0.75 0.5] [--merge attention] [--width 1] [--steps 3]

Runs ``msattn.train.loop.train_step`` (bf16 autocast and channels_last on CUDA, fused
SGD, the 3-scale attention model by default) for a few warm-up steps, then profiles
``--steps`` steps. Writes ``DIR/profile-train-<size>.json`` (device time per step, the
share of convolution kernels, the ops and kernels that take the most device time) and
``DIR/profile-train-<size>.trace.json.gz`` (a Chrome / Perfetto trace). On CPU (tiny
settings) it checks that the script runs; its figures mean nothing there.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: substrings of op / kernel names that are convolution work (cuDNN, CUTLASS implicit GEMM, oneDNN)
CONV_MARKERS = ("conv", "cudnn", "xmma", "implicit_gemm", "implicit_convolve", "wgrad", "dgrad", "fprop", "mkldnn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--merge", default="attention")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = profile(args)
    path = args.out / f"profile-train-{args.size}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"device time per step {summary['device_ms_per_step']:.2f} ms, convolution "
          f"{summary['conv_share']:.0%}; wrote {path}")
    return 0


def build_step(args: argparse.Namespace) -> tuple[Any, torch.device]:
    """The engine's step on a fixed random batch (what ``msattn bench --mode train`` times)."""
    from msattn.models.loss import segmentation_loss
    from msattn.models.params import param_groups
    from msattn.models.scale import build_model
    from msattn.runtime.distributed import DistInfo
    from msattn.train.step import NonFiniteGuard, make_optimizer, train_step

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(21, scales=args.scales, merge=args.merge, width=args.width)
    model = model.to(dev, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(param_groups(model, lr=1e-3, weight_decay=5e-4), "sgd", 1e-3, 0.9, dev)
    images = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 21, (args.batch, args.size, args.size), device=dev)
    step = functools.partial(
        train_step, model, [{"image": images, "label": labels}], optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=False), guard=NonFiniteGuard(dev), device=dev,
        amp_dtype=torch.bfloat16 if cuda else None, channels_last=True, loss_fn=segmentation_loss,
        loss_options={"ignore_index": 255}, scales=tuple(args.scales), info=DistInfo(device=dev),
    )
    return step, dev


def _device_time(event: Any, self_only: bool) -> float:
    """Device microseconds of a key_averages() row (torch renamed cuda_* to device_* in 2.4)."""
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile(args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, dev = build_step(args)
    cuda = dev.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:  # warmed up above: every profiled step is a steady one
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
    wall = (time.perf_counter() - start) / args.steps
    trace = args.out / f"profile-train-{args.size}.trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as raw, gzip.open(str(trace) + ".gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    return summarize(prof, args, dev, wall)


def summarize(prof: Any, args: argparse.Namespace, dev: torch.device, wall: float) -> dict[str, Any]:
    """Device time per step, the convolution share and the top ops / kernels by device time."""
    from torch.autograd import DeviceType

    rows = prof.key_averages()
    cuda = dev.type == "cuda"
    # on CUDA the kernel rows (device events) carry the device time, counted once; on CPU the ops' own CPU time
    device_rows = [e for e in rows if getattr(e, "device_type", None) == DeviceType.CUDA] if cuda else []
    kernels = [(e.key, _device_time(e, True), int(e.count)) for e in device_rows or rows] if cuda \
        else [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in rows]
    kernels = [k for k in kernels if k[1] > 0]
    total = sum(t for _, t, _ in kernels) or 1.0
    conv = sum(t for name, t, _ in kernels if any(m in name.lower() for m in CONV_MARKERS))
    top = sorted(kernels, key=lambda k: -k[1])[:30]
    ops = sorted(((e.key, _device_time(e, False) if cuda else float(e.cpu_time_total), int(e.count))
                  for e in rows if e.key.startswith("aten::")), key=lambda k: -k[1])[:30]
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "size": args.size, "batch": args.batch, "scales": args.scales, "merge": args.merge, "width": args.width,
        "steps": args.steps,
        "wall_ms_per_step": wall * 1e3,
        "device_ms_per_step": total / 1e3 / args.steps,
        "conv_share": conv / total,
        "top_kernels": [{"name": n[:160], "ms_per_step": t / 1e3 / args.steps, "share": t / total, "calls": c}
                        for n, t, c in top],
        "top_aten_ops": [{"name": n, "ms_per_step": t / 1e3 / args.steps, "calls": c} for n, t, c in ops],
    }


if __name__ == "__main__":
    sys.exit(main())
