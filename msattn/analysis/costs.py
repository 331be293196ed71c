"""What every scale subset costs: FLOPs per image (the counter ``msattn bench`` uses) and measured latency.

FLOPs are counted on a copy of the model built on the ``meta`` device (shapes only, no
arithmetic, no memory), once per padded image size of the pass, and averaged over the
images. Latency comes from a ``msattn bench --json`` file: the inference record with the
same scale set and merge, the checkpoint's backbone (records without one are VGG-16's) and
width (not for a ``timm:`` backbone, whose channels are its model's), at the size closest to
the images'. Counting a ``timm:`` model's FLOPs builds it on the meta device, so it needs timm
(as loading its checkpoint does).
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
from msattn.models.spec import DEFAULT_BACKBONE, HIERARCHICAL, TIMM_PREFIX, ModelSpec


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


#: what a latency says about the bench record it came from
SOURCE_KEYS = ("size", "batch", "device_name", "backbone", "width", "amp", "date")


def _same_model(record: dict[str, Any], backbone: str, width: float | None) -> bool:
    """A bench record of this backbone (records before ``--backbone``: VGG-16) and width (not for timm)."""
    if str(record.get("backbone") or DEFAULT_BACKBONE) != backbone:
        return False
    if backbone.startswith(TIMM_PREFIX) or width is None or record.get("width") is None:
        return True
    return float(record["width"]) == float(width)


def method_latency(
    records: list[dict[str, Any]], methods: Sequence[Method], width: float | None, side: float,
    backbone: str = DEFAULT_BACKBONE,
) -> dict[str, dict[str, Any]]:  # fmt: skip
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
            and _same_model(r, backbone, width)
            and isinstance(r.get("latency_ms"), (int, float))
        ]
        if not matches:
            continue
        best = min(matches, key=lambda r: abs(float(r.get("size", side)) - side))
        out[method.key] = {
            "latency_ms": float(best["latency_ms"]),
            "latency_source": {k: best.get(k) for k in SOURCE_KEYS},
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
        backbone = str((model_args or {}).get("backbone", DEFAULT_BACKBONE))
        for key, value in method_latency(bench, methods, width, side, backbone).items():
            costs.setdefault(key, {}).update(value)
    return costs
