"""The report's per-class plot: the legend leaves every bar visible, and mean ± std stays within [0, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (the msattn[report] extra)")

from msattn.analysis.plots import class_bars_figure, clipped_spread  # noqa: E402

CLASSES = ["background", "head", "torso", "arms", "legs"]


def demo_like_report() -> dict[str, Any]:
    """Two scales over the demo's classes: weights near one scale with a wide spread, IoUs up to 95%."""
    iou = {"scale:2": [0.95, 0.58, 0.74, 0.51, 0.65], "scale:1": [0.93, 0.2, 0.6, 0.3, 0.5],
           "attention:2+1": [0.95, 0.58, 0.74, 0.51, 0.65], "oracle:2+1": [0.97, 0.7, 0.85, 0.66, 0.77]}
    methods = [{"key": key, "merge": key.split(":")[0], "scales": [2.0] if key == "scale:2" else [1.0] if
                key == "scale:1" else [2.0, 1.0], "is_model": key.startswith("attention"),
                "per_class": dict(zip(CLASSES, values))} for key, values in iou.items()]  # fmt: skip
    means = [[0.99, 0.01], [0.97, 0.03], [0.98, 0.02], [0.94, 0.06], [0.99, 0.01]]  # the demo's: scale 2 everywhere
    by_class = {c: {"mean": m, "std": [0.12, 0.12], "pixels": 100, "entropy": 0.1} for c, m in zip(CLASSES, means)}
    return {"classes": CLASSES, "scales": [2.0, 1.0], "methods": methods,
            "attention_by_class": {"scales": [2.0, 1.0], "classes": by_class}}  # fmt: skip


def _overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_legend_covers_no_bar() -> None:
    fig = class_bars_figure(demo_like_report())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        box = legend.get_window_extent(renderer)
        bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
        assert bars and not [b for b in bars if _overlaps(box, b)], ax.get_title()


def test_weight_whiskers_stay_within_zero_and_one() -> None:
    mean, std = np.array([0.98, 0.02, 0.5]), np.array([0.12, 0.12, 0.1])
    lower, upper = clipped_spread(mean, std)
    assert np.allclose(mean - lower, [0.86, 0.0, 0.4]) and np.allclose(mean + upper, [1.0, 0.14, 0.6])
    fig = class_bars_figure(demo_like_report())
    weights = fig.axes[1]
    ends = np.concatenate([np.asarray(seg)[:, 1] for coll in weights.collections for seg in coll.get_segments()])
    assert ends.size and ends.min() >= 0.0 and ends.max() <= 1.0 + 1e-9
    caps = np.concatenate([line.get_ydata() for line in weights.lines]) if weights.lines else np.zeros(0)
    assert caps.size and caps.min() >= 0.0 and caps.max() <= 1.0 + 1e-9
