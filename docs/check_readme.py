#!/usr/bin/env python3
"""README's demo numbers are what the code gives: run both demos and ``msattn analyze``, compare, fail on a difference.

    python docs/check_readme.py                    # ~5 min on 2 idle cores; exit 1 when a number differs
    python docs/check_readme.py --work W --update  # keep the runs in W, write the measured numbers into the docs
    python docs/check_readme.py --work W --reuse --plots   # no re-run; redraw the per-size weight plots

It runs README's commands in a scratch folder (``msattn train recipes/demo.toml``,
``msattn train recipes/demo-scales.toml``, then ``msattn analyze`` on each, with default settings)
and reads their ``eval.json`` and ``report.json``. Every documented number is a :class:`Claim`:
a sentence of README.md, docs/attention-collapse.md or a recipe, with ``{}`` where a number
stands, and how the number is computed from the runs. Each sentence is found in its document
(whitespace and line breaks free), the numbers written there are parsed out and compared, as
printed, with the measured ones: a number that moved, or a sentence that no longer reads as the
claim says, fails the check. ``--update`` writes the measured numbers in instead.

The demos are deterministic on CPU (the same numbers run after run with one torch build and
thread count); the check pins 2 threads (``--threads``), as README's measurements used. Other
CPUs or torch builds can round differently: ``--tolerance`` (points) allows for that.
CI (``.ci/run``) runs it after the test suite; ``tests/test_check_readme.py`` checks the claims
that need no run (geometry) and that every sentence is still in its document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([+-]?\d+(?:\.\d+)?)"
#: the demos README documents: run name -> recipe (README's commands), report folder
DEMOS = {"demo": ("recipes/demo.toml", "report"), "demo-scales": ("recipes/demo-scales.toml", "report-scales")}
PLOTS = {"demo": "docs/demo-attention-by-size.png", "demo-scales": "docs/demo-scales-attention-by-size.png"}

Runs = dict[str, dict[str, Any]]  # demo name -> {"eval": eval.json, "report": report.json}


# ----------------------------------------------------------------------------- what the runs measured


def pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}"


def signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def method(runs: Runs, demo: str, key: str) -> dict[str, Any]:
    """A row of report.json's methods: ``scale:2``, ``max``, ``avg``, ``oracle`` or ``model`` (the learned merge)."""
    report = runs[demo]["report"]
    if key == "model":
        key = report["model"]
    elif key in ("max", "avg", "oracle"):
        key = f"{key}:" + "+".join(f"{s:g}" for s in report["scales"])
    return next(m for m in report["methods"] if m["key"] == key)


def miou(runs: Runs, demo: str, key: str, digits: int = 2) -> str:
    return pct(method(runs, demo, key)["miou"], digits)


def size_bin(runs: Runs, demo: str, label: str) -> dict[str, Any]:
    return next(b for b in runs[demo]["report"]["size_bins"]["bins"] if b["label"] == label)


def weight(runs: Runs, demo: str, label: str, scale: float) -> float:
    return size_bin(runs, demo, label)["weight_mean"][runs[demo]["report"]["scales"].index(scale)]


def accuracy(runs: Runs, demo: str, label: str, scale: float) -> str:
    return pct(size_bin(runs, demo, label)["accuracy"][f"scale:{scale:g}"], 0)


def filled_bins(runs: Runs, demo: str) -> list[str]:
    return [b["label"] for b in runs[demo]["report"]["size_bins"]["bins"] if b["objects"]]


def weight_range(runs: Runs, demo: str, labels: list[str], scale: float) -> tuple[str, str]:
    values = [weight(runs, demo, label, scale) for label in labels]
    return f"{min(values):.2f}", f"{max(values):.2f}"


def score_map_side(image_side: int) -> str:
    """The scale-1 score map of an image of this side, padded to 8k+1 (msattn.geometry's rule)."""
    from msattn.geometry import grid_side, output_side

    return str(output_side(grid_side(image_side)))


# ----------------------------------------------------------------------------- the claims


@dataclass(frozen=True)
class Claim:
    """A sentence of ``doc`` with ``{}`` for each number, and the numbers the code gives for it, as printed."""

    doc: str
    text: str
    values: Callable[[Runs], tuple[str, ...]]
    needs_runs: bool = True

    @property
    def pattern(self) -> re.Pattern[str]:
        pieces = [re.escape(piece) for piece in self.text.split("{}")]
        spaced = [re.sub(r"(\\ |\n)+", r"\\s+", piece) for piece in pieces]  # a line break reads as a space
        return re.compile(NUMBER.join(spaced))


