"""The report's plots, drawn with matplotlib (the ``msattn[report]`` extra) and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed, never opens a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def scale_colour(i: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def _scale_name(s: float) -> str:
    return f"scale {s:g}"


def weights_by_size(report: dict[str, Any]) -> bytes | None:
    """Mean attention weight of every scale against object size (one line per scale), and accuracy by size."""
    bins = report["size_bins"]
    rows = [b for b in bins["bins"] if b["objects"]]
    if not rows:
        return None
    plt = _pyplot()
    with_weights = rows[0]["weight_mean"] is not None
    fig, axes = plt.subplots(1, 2 if with_weights else 1, figsize=(11 if with_weights else 5.5, 3.8), squeeze=False)
    x = np.arange(len(rows))
    labels = [f"{b['label']}\n({b['objects']})" for b in rows]
    scales = report["scales"]
    if with_weights:
        ax = axes[0][0]
        for i, s in enumerate(scales):
            mean = np.array([b["weight_mean"][i] for b in rows])
            std = np.array([b["weight_std"][i] for b in rows])
            ax.plot(x, mean, "o-", color=scale_colour(i), label=_scale_name(s), lw=2)
            ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=scale_colour(i), alpha=0.15)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("mean weight on the object (± std over objects)")
        ax.set_title(f"{report['model']}: weight per scale by object size")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("object area / image area (objects)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    keys = [m["key"] for m in report["methods"] if m["merge"] == "scale"] + [report["model"]]
    keys += [m["key"] for m in report["methods"] if m["merge"] == "oracle"]
    for j, key in enumerate(dict.fromkeys(keys)):
        single = key.startswith("scale:")
        style = "o-" if single else ("s:" if key.startswith("oracle") else "D--")  # dashed: a branch below stays visible
        colour = scale_colour(scales.index(float(key.split(":")[1]))) if single else (
            "black" if key == report["model"] else "grey")
        ax.plot(x, [100 * b["accuracy"][key] for b in rows], style, color=colour, label=key, lw=2.4 if single else 1.3)
    ax.set_ylabel("pixel accuracy on the objects (%)")
    ax.set_title("accuracy by object size")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("object area / image area (objects)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def clipped_spread(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whisker lengths (below, above) of mean ± std for weights: clipped to [0, 1], where a weight lives."""
    mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    return np.minimum(std, np.clip(mean, 0, 1)), np.minimum(std, np.clip(1 - mean, 0, 1))


def _legend_above_bars(ax: Any, top: float, entries: int) -> None:
    """The legend in a band above the bars' range (``top``): it never covers a bar."""
    ax.set_ylim(0, top * 1.3)
    ax.set_yticks(np.linspace(0, top, 6))
    ax.legend(fontsize=7, loc="upper center", ncol=min(entries, 4), frameon=False, borderaxespad=0.2)


def class_bars_figure(report: dict[str, Any]) -> Any:
    """The per-class figure: IoU of every single scale, the model's merge and the oracle; mean weights per scale."""
    plt = _pyplot()
    classes = report["classes"]
    by_class = report["attention_by_class"]
    fig, axes = plt.subplots(1, 2 if by_class else 1, figsize=(12 if by_class else 6.5, 3.8), squeeze=False)
    x = np.arange(len(classes))
    rows = [m for m in report["methods"] if m["merge"] in ("scale", "oracle") or m["is_model"]]
    width = 0.8 / len(rows)
    ax = axes[0][0]
    for j, row in enumerate(rows):
        values = [100 * (row["per_class"][c] or 0.0) for c in classes]
        colour = scale_colour(report["scales"].index(row["scales"][0])) if row["merge"] == "scale" else (
            "black" if row["is_model"] else "lightgrey")
        ax.bar(x - 0.4 + width * (j + 0.5), values, width, label=row["key"], color=colour)
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_title("IoU per class")
    _legend_above_bars(ax, 100.0, len(rows))
    if by_class:
        ax = axes[0][1]
        width = 0.8 / len(report["scales"])
        for i, s in enumerate(report["scales"]):
            mean = [by_class["classes"][c]["mean"][i] if by_class["classes"][c]["mean"] else 0.0 for c in classes]
            std = [by_class["classes"][c]["std"][i] if by_class["classes"][c]["std"] else 0.0 for c in classes]
            ax.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=clipped_spread(np.array(mean), np.array(std)),
                   color=scale_colour(i), label=_scale_name(s), capsize=2)
        ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mean weight on the class's pixels (± std)")
        ax.set_title("attention weight per class")
        _legend_above_bars(ax, 1.0, len(report["scales"]))
    return fig


