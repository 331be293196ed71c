"""Correctness and speed checks of issue 18's GPU paths that ``msattn bench`` does not cover.

    python benchmarks/gpu_checks.py --out DIR [--device cuda] [--width 1] [--iters 20]

Writes ``DIR/checks.json`` and exits 1 when a check fails:

- ``env``: the device, torch, CUDA and cuDNN versions, the CPU count.
- ``normalize``: uint8 batches normalised on the device (``DeviceBatches``) equal the
  workers' float32 normalisation bit for bit.
- ``graph_vs_eager``: the evaluate / predict path (``InferenceRunner``) on VOC-like images
  padded to 513 (3 scales + attention): the replayed CUDA graph against the same forward run
  eagerly (must agree to bf16 rounding) and against the eager ``predict_batch`` of earlier
  versions (reported: argmax agreement).
- ``runner_speed``: images/s of that path at batch 1 and 8, eager and with graphs, plus the
  one-time capture cost.

On CPU (tiny ``--width``) it only checks that the script runs: CUDA graphs cannot be captured there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--pad-to", type=int, default=513, help="8k+1 side; the images are VOC sizes scaled to it")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": environment(dev), "command": " ".join(sys.argv)}
    results["normalize"] = check_normalize(dev)
    model = tiny_or_full_model(args.width, dev)
    results["graph_vs_eager"] = check_graph_vs_eager(model, dev, args.pad_to)
    results["runner_speed"] = runner_speed(model, dev, args.iters, args.pad_to)
    failed = [name for name, value in results.items() if isinstance(value, dict) and value.get("ok") is False]
    results["ok"] = not failed
    (args.out / "checks.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, value in results.items():
        if isinstance(value, dict) and "summary" in value:
            print(f"{name}: {value['summary']}")
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


def environment(dev: torch.device) -> dict[str, Any]:
    cuda = dev.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_normalize(dev: torch.device) -> dict[str, Any]:
    from msattn.data.transforms import CAFFE_MEAN, CAFFE_STD, IMAGENET_MEAN, IMAGENET_STD, normalize_image
    from msattn.runtime.loader import DeviceBatches

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 37, 41), dtype=torch.uint8, generator=gen)
    equal = []
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), (CAFFE_MEAN, CAFFE_STD)):
        expected = torch.stack([normalize_image(img.permute(1, 2, 0).numpy(), mean, std) for img in images])
        batch = {"image": images.pin_memory() if dev.type == "cuda" else images, "label": images[:, 0]}
        moved = next(DeviceBatches([batch], dev, mean, std))
        equal.append(bool(torch.equal(moved["image"].cpu(), expected)))
    return {"ok": all(equal), "summary": f"bit-identical for both normalisations: {all(equal)}"}


def tiny_or_full_model(width: float, dev: torch.device) -> torch.nn.Module:
    from msattn.models.scale import build_model

    torch.manual_seed(0)
    model = build_model(21, scales=(1.0, 0.75, 0.5), merge="attention", width=width)
    return model.to(dev, memory_format=torch.channels_last).eval()


def voc_like(dev: torch.device, n: int, pad_to: int, mixed: bool = True) -> list[torch.Tensor]:
    """n normalised images of VOC sizes (500x375, 375x500, 500x333...; scaled to fit ``pad_to``
    as they fit 513), or all 375x500 with ``mixed=False``."""
    gen = torch.Generator().manual_seed(1)
    sizes = [(375, 500), (500, 375), (333, 500), (500, 500), (281, 500)] if mixed else [(375, 500)]
    scale = (pad_to - 1) / 512
    return [torch.randn(3, *(max(1, round(v * scale)) for v in sizes[i % len(sizes)]), generator=gen).to(dev)
            for i in range(n)]


def check_graph_vs_eager(model: torch.nn.Module, dev: torch.device, pad_to: int) -> dict[str, Any]:
    from msattn.infer.forward import predict_batch
    from msattn.infer.graphs import GraphPolicy, InferenceRunner, cudnn_benchmark
    from msattn.infer.options import InferenceOptions

    amp = InferenceOptions().amp_dtype(dev)
    runner = InferenceRunner(model, amp_dtype=amp, pad_to=pad_to, policy=GraphPolicy(enabled=True))
    images = voc_like(dev, 4, pad_to)
    padded = torch.stack([torch.nn.functional.pad(img, (0, pad_to - img.shape[-1], 0, pad_to - img.shape[-2]))
                          for img in images])
    with torch.inference_mode(), cudnn_benchmark():
        eager_full = runner.full_forward(padded.contiguous(memory_format=torch.channels_last))[0].clone()
    for _ in range(3):  # eager, capture, replay
        results = runner.predict(images)
    if not runner.cache.stats.replays:
        return {"ok": dev.type != "cuda", "summary": runner.summary(), "graphs": False}
    diffs, agree, agree_old = [], [], []
    for i, (img, (probs, _)) in enumerate(zip(images, results)):
        h, w = img.shape[-2:]
        reference = eager_full[i, :, :h, :w]
        diffs.append(float((probs - reference).abs().max()))
        agree.append(float((probs.argmax(0) == reference.argmax(0)).float().mean()))
        old, _ = predict_batch(model, img[None], amp_dtype=amp, pad_to=pad_to)
        agree_old.append(float((probs.argmax(0) == old[0].argmax(0)).float().mean()))
    ok = max(diffs) < 2e-2 and min(agree) > 0.999
    return {
        "ok": ok, "graphs": True, "max_abs_prob_diff": max(diffs), "argmax_agreement_min": min(agree),
        "argmax_agreement_vs_predict_batch_min": min(agree_old), "cache": runner.summary(),
        "summary": f"graph vs eager: max |dp| {max(diffs):.2e}, argmax agreement {min(agree):.4%} "
                   f"(vs predict_batch {min(agree_old):.4%})",
    }


def runner_speed(model: torch.nn.Module, dev: torch.device, iters: int, pad_to: int) -> dict[str, Any]:
    """The evaluate path on one image size (VOC val padded to 513 is one shape), eager and graphed."""
    from msattn.infer.graphs import GraphPolicy, InferenceRunner
    from msattn.infer.options import InferenceOptions

    amp = InferenceOptions().amp_dtype(dev)
    out: dict[str, Any] = {}
    for batch in (1, 8):
        images = voc_like(dev, batch, pad_to, mixed=False)
        for graphs in (False, True):
            runner = InferenceRunner(model, amp_dtype=amp, pad_to=pad_to, policy=GraphPolicy(enabled=graphs))
            for _ in range(3):
                runner.predict(images)
            _sync(dev)
            start = time.perf_counter()
            for _ in range(iters):
                runner.predict(images)
            _sync(dev)
            per_image = (time.perf_counter() - start) / (iters * batch)
            key = f"batch{batch}_{'graph' if graphs else 'eager'}"
            out[key] = {"ms_per_image": per_image * 1e3, "images_per_s": 1 / per_image,
                        "capture_s": runner.cache.stats.capture_seconds if graphs else None,
                        "replays": runner.cache.stats.replays}
    out["summary"] = ", ".join(f"{k} {v['ms_per_image']:.2f} ms/img" for k, v in out.items())
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


if __name__ == "__main__":
    sys.exit(main())