def _demo_table(name: str) -> Claim:
    per_class = "background head torso arms legs".split()
    return Claim("README.md", f"│ {name} │ {{}} │", lambda r: (pct(
        r["demo"]["eval"]["per_class"][name] if name in per_class
        else r["demo"]["eval"]["miou" if name == "mean IoU" else "pixel_accuracy"]),))  # fmt: skip


def _readme_demo() -> list[Claim]:
    d = "demo"
    return [
        Claim("README.md", "reaches a mean IoU of about {}% and ends with", lambda r: (pct(r[d]["eval"]["miou"], 0),)),
        *[_demo_table(n) for n in ("background", "head", "torso", "arms", "legs", "mean IoU", "pixel accuracy")],
        Claim("README.md", "mIoU {}% on {} val images (last.pt)",
              lambda r: (pct(r[d]["eval"]["miou"]), str(r[d]["eval"]["num_images"]))),
        Claim("README.md", "(a 96-pixel image, padded to {}, gives only a {}x{} score map at output stride 8)",
              lambda r: ("97", score_map_side(96), score_map_side(96)), needs_runs=False),
        Claim("README.md", "`report/index.html` on the demo model above ({} val images, {} objects)",
              lambda r: (str(r[d]["report"]["provenance"]["images"]), str(r[d]["report"]["size_bins"]["objects"]))),
        Claim("README.md", "scale 2 alone {}% mIoU, scale 1 alone {}%, max merging {}%, average {}%, attention "
              "{}%, oracle {}%.", lambda r: tuple(miou(r, d, k) for k in ("scale:2", "scale:1", "max", "avg", "model",
                                                                          "oracle"))),  # fmt: skip
        Claim("README.md", "attention matches it ({});", lambda r: (signed(
            100 * (method(r, d, "model")["miou"] - method(r, d, "scale:2")["miou"])),)),  # fmt: skip
        Claim("README.md", "the oracle is {} points higher", lambda r: (
            f"{100 * (method(r, d, 'oracle')['miou'] - method(r, d, 'model')['miou']):.1f}",)),  # fmt: skip
        Claim("README.md", "the weight of scale 2 is {}-{} in every bin",
              lambda r: weight_range(r, d, filled_bins(r, d), 2.0)),
        Claim("README.md", "({}% vs {}% on objects under 0.5% of the image, {}% vs {}% on 8-32%)", lambda r: (
            accuracy(r, d, "<0.5%", 2.0), accuracy(r, d, "<0.5%", 1.0),
            accuracy(r, d, "8-32%", 2.0), accuracy(r, d, "8-32%", 1.0))),  # fmt: skip
        Claim("README.md", "scale 1 ({} GFLOPs), scale 2 ({}) and attention ({}) are on the Pareto front; max and "
              "average merging ({}) are not", lambda r: tuple(f"{method(r, d, k)['gflops']:.2f}" for k in (
                  "scale:1", "scale:2", "model", "max"))),  # fmt: skip
        Claim("README.md", "**Calibration**: ECE {}%; the weights are confident (entropy {}, {}% of pixels near "
              "one-hot), with a pre-softmax score gap of {} (median; {} at the 90th percentile)", _calibration),
        Claim("README.md", "raised the demo from 64.20% to {}% mIoU", lambda r: (miou(r, d, "model"),)),
    ]


def _calibration(r: Runs) -> tuple[str, ...]:
    report = r["demo"]["report"]
    entropy, gap = report["attention_entropy"], report["attention_entropy"]["score_gap"]
    return (pct(report["calibration"]["maps"][report["model"]]["ece"]), f"{entropy['mean']:.2f}",
            pct(entropy["near_one_hot_share"], 0), f"{gap['median']:g}", f"{gap['p90']:g}")  # fmt: skip


def _readme_scales() -> list[Claim]:
    s = "demo-scales"
    return [
        Claim("README.md", "It reaches {}% mIoU, a harder task", lambda r: (pct(r[s]["eval"]["miou"], 1),)),
        Claim("README.md", "scale 2 (the finer input) takes {}-{} of the weight on parts under 2% of the image, "
              "scale 1 (the coarser) {} on parts of 8-32% and {} above 32% (correlation of scale 1's weight with "
              "log object size {};", lambda r: (
                  *weight_range(r, s, ["<0.5%", "0.5-2%"], 2.0), f"{weight(r, s, '8-32%', 1.0):.2f}",
                  f"{weight(r, s, '>=32%', 1.0):.2f}", signed(r[s]["report"]["size_bins"]["weight_size_correlation"][
                      "1"]))),  # fmt: skip
        Claim("README.md", "on parts of 0.5-2% the finer branch is right on {}% of the pixels and the coarser on {}%; "
              "on 8-32% it is {}% against {}%.", lambda r: (
                  accuracy(r, s, "0.5-2%", 2.0), accuracy(r, s, "0.5-2%", 1.0),
                  accuracy(r, s, "8-32%", 2.0), accuracy(r, s, "8-32%", 1.0))),  # fmt: skip
        Claim("README.md", "**Attention beats fixed merging**: {}% mIoU against {}% for average and {}% for max "
              "merging of the same two maps, and {}% / {}% for either scale alone (oracle {}%).", lambda r: tuple(
                  miou(r, s, k) for k in ("model", "avg", "max", "scale:2", "scale:1", "oracle"))),  # fmt: skip
    ]


