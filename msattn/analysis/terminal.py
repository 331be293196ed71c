"""Headline findings (one sentence each) and the terminal tables (Rich; every user string escaped)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _row(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next(m for m in report["methods"] if m["key"] == key)


def headlines(report: dict[str, Any]) -> list[str]:
    """The few sentences a reader needs first (plain text: escape before printing as markup or HTML)."""
    lines = []
    own = _row(report, report["model"])
    gain = report["merge_gain"]
    best = _row(report, gain["best_single"])
    lines.append(f"{own['key']}: mIoU {pct(own['miou'])}%; best single scale {best['key']}: {pct(best['miou'])}% "
                 f"({pct(gain['miou_gain'], signed=True)} points from merging)")
    oracle = [m for m in report["methods"] if m["merge"] == "oracle"]
    if oracle:
        lines.append(f"oracle (per pixel, any scale right): {pct(oracle[0]['miou'])}% mIoU, "
                     f"pixel accuracy {pct(oracle[0]['pixel_accuracy'])}% against {pct(own['pixel_accuracy'])}%")
    bins = [b for b in report["size_bins"]["bins"] if b["objects"]]
    if bins and bins[0]["weight_mean"] is not None:
        for i, s in enumerate(report["scales"]):
            first, last = bins[0]["weight_mean"][i], bins[-1]["weight_mean"][i]
            corr = (report["size_bins"]["weight_size_correlation"] or {}).get(f"{s:g}")
            trend = "rises" if last > first + 0.005 else ("falls" if last < first - 0.005 else "stays flat")
            lines.append(f"weight of scale {s:g} {trend} from {first:.3f} ({bins[0]['label']}) to {last:.3f} "
                         f"({bins[-1]['label']}); correlation with log object size "
                         f"{'-' if corr is None else f'{corr:+.2f}'}")
    gains = [(b["gain"], b["label"]) for b in bins if b["gain"] is not None]
    if gains and report["model"].split(":")[0] != "scale":
        top, low = max(gains), min(gains)
        lines.append(f"merging gains most on objects {top[1]} ({pct(top[0], signed=True)} points of accuracy over "
                     f"the best single scale there), least on {low[1]} ({pct(low[0], signed=True)})")
    cal = report["calibration"]["maps"].get(report["model"])
    ent = report["attention_entropy"]
    if cal is not None:
        text = f"calibration: ECE {pct(cal['ece'])}%"
        if ent:
            text += (f"; attention entropy {ent['mean']:.3f} (0 = one scale, 1 = uniform), "
                     f"{pct(ent['near_one_hot_share'])}% of pixels near one-hot")
        lines.append(text)
    return lines


def print_headline(report: dict[str, Any], console: Console) -> None:
    """The methods table, the size table and the headline sentences."""
    methods = Table(title=escape(f"scale branches, merges and subsets ({report['provenance']['split']}, "
                                 f"{report['provenance']['images']} images)"))
    for name in ("method", "mIoU (%)", "pixel acc (%)", "GFLOPs/img", "latency (ms)", "Pareto"):
        methods.add_column(name, justify="left" if name == "method" else "right")
    for row in report["methods"]:
        mark = {True: "*", False: "", None: "-"}[row["pareto"]]
        name = escape(row["key"]) + (" (model)" if row["is_model"] else "")
        methods.add_row(name, pct(row["miou"]), pct(row["pixel_accuracy"]),
                        "-" if row["gflops"] is None else f"{row['gflops']:.3g}",
                        "-" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}", mark)
    console.print(methods)
    sizes = Table(title="by object size (objects: connected components per class)")
    sizes.add_column("size")
    sizes.add_column("objects", justify="right")
    scales = report["scales"]
    bins = report["size_bins"]["bins"]
    with_weights = any(b["weight_mean"] is not None for b in bins)
    if with_weights:
        for s in scales:
            sizes.add_column(f"w {s:g}", justify="right")
    for s in scales:
        sizes.add_column(f"acc {s:g}", justify="right")
    sizes.add_column("acc merged", justify="right")
    sizes.add_column("gain", justify="right")
    for b in bins:
        cells = [escape(b["label"]), str(b["objects"])]
        if with_weights:
            cells += [f"{w:.3f}" for w in b["weight_mean"]] if b["weight_mean"] else ["-"] * len(scales)
        acc = b["accuracy"] or {}
        cells += [pct(acc.get(f"scale:{s:g}")) for s in scales]
        cells += [pct(acc.get(report["model"])), pct(b["gain"], signed=True)]
        sizes.add_row(*cells)
    console.print(sizes)
    for line in headlines(report):
        console.print(line, markup=False)
