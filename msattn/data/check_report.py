"""``msattn check-data``: run :func:`msattn.data.check.check_dataset`, print Rich tables, write JSON/HTML.

The HTML report (``--report DIR``) is one self-contained ``index.html`` (plots embedded as base64
PNG, drawn with matplotlib: ``pip install "msattn[report]"``) next to ``report.json``.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from msattn.data.check import ERROR, OBJECT_BINS, CheckReport, check_dataset
from msattn.data.prepare.common import make_console
from msattn.errors import DataCheckError, DependencyError
from msattn.io import write_json, write_text


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or :class:`DependencyError` saying what to install."""
    try:  # an optional dependency (msattn[report]), imported only for --report
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError('--report needs matplotlib: pip install "msattn[report]"') from None
    return plt


def grouped(report: CheckReport) -> list[tuple[str, str, int, str]]:
    """(level, code, count, first finding) per kind of finding, errors first."""
    counts: Counter = Counter((f.level, f.code) for f in report.findings)
    first = {}
    for finding in report.findings:
        first.setdefault((finding.level, finding.code), str(finding))
    keys = sorted(counts, key=lambda k: (k[0] != ERROR, -counts[k], k[1]))
    return [(level, code, counts[(level, code)], first[(level, code)]) for level, code in keys]


def _share(values: Sequence[int], total: int) -> str:
    return f"{100.0 * sum(values) / total:.2f}" if total else "-"


def print_report(report: CheckReport, console: Any) -> None:
    """The findings, the classes, the image sizes and the object sizes as Rich tables."""
    checked = ", ".join(f"{s} {n}" + (f"/{report.splits[s]}" if n < report.splits[s] else "") for s, n in report.checked.items())
    console.print(f"check-data {report.root}: {len(report.classes)} classes; images checked: {checked}", markup=False)
    if report.findings:
        table = Table(title="findings", title_justify="left")
        for column in ("level", "kind", "count", "first"):
            table.add_column(column, justify="right" if column == "count" else "left", overflow="fold")
        for level, code, count, first in grouped(report):
            table.add_row(f"[red]{level}[/red]" if level == ERROR else f"[yellow]{level}[/yellow]", code, str(count),
                          escape(first))
        console.print(table)
    splits = list(report.class_pixels)
    table = Table(title="classes", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(f"{split} pixels %", justify="right")
        table.add_column(f"{split} images", justify="right")
    for index, name in enumerate(report.classes):
        row = [f"{index} {name}"]
        for split in splits:
            total = sum(report.class_pixels[split]) + report.ignore_pixels[split]
            row += [_share([report.class_pixels[split][index]], total), str(report.class_images[split][index])]
        table.add_row(*row)
    ignore_row = [f"{report.ignore_index} ignore"]
    for split in splits:
        total = sum(report.class_pixels[split]) + report.ignore_pixels[split]
        ignore_row += [_share([report.ignore_pixels[split]], total), ""]
    table.add_row(*ignore_row)
    console.print(table)
    console.print(size_summary(report), markup=False)
    console.print(_objects_table(report))


def size_summary(report: CheckReport) -> str:
    """One line: the most common image sizes and the range of sides."""
    if not report.image_sizes:
        return "image sizes: none read"
    common = ", ".join(f"{w}x{h} ({n})" for w, h, n in report.image_sizes[:5])
    sides = [s for w, h, _ in report.image_sizes for s in (w, h)]
    more = f" and {len(report.image_sizes) - 5} more sizes" if len(report.image_sizes) > 5 else ""
    return f"image sizes: {common}{more}; sides {min(sides)}..{max(sides)} px"


def _objects_table(report: CheckReport) -> Any:
    table = Table(title="objects (connected components per class)", title_justify="left")
    for column in ("class", "objects", "median area (px)", "< 16 px", "< 1024 px", ">= 65536 px"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for index, name in enumerate(report.classes):
        hist = report.object_sizes[index]
        total = sum(hist)
        if not total:
            table.add_row(f"{index} {name}", "0", "-", "-", "-", "-")
            continue
        running, median = 0, 0
        for k, n in enumerate(hist):
            running += n
            if running * 2 >= total:
                median = k
                break
        pct = lambda lo, hi: f"{100.0 * sum(hist[lo:hi]) / total:.1f}%"  # noqa: E731
        table.add_row(f"{index} {name}", str(total), f"~{2 ** median}-{2 ** (median + 1) - 1}", pct(0, 4), pct(0, 10), pct(16, OBJECT_BINS))
    return table


# ----------------------------------------------------------------------------- HTML


def _figure_png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: CheckReport, plt: Any) -> list[tuple[str, str]]:
    """(title, base64 PNG) of every plot."""
    plots, names, x = [], report.classes, np.arange(len(report.classes))
    width = 0.8 / max(1, len(report.class_pixels))
    for key, title in (("class_pixels", "pixel share per class (%)"), ("class_images", "images containing each class")):
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.5))
        for n, (split, values) in enumerate(getattr(report, key).items()):
            total = sum(values) + report.ignore_pixels[split] if key == "class_pixels" else 1
            shown = [100.0 * v / total if key == "class_pixels" and total else v for v in values]
            ax.bar(x + n * width, shown, width, label=split)
        ax.set_xticks(x + width * (len(report.class_pixels) - 1) / 2, names, rotation=60, ha="right")
        ax.legend()
        plots.append((title, _figure_png(fig)))
        plt.close(fig)
    if report.image_sizes:
        fig, ax = plt.subplots(figsize=(5, 4))
        ws, hs, ns = zip(*report.image_sizes)
        ax.scatter(ws, hs, s=[10 + 40 * np.log1p(n) for n in ns], alpha=0.6)
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
        plots.append(("image sizes (marker area grows with the count)", _figure_png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(names))))
    hist = np.array(report.object_sizes, dtype=float)
    ax.imshow(np.log1p(hist), aspect="auto", cmap="viridis")
    ax.set_yticks(x, names)
    ax.set_xticks(range(0, OBJECT_BINS, 4), [f"2^{k}" for k in range(0, OBJECT_BINS, 4)])
    ax.set_xlabel("object area (px, log2 bins); colour: log(1 + count)")
    plots.append(("object sizes per class (connected components)", _figure_png(fig)))
    plt.close(fig)
    return plots