def _collapse_doc() -> list[Claim]:
    doc, d, s = "docs/attention-collapse.md", "demo", "demo-scales"
    return [
        Claim(doc, "| demo_final | {} | {} | {} | {} | {} | {}% | {} {} {} {} | {}/{} {}/{} {}/{} {}/{} |", lambda r: (
            *(miou(r, d, k) for k in ("model", "scale:2", "scale:1", "oracle")),
            f"{r[d]['report']['attention_entropy']['mean']:.2f}",
            pct(r[d]["report"]["attention_entropy"]["near_one_hot_share"], 0),
            *(f"{weight(r, d, b, 1.0):.2f}" for b in filled_bins(r, d)),
            *(a for b in filled_bins(r, d) for a in (accuracy(r, d, b, 2.0), accuracy(r, d, b, 1.0))))),  # fmt: skip
        Claim(doc, "The demo before/after: 64.20% (64.12% re-run) -> **{}%** mIoU", lambda r: (miou(r, d, "model"),)),
        Claim(doc, "| demo-scales | {} | {} | {} | {} | {} | {} {} {} {} {} | {}/{} {}/{} {}/{} {}/{} {}/{} | {} |",
              lambda r: (
                  *(miou(r, s, k) for k in ("model", "scale:2", "scale:1", "avg", "oracle")),
                  *(f"{weight(r, s, b, 1.0):.2f}" for b in filled_bins(r, s)),
                  *(a for b in filled_bins(r, s) for a in (accuracy(r, s, b, 2.0), accuracy(r, s, b, 1.0))),
                  signed(r[s]["report"]["size_bins"]["weight_size_correlation"]["1"]))),  # fmt: skip
        Claim(doc, "Accuracy is lower than the coloured demo's (about {}% mIoU): the task is harder.",
              lambda r: (pct(r[s]["eval"]["miou"], 0),)),
    ]


def _recipes() -> list[Claim]:
    return [
        Claim("recipes/demo.toml", "A 96-px image (padded to {}) gives only a {}x{} score map",
              lambda r: ("97", score_map_side(96), score_map_side(96)), needs_runs=False),
        Claim("recipes/demo-scales.toml", "Accuracy is lower than the coloured demo's (about {}% mIoU)",
              lambda r: (pct(r["demo-scales"]["eval"]["miou"], 0),)),
    ]


CLAIMS: list[Claim] = [*_readme_demo(), *_readme_scales(), *_collapse_doc(), *_recipes()]


# ----------------------------------------------------------------------------- comparing and updating


@dataclass
class Finding:
    claim: Claim
    written: tuple[str, ...] | None  # None: the sentence is not in the document
    measured: tuple[str, ...] | None  # None: not computed (no runs)
    spans: tuple[tuple[int, int], ...] = ()

    def differs(self, tolerance: float) -> bool:
        if self.written is None:
            return True
        if self.measured is None:
            return False
        return any(w != m and not (tolerance and abs(float(w) - float(m)) <= tolerance)
                   for w, m in zip(self.written, self.measured))  # fmt: skip


def read_claim(claim: Claim, text: str) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]] | None:
    """The numbers the document writes for ``claim`` and where they stand; None unless the sentence occurs once."""
    matches = list(claim.pattern.finditer(text))
    if len(matches) != 1:
        return None
    match = matches[0]
    return match.groups(), tuple(match.span(i) for i in range(1, len(match.groups()) + 1))


def compare(runs: Runs | None, claims: list[Claim] = CLAIMS, root: Path = ROOT) -> list[Finding]:
    """Every claim: the numbers written, the numbers measured (only claims needing no runs when ``runs`` is None)."""
    texts: dict[str, str] = {}
    findings = []
    for claim in claims:
        text = texts.setdefault(claim.doc, (root / claim.doc).read_text(encoding="utf-8"))
        found = read_claim(claim, text)
        measured = claim.values(runs) if (runs is not None or not claim.needs_runs) else None
        written, spans = found if found else (None, ())
        findings.append(Finding(claim, written, measured, spans))
    return findings


