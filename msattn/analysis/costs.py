"""What every scale subset costs: FLOPs per image (the counter ``msattn bench`` uses) and measured latency.

FLOPs are counted on a copy of the model built on the ``meta`` device (shapes only, no
arithmetic, no memory), once per padded image size of the pass, and averaged over the
images. Latency comes from a ``msattn bench --json`` file: the inference record with the
same scale set and merge (and the checkpoint's width), at the size closest to the images'.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msattn.analysis.methods import ORACLE, SINGLE, Method
from msattn.bench.measure import count_flops
from msattn.errors import DataError
from msattn.io import read_json
from msattn.models.scale import build_model
from msattn.models.spec import HIERARCHICAL, ModelSpec


def _meta_model(model_args: dict[str, Any], method: Method) -> tuple[torch.nn.Module, tuple[float, ...] | None]:
    """A meta-device model that computes ``method`` and the scales to call it with (None: its own).

    A hierarchical model's chain runs on any scales holding 1.0 but trains on two: the trained
    spec is built and called with the method's scales.
    """
    spec = ModelSpec.from_args(model_args)
    with torch.device("meta"):
        if method.merge == HIERARCHICAL:
            return build_model(spec).eval(), tuple(method.scales)
        merge = method.merge if method.merge in ("max", "avg") else "avg" if method.merge == SINGLE else spec.merge
        return build_model(spec.replace(scales=tuple(method.scales), merge=merge)).eval(), None


def method_flops(model_args: dict[str, Any] | None, methods: Sequence[Method], sizes: dict[str, int]) -> dict[str, float]:
    """Mean GFLOPs per image of every method (not the oracle), over the padded sizes ``{"HxW": images}``.

    ``model_args`` are a checkpoint's (None, e.g. for a model that is not a ScaleNet: nothing counted).
    """
    if not model_args or not sizes:
        return {}
    total_images = sum(sizes.values())
    out: dict[str, float] = {}
    for method in methods:
        if method.merge == ORACLE:
            continue
        model, scales = _meta_model(model_args, method)
        flops = 0.0
        for key, count in sizes.items():
            h, w = (int(v) for v in key.split("x"))
            x = torch.zeros(1, 3, h, w, device="meta")
            with torch.inference_mode():
                flops += count * count_flops(lambda: model(x, scales=scales))  # noqa: B023 - called at once
        out[method.key] = flops / total_images / 1e9
    return out


def read_bench(path: Path) -> list[dict[str, Any]]:
    """The records of a ``msattn bench --json`` file (a list of objects)."""
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: not a msattn bench JSON file (expected a list of records)")
    return records


def method_latency(
    records: list[dict[str, Any]], methods: Sequence[Method], width: float | None, side: float
) -> dict[str, dict[str, Any]]:
    """Per method key: ``latency_ms`` and where it came from, for the methods the bench measured."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method.merge == ORACLE:
            continue
        merge = None if method.merge == SINGLE else method.merge
        matches = [
            r for r in records
            if r.get("mode") == "inference"
            and sorted(float(s) for s in r.get("scales") or []) == sorted(method.scales)
            and (r.get("merge") if len(method.scales) > 1 else None) == merge
            and (width is None or r.get("width") is None or float(r["width"]) == float(width))
            and isinstance(r.get("latency_ms"), (int, float))
        ]
        if not matches:
            continue
        best = min(matches, key=lambda r: abs(float(r.get("size", side)) - side))
        out[method.key] = {
            "latency_ms": float(best["latency_ms"]),
            "latency_source": {k: best.get(k) for k in ("size", "batch", "device_name", "width", "amp", "date")},
        }
    return out


def method_costs(
    model_args: dict[str, Any] | None,
    methods: Sequence[Method],
    sizes: dict[str, int],
    bench: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{key: {"gflops", "latency_ms", "latency_source"}}`` for every measured method."""
    flops = method_flops(model_args, methods, sizes)
    costs: dict[str, dict[str, Any]] = {key: {"gflops": value} for key, value in flops.items()}
    if bench:
        total = sum(sizes.values()) or 1
        side = sum(count * max(int(v) for v in key.split("x")) for key, count in sizes.items()) / total
        width = (model_args or {}).get("width")
        for key, value in method_latency(bench, methods, width, side).items():
            costs.setdefault(key, {}).update(value)
    return costs
