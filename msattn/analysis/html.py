"""``index.html``: one self-contained page (plots embedded as base64 PNG, no external files or scripts)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from typing import Any

from msattn.analysis import plots
from msattn.analysis.terminal import headlines, pct

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.model td{font-weight:600}
img{max-width:100%;margin:.4em 0}.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
ul.head li{margin:.2em 0}.pos{color:#17692a}.neg{color:#a31b1b}
"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">({escape(alt)}: nothing to plot)</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None) -> str:
    """A table of already-formatted cells (strings are escaped here; numbers right-aligned)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = "".join(
            f'<td class="n">{escape(c)}</td>' if _numeric(c) else f"<td>{escape(str(c))}</td>" for c in row
        )
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _numeric(cell: Any) -> bool:
    text = str(cell).lstrip("+-")
    return bool(text) and (text.replace(".", "", 1).isdigit() or text == "-")


def _provenance(report: dict[str, Any]) -> str:
    prov = report["provenance"]
    rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)) for key, value in prov.items()]
    rows.insert(0, ("created", report["created"]))
    return _table(("what made this report", ""), rows)


def _methods(report: dict[str, Any]) -> str:
    rows, marks = [], []
    for m in report["methods"]:
        rows.append((m["key"] + (" (the model)" if m["is_model"] else ""), pct(m["miou"]), pct(m["pixel_accuracy"]),
                     "-" if m["gflops"] is None else f"{m['gflops']:.4g}",
                     "-" if m["latency_ms"] is None else f"{m['latency_ms']:.1f}",
                     {True: "yes", False: "", None: "-"}[m["pareto"]]))
        marks.append("model" if m["is_model"] else "")
    return _table(("method", "mIoU (%)", "pixel accuracy (%)", "GFLOPs / image", "latency (ms, bench)",
                   "Pareto front"), rows, marks)


def _by_class(report: dict[str, Any]) -> str:
    by_class = report["attention_by_class"]
    if not by_class:
        return '<p class="note">This model has no merge weights to show (one scale, or average merging).</p>'
    header = ["class", "pixels", *[f"w {s:g} (mean ± std)" for s in report["scales"]], "entropy"]
    rows = []
    for name, entry in by_class["classes"].items():
        if entry["mean"] is None:
            rows.append((name, "0", *["-"] * len(report["scales"]), "-"))
            continue
        rows.append((name, str(entry["pixels"]),
                     *[f"{m:.3f} ± {s:.3f}" for m, s in zip(entry["mean"], entry["std"])], f"{entry['entropy']:.3f}"))
    return _table(header, rows)


def _by_size(report: dict[str, Any]) -> str:
    scales, model = report["scales"], report["model"]
    bins = report["size_bins"]["bins"]
    with_w = any(b["weight_mean"] is not None for b in bins)
    header = ["object size", "objects", *([f"w {s:g}" for s in scales] if with_w else []),
              *[f"acc scale {s:g} (%)" for s in scales], f"acc {model} (%)", "best single", "gain (points)"]
    rows = []
    for b in bins:
        acc = b["accuracy"] or {}
        weights = ([f"{w:.3f}" for w in b["weight_mean"]] if b["weight_mean"] else ["-"] * len(scales)) if with_w else []
        rows.append((b["label"], str(b["objects"]), *weights, *[pct(acc.get(f"scale:{s:g}")) for s in scales],
                     pct(acc.get(model)), b["best_single"] or "-", pct(b["gain"], signed=True)))
    return _table(header, rows)


def _gain_by_class(report: dict[str, Any]) -> str:
    rows = [(name, pct(e["model"]), e["best_single_key"] or "-", pct(e["best_single"]), pct(e["gain"], signed=True))
            for name, e in report["merge_gain"]["per_class"].items()]
    return _table(("class", f"IoU {report['model']} (%)", "best single scale", "its IoU (%)", "gain (points)"), rows)


def _calibration(report: dict[str, Any]) -> str:
    rows = [(key, pct(e["ece"])) for key, e in report["calibration"]["maps"].items()]
    text = _table(("map", "ECE (%)"), rows)
    ent = report["attention_entropy"]
    if ent:
        gap = ent.get("score_gap") or {}
        items = [("mean normalised entropy (0 one scale, 1 uniform)", f"{ent['mean']:.3f}"),
                 ("pixels with entropy < 0.05 (near one-hot)", pct(ent["near_one_hot_share"]) + "%"),
                 *[(f"mean weight of scale {s}", f"{w:.3f}") for s, w in ent["mean_weight"].items()]]
        if gap:
            items += [("pre-softmax score spread, median (max - min over scales)", f"{gap['median']:g}"),
                      ("score spread, 90th percentile", f"{gap['p90']:g}"),
                      ("pixels with spread >= 10 (saturated softmax)", pct(gap["share_over_10"]) + "%")]
        text += _table(("attention weights", ""), items)
    return text


def _section(title: str, intro: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2><p class=\"note\">{escape(intro)}</p>" + "".join(parts)


def render_html(report: dict[str, Any], gallery: Sequence[bytes]) -> str:
    """The whole page."""
    prov = report["provenance"]
    title = f"msattn analyze: {prov['checkpoint']} on {prov['split']}"
    heads = "".join(f"<li>{escape(line)}</li>" for line in headlines(report))
    size_plot = plots.weights_by_size(report)
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>",
        f"<ul class=\"head\">{heads}</ul>",
        _section("1. Scale branches and merges",
                 "mIoU of every scale's own score map, of max and average merging of the same maps (any subset), of "
                 "the model's learned merge, and of the oracle (per pixel right when any scale is right).",
                 _methods(report)),
        _section("2. Attention by class", "Mean weight of every scale over each class's ground-truth pixels.",
                 _by_class(report), _img(plots.class_bars(report), "per-class IoU and weights")),
        _section("3. Attention by object size",
                 "Objects are connected components of each class in the ground truth, binned by area as a share of "
                 f"the image (skipped classes: {', '.join(report['object_classes_skipped']) or 'none'}).",
                 _img(size_plot, "weight per scale by object size"), _by_size(report)),
        _section("4. Where merging helps", "The model's IoU per class against the best single scale's.",
                 _gain_by_class(report)),
        _section("5. Which scales to keep", report["costs_note"] + "; the Pareto front is over mIoU and GFLOPs.",
                 _img(plots.pareto(report), "Pareto plot")),
        _section("6. Calibration and hedging",
                 "Expected calibration error of the predicted class probability; entropy of the merge weights.",
                 _calibration(report), _img(plots.reliability(report), "reliability diagram"),
                 _img(plots.entropy(report), "entropy of the weights")),
        _section("Gallery", "Images where merging gained and lost most pixel accuracy against the best single scale.",
                 *[_img(png, entry["id"]) for png, entry in zip(gallery, report["gallery"])]),
        "<h2>Provenance</h2>", _provenance(report), "</body></html>",
    ]
    return "\n".join(parts)