def update(findings: list[Finding], root: Path = ROOT) -> list[str]:
    """Write the measured numbers into the documents; returns the documents changed."""
    changed = []
    for doc in dict.fromkeys(f.claim.doc for f in findings):
        path = root / doc
        text = path.read_text(encoding="utf-8")
        edits = sorted((span, new) for f in findings if f.claim.doc == doc and f.written and f.measured
                       for span, old, new in zip(f.spans, f.written, f.measured) if old != new)  # fmt: skip
        for (start, end), new in reversed(edits):
            text = text[:start] + new + text[end:]
        if edits:
            path.write_text(text, encoding="utf-8")
            changed.append(doc)
    return changed


def report_findings(findings: list[Finding], tolerance: float) -> int:
    """Print every difference; returns the number of failing claims."""
    failures = 0
    for f in findings:
        if not f.differs(tolerance):
            continue
        failures += 1
        head = f"{f.claim.doc}: {f.claim.text!r}"
        if f.written is None:
            print(f"{head}\n  the sentence is not in the document (or not once): edit it back, or the claim in "
                  f"{Path(__file__).relative_to(ROOT)}", file=sys.stderr)  # fmt: skip
        else:
            print(f"{head}\n  written  {' '.join(f.written)}\n  measured {' '.join(f.measured or ())}", file=sys.stderr)
    return failures


# ----------------------------------------------------------------------------- running the demos


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    src = str(ROOT)  # the checkout's msattn, whichever is installed
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _msattn(args: list[str], work: Path, env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ msattn {' '.join(args)}\n")
        handle.flush()
        result = subprocess.run([sys.executable, "-m", "msattn.cli", *args], cwd=work, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if result.returncode:
        sys.exit(f"check_readme: msattn {' '.join(args)} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def run_demos(work: Path, threads: int, reuse: bool) -> Runs:
    """README's commands in ``work`` (data/, runs/, report folders there); their eval.json and report.json."""
    work.mkdir(parents=True, exist_ok=True)
    env, log = _env(threads), work / "check_readme.log"
    runs: Runs = {}
    for name, (recipe, report_dir) in DEMOS.items():
        run, report = work / "runs" / name, work / report_dir
        if not (reuse and (run / "eval.json").is_file()):
            seconds = _msattn(["train", str(ROOT / recipe), "--out", str(run), "--overwrite"], work, env, log)
            print(f"check_readme: msattn train {recipe}: {seconds:.0f} s", file=sys.stderr)
        if not (reuse and (report / "report.json").is_file()):
            seconds = _msattn(["analyze", "--checkpoint", str(run / "last.pt"), "--out", str(report)], work, env, log)
            print(f"check_readme: msattn analyze ({name}): {seconds:.0f} s", file=sys.stderr)
        runs[name] = {"eval": json.loads((run / "eval.json").read_text()),
                      "report": json.loads((report / "report.json").read_text())}  # fmt: skip
    return runs


def draw_plots(runs: Runs) -> None:
    """The per-size weight plots README shows, from the reports (``msattn analyze``'s own plot)."""
    from msattn.analysis.plots import weights_by_size

    for name, path in PLOTS.items():
        (ROOT / path).write_bytes(weights_by_size(runs[name]["report"]))
        print(f"check_readme: wrote {path}", file=sys.stderr)


@contextlib.contextmanager
def _work_folder(arg: str | None) -> Iterator[Path]:
    """``--work``, or a temporary folder removed afterwards."""
    if arg:
        yield Path(arg).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="check-readme-") as folder:
        yield Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the data, runs and reports (kept; default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep runs and reports already in --work")
    parser.add_argument("--update", action="store_true", help="write the measured numbers into the documents")
    parser.add_argument("--plots", action="store_true", help="redraw README's per-size weight plots")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the runs (default 2, as README's)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed difference, in printed units")
    parser.add_argument("--static", action="store_true", help="only the claims that need no run (seconds)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # msattn.geometry and the plots: the checkout's code
    if args.static:
        findings = compare(None)
        return 1 if report_findings(findings, 0.0) else 0
    with _work_folder(args.work) as work:
        runs = run_demos(work, args.threads, args.reuse)
    findings = compare(runs)
    if args.plots:
        draw_plots(runs)
    if args.update:
        changed = update(findings)
        print(f"check_readme: updated {', '.join(changed) or 'nothing'}", file=sys.stderr)
        findings = compare(runs)
    failures = report_findings(findings, args.tolerance)
    print(f"check_readme: {len(findings) - failures}/{len(findings)} documented claims match the code"
          f"{f'; {failures} differ' if failures else ''}", file=sys.stderr)  # fmt: skip
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