def write_html(report: CheckReport, folder: Path, plt: Any) -> Path:
    """``folder/index.html`` (self-contained) and ``folder/report.json``; returns the HTML path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", report.to_dict())
    rows = "".join(f"<tr><td>{level}</td><td>{code}</td><td>{count}</td><td>{html.escape(first)}</td></tr>"
                   for level, code, count, first in grouped(report))  # fmt: skip
    figures = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                      for title, data in _plots(report, plt))  # fmt: skip
    status = "ok" if report.ok else "errors found"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>check-data report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "table{border-collapse:collapse}img{max-width:100%}</style></head><body>"
        f"<h1>check-data: {html.escape(str(report.root))} ({status})</h1><p>{html.escape(report.summary_line())}</p>"
        f"<p>{html.escape(size_summary(report))}</p>"
        f"<h2>findings</h2><table><tr><th>level</th><th>kind</th><th>count</th><th>first</th></tr>{rows}</table>"
        f"{figures}<p>every number: report.json</p></body></html>\n"
    )
    write_text(folder / "index.html", page)
    return folder / "index.html"


def check_data_command(
    root: Path, full: bool = False, report_dir: Path | None = None, json_path: Path | None = None,
    splits: Sequence[str] | None = None, num_classes: int | None = None, workers: int = 2,
) -> CheckReport:  # fmt: skip
    """The ``check-data`` command: check, print, write; raise :class:`DataCheckError` on errors."""
    plt = require_matplotlib() if report_dir is not None else None
    report = check_dataset(root, splits=splits or None, num_classes=num_classes, full=full, workers=workers, progress=True)
    console = make_console()
    print_report(report, console)
    if json_path is not None:
        write_json(json_path, report.to_dict())
    if report_dir is not None:
        console.print(f"report: {write_html(report, report_dir, plt)}", markup=False, soft_wrap=True)
    if not report.ok:
        raise DataCheckError(report.summary_line())
    console.print(report.summary_line(), markup=False, soft_wrap=True)
    return report