def class_bars(report: dict[str, Any]) -> bytes:
    """:func:`class_bars_figure` as PNG bytes."""
    return _png(class_bars_figure(report))


def pareto(report: dict[str, Any]) -> bytes | None:
    """mIoU against GFLOPs per image of every measured scale subset; the Pareto front joined."""
    rows = [m for m in report["methods"] if m["merge"] != "oracle" and m["gflops"] is not None and m["miou"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        marker = {"scale": "o", "max": "^", "avg": "s", "attention": "D", "hierarchical": "h"}.get(row["merge"], "o")
        ax.scatter(row["gflops"], 100 * row["miou"], marker=marker, s=60,
                   color="crimson" if row["pareto"] else "grey", zorder=3)
        ax.annotate(row["key"], (row["gflops"], 100 * row["miou"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front = sorted((r["gflops"], 100 * r["miou"]) for r in rows if r["pareto"])
    if front:
        ax.plot(*zip(*front), "-", color="crimson", lw=1, alpha=0.7, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("accuracy against cost (o single, ^ max, s avg, D attention, h hierarchical)")
    ax.grid(alpha=0.3)
    return _png(fig)


def reliability(report: dict[str, Any]) -> bytes:
    """Reliability diagram of the model's merged probabilities (and of each single scale, thin)."""
    plt = _pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    maps = report["calibration"]["maps"]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for key, entry in maps.items():
        own = key == report["model"]
        conf = [b["confidence"] for b in entry["bins"] if b["count"]]
        acc = [b["accuracy"] for b in entry["bins"] if b["count"]]
        ax.plot(conf, acc, "o-" if own else ".-", lw=2 if own else 1, alpha=1 if own else 0.6,
                color="black" if own else None, label=f"{key} (ECE {100 * entry['ece']:.2f}%)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability of the predicted class probability")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    own = maps.get(report["model"]) or next(iter(maps.values()))
    centres = [(b["lo"] + b["hi"]) / 2 for b in own["bins"]]
    axc.bar(centres, [b["count"] for b in own["bins"]], width=1 / len(centres), color="black", alpha=0.6)
    axc.set_yscale("log")
    axc.set_xlabel("confidence (max probability)")
    axc.set_ylabel("pixels")
    return _png(fig)


def entropy(report: dict[str, Any]) -> bytes | None:
    """Histogram of the normalised entropy of the weights and of every scale's weight."""
    ent = report["attention_entropy"]
    if not ent:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    edges = np.array(ent["histogram_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    axes[0].bar(centres, ent["histogram"], width=width, color="slategrey")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("entropy of the weights / log S (0: one scale, 1: uniform)")
    axes[0].set_ylabel("pixels")
    axes[0].set_title(f"does the model hedge? mean {ent['mean']:.3f}")
    for i, (s, hist) in enumerate(ent["weight_histograms"].items()):
        axes[1].step(centres, hist, where="mid", color=scale_colour(i), label=f"scale {s}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("weight")
    axes[1].set_ylabel("pixels")
    axes[1].set_title("weight of every scale")
    axes[1].legend(fontsize=8)
    return _png(fig)


def gallery_figure(panels: Sequence[tuple[str, np.ndarray, str]], title: str) -> bytes:
    """A row of panels ``(caption, array, kind)``; kind ``rgb`` for images, ``weight`` for 0..1 maps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.5), squeeze=False)
    for ax, (caption, array, kind) in zip(axes[0], panels):
        if kind == "weight":
            shown = ax.imshow(array, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        else:
            shown = ax.imshow(array, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if any(kind == "weight" for _, _, kind in panels):
        fig.colorbar(shown, ax=list(axes[0]), fraction=0.012, pad=0.01)
    fig.suptitle(title, fontsize=9)
    return _png(fig)
