"""The end of every ``prepare-data`` run: ``<split>.txt``, ``dataset.json``, ``prepare_report.json``, the summary.

Every source ends with one call, ``finish(target, results, RunInfo(...))``: the
:class:`~msattn.data.prepare.writer.Target` it wrote to, the results of its tasks (and of the items
it refused while parsing), and a :class:`RunInfo` saying where the data came from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from msattn import __version__
from msattn.data.prepare.common import (
    DONE,
    ERROR,
    IGNORE_INDEX,
    MISSING,
    OPTIONAL_SPLITS,
    SKIPPED,
    SPLITS,
    WRITTEN,
    PrepareSummary,
    Result,
    dedupe,
    make_console,
)  # fmt: skip
from msattn.data.prepare.output_folder import REPORT_NAME
from msattn.data.prepare.writer import Target, dataset_palette
from msattn.errors import DataError
from msattn.io import write_id_list, write_json


@dataclass(frozen=True)
class RunInfo:
    """What a source tells :func:`finish` besides its results.

    ``source``: named when nothing usable came out. ``sources``: ``dataset.json``'s ``sources``;
    ``extra``: more keys of ``dataset.json``. ``warnings`` are printed and written to the report,
    ``notes`` only written. ``unions`` names extra lists made of whole splits, e.g.
    ``{"trainval": ("train", "val")}``. ``why_empty``: split -> why the source gives it no ids,
    added to the warning of an empty split.
    """

    source: Path | str
    sources: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: Sequence[str] = ()
    notes: Sequence[str] = ()
    unions: dict[str, Sequence[str]] = field(default_factory=dict)
    why_empty: dict[str, str] = field(default_factory=dict)


def finish(target: Target, results: Sequence[Result], info: RunInfo) -> PrepareSummary:
    """Write the lists, ``dataset.json`` and the report; print the summary; fail if nothing is usable.

    A ``test`` split (results with split ``"test"``) gets a ``test.txt`` when it holds ids.
    """
    names = list(SPLITS) + [s for s in OPTIONAL_SPLITS if any(r.split == s for r in results)]
    summary = _collect(target, names, results, info.warnings)
    splits = summary.splits
    for split in SPLITS:
        if not splits[split] and any(splits.values()):
            why = info.why_empty.get(split)
            summary.warnings.append(f"the {split} split is empty" + (f" ({why})" if why else ""))
    report = {
        "missing": {f"{r.split}/{r.id}": r.message for r in summary.missing},
        "skipped": {f"{r.split}/{r.id}": r.message for r in summary.skipped},
        "errors": {f"{r.split}/{r.id}": r.message for r in summary.errors},
        "warnings": list(summary.warnings),
        "notes": list(info.notes),
    }
    write_json(target.out / REPORT_NAME, report)
    _print_summary(summary, results)

    if not any(splits.values()):
        first = (summary.errors or summary.missing or summary.skipped or [None])[0]
        detail = f"; first problem: {first.message}" if first is not None else ""
        raise DataError(
            f"{info.source}: nothing usable was produced ({len(summary.missing)} missing, "
            f"{len(summary.skipped)} skipped, {len(summary.errors)} unreadable{detail}); "
            f"full list in {target.out / REPORT_NAME}"
        )

    _write_dataset(target, summary, names, info)
    return summary


def _write_dataset(target: Target, summary: PrepareSummary, names: Sequence[str], info: RunInfo) -> None:
    """The id lists (``<split>.txt`` and the ``unions``) and ``dataset.json`` of a finished run."""
    out, splits = target.out, summary.splits
    for split in names:
        if split in SPLITS or splits[split]:
            write_id_list(out / f"{split}.txt", splits[split])
    for union, parts in info.unions.items():
        write_id_list(out / f"{union}.txt", dedupe([i for part in parts for i in splits[part]]))
    dataset = {
        "format": "msattn-dataset",
        "format_version": 1,
        "name": target.name,
        "classes": list(target.classes),
        "ignore_index": IGNORE_INDEX,
        "palette": dataset_palette(len(target.classes), target.palette),  # the colours of the label PNGs
        "counts": summary.counts,
        "sources": info.sources,
        "msattn_version": __version__,
    }
    dataset.update(info.extra)
    write_json(out / "dataset.json", dataset)


def _collect(
    target: Target, names: Sequence[str], results: Sequence[Result], warnings: Sequence[str]
) -> PrepareSummary:
    """Sort ``results`` into usable ids per split and the missing / skipped / error lists."""
    splits: dict[str, list[str]] = {split: [] for split in names}
    summary = PrepareSummary(name=target.name, out=target.out, splits=splits, warnings=list(warnings))
    for result in results:
        if result.status in (WRITTEN, DONE):
            if result.id not in splits[result.split]:
                splits[result.split].append(result.id)
            summary.written += result.status == WRITTEN
            summary.already_done += result.status == DONE
        elif result.status == MISSING:
            summary.missing.append(result)
        elif result.status == SKIPPED:
            summary.skipped.append(result)
        else:
            summary.errors.append(result)
    return summary


def _print_summary(summary: PrepareSummary, results: Sequence[Result]) -> None:
    """The table of counts per split (stdout), then the problems and warnings (stderr)."""
    table = Table(title=Text(f"prepare-data {summary.name} -> {summary.out}"), title_justify="left")  # verbatim
    for column in ("split", "usable", "written", "already done", "missing", "skipped", "errors"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in summary.splits:
        status = Counter(r.status for r in results if r.split == split)
        counts = (status[WRITTEN], status[DONE], status[MISSING], status[SKIPPED], status[ERROR])
        table.add_row(split, str(len(summary.splits[split])), *(str(n) for n in counts))
    make_console().print(table)
    err = make_console(stderr=True)
    for group, label in ((summary.missing, "missing"), (summary.skipped, "skipped")):
        for message, count in Counter(r.message for r in group).most_common():
            err.print(f"{label}: {count} id(s): {message}", markup=False, soft_wrap=True)
    for result in summary.errors[:10]:
        err.print(f"[red]error:[/red] {escape(result.message)}", soft_wrap=True, highlight=False)
    if len(summary.errors) > 10:
        err.print(f"... and {len(summary.errors) - 10} more errors", markup=False)
    if summary.missing or summary.skipped or summary.errors:
        err.print(f"full list of problems: {summary.out / REPORT_NAME}", markup=False, soft_wrap=True)
    for message in summary.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)
