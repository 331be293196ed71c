"""The table of docs/hierarchical-attention.md, rebuilt from the run folders (re-run it on an idle machine).

    python docs/hierarchical_table.py --runs runs/hier            # mIoU and the runs' own img/s
    python docs/hierarchical_table.py --runs runs/hier --time     # + interleaved timing on this machine
    python docs/hierarchical_table.py --runs runs/hier --analyze  # + msattn analyze, the per-size plots

Every run folder is ``<runs>/<name>`` of one ``msattn train`` command (``TRAININGS`` below, also
printed for runs that are missing). For each row the script runs ``msattn evaluate`` on the
run's ``last.pt`` at the row's scales (deterministic; the JSON is kept in ``<out>`` and reused)
and reads the training speed the run logged (median ``images_per_s`` of ``metrics.jsonl``).
``--time`` measures on this machine, in interleaved rounds (every row once per round, so load
from other processes weighs on all rows alike): inference ms per image (batch 1, the demo's
97x97 padded input, the row's scales) and training images/s (the engine's step, batch 10,
97x97 crops, each run's own model). ``--analyze`` runs ``msattn analyze`` on the runs named in
``ANALYZED`` and writes each report's weight-by-size plot as a PNG. Results: ``<out>/table.md``
and ``<out>/table.json`` (with the commands, versions and load).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMO = "recipes/demo-scales.toml"
HIER = "recipes/demo-scales-hier.toml"
#: run name -> the ``msattn train`` arguments that make it (all on data/demo-silhouettes, seed 0)
TRAININGS = {
    "single-1": [DEMO, "--set", "model.scales=[1.0]"],
    "single-2": [DEMO, "--set", "model.scales=[2.0]"],
    "max-2": [DEMO, "--set", "model.merge=max"],
    "avg-2": [DEMO, "--set", "model.merge=avg"],
    "attention-2": [DEMO],
    "attention-3": [DEMO, "--set", "model.scales=[2.0,1.0,0.5]"],
    "hier-1-0.5": [HIER, "--set", "model.scales=[1.0,0.5]"],
    "hier-2-1": [HIER],  # the recipe as it is
    # what might let the chain use scales it did not train on: random rescaling as NVIDIA's 0.5-2.0,
    # a faster gate head
    "hier-1-0.5-aug": [HIER, "--set", "model.scales=[1.0,0.5]", "--set", "data.scale_range=[0.5,2.0]"],
    "hier-2-1-aug": [HIER, "--set", "data.scale_range=[0.5,2.0]"],
    "hier-2-1-lr1": [HIER, "--set", "optim.attention_lr_mult=1.0"],
}
#: (row label, run name, test-time scales)
ROWS = [
    ("single scale 1", "single-1", (1.0,)),
    ("single scale 2", "single-2", (2.0,)),
    ("max {2, 1}", "max-2", (2.0, 1.0)),
    ("avg {2, 1}", "avg-2", (2.0, 1.0)),
    ("attention {2, 1} (demo-scales.toml)", "attention-2", (2.0, 1.0)),
    ("attention {2, 1, 0.5}", "attention-3", (2.0, 1.0, 0.5)),
    ("hierarchical {1, 0.5} -> {1, 0.5}", "hier-1-0.5", (1.0, 0.5)),
    ("hierarchical {1, 0.5} -> {2, 1, 0.5}", "hier-1-0.5", (2.0, 1.0, 0.5)),
    ("hierarchical {1, 0.5} -> {2, 1, 0.5, 0.25}", "hier-1-0.5", (2.0, 1.0, 0.5, 0.25)),
    ("hierarchical {2, 1} -> {2, 1} (demo-scales-hier.toml)", "hier-2-1", (2.0, 1.0)),
    ("hierarchical {2, 1} -> {2, 1, 0.5}", "hier-2-1", (2.0, 1.0, 0.5)),
    ("hierarchical {2, 1} -> {2, 1, 0.5, 0.25}", "hier-2-1", (2.0, 1.0, 0.5, 0.25)),
    ("hierarchical {1, 0.5}, rescaling 0.5-2 -> {1, 0.5}", "hier-1-0.5-aug", (1.0, 0.5)),
    ("hierarchical {1, 0.5}, rescaling 0.5-2 -> {2, 1, 0.5}", "hier-1-0.5-aug", (2.0, 1.0, 0.5)),
    ("hierarchical {2, 1}, rescaling 0.5-2 -> {2, 1}", "hier-2-1-aug", (2.0, 1.0)),
    ("hierarchical {2, 1}, rescaling 0.5-2 -> {2, 1, 0.5}", "hier-2-1-aug", (2.0, 1.0, 0.5)),
    ("hierarchical {2, 1}, gate lr x1 -> {2, 1}", "hier-2-1-lr1", (2.0, 1.0)),
    ("hierarchical {2, 1}, gate lr x1 -> {2, 1, 0.5}", "hier-2-1-lr1", (2.0, 1.0, 0.5)),
]
#: runs whose ``msattn analyze`` report (and per-size plot) --analyze makes, at these scales
ANALYZED = {"attention-2": (2.0, 1.0), "hier-1-0.5": (2.0, 1.0, 0.5), "hier-2-1": (2.0, 1.0, 0.5),
            "hier-2-1-lr1": (2.0, 1.0, 0.5)}
SIDE = 97  # the demo's 96-pixel images padded to 8k+1


def msattn(*args: str) -> list[str]:
    return [sys.executable, "-m", "msattn.cli", *args]


def scales_text(scales: tuple[float, ...]) -> str:
    return "+".join(f"{s:g}" for s in scales)


def evaluate(run: Path, scales: tuple[float, ...], out: Path) -> dict | None:
    """``msattn evaluate`` of the run's last.pt at ``scales`` (kept in ``out`` and reused)."""
    path = out / f"{run.name}@{scales_text(scales)}.json"
    if not path.is_file() or path.stat().st_mtime < (run / "last.pt").stat().st_mtime:  # none yet, or stale
        args = ["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--json", str(path)]
        for s in scales:
            args += ["--scales", f"{s:g}"]
        subprocess.run(msattn(*args), check=True, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def finished(run: Path) -> bool:
    """The run trained to its end: ``eval.json`` (written after the last iteration) newer than ``last.pt``."""
    done, last = run / "eval.json", run / "last.pt"
    return done.is_file() and last.is_file() and done.stat().st_mtime >= last.stat().st_mtime


def logged_speed(run: Path) -> float | None:
    """Median images/s over the run's metrics.jsonl lines (as measured while it trained)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["images_per_s"] for r in lines if "images_per_s" in r]
    return statistics.median(speeds) if speeds else None


def load_model(run: Path) -> torch.nn.Module:
    from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(run / "last.pt"), run / "last.pt")


def time_rows(rows: list[tuple[str, Path, tuple[float, ...]]], rounds: int) -> dict[str, float]:
    """Inference ms per image (batch 1, SIDE x SIDE) of every row, median over interleaved rounds."""
    models = {run: load_model(run).eval() for _, run, _ in rows}
    x = torch.randn(1, 3, SIDE, SIDE)
    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    with torch.inference_mode():
        for round_ in range(rounds + 2):  # two warm-up rounds
            for label, run, scales in rows:
                start = time.perf_counter()
                models[run](x, scales=scales)
                if round_ >= 2:
                    times[label].append(time.perf_counter() - start)
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}


def time_training(runs: list[Path], rounds: int) -> dict[str, float]:
    """Training images/s of every run's model (the engine's step, batch 10, SIDE crops), interleaved rounds."""
    from msattn.models.loss import segmentation_loss
    from msattn.models.params import param_groups
    from msattn.runtime.distributed import DistInfo
    from msattn.train.step import NonFiniteGuard, make_optimizer, train_step

    cpu = torch.device("cpu")
    batch = [{"image": torch.randn(10, 3, SIDE, SIDE), "label": torch.randint(0, 5, (10, SIDE, SIDE))}]
    steps = {}
    for run in runs:
        model = load_model(run).train()
        config = json.loads((run / "config.json").read_text())
        optimizer = make_optimizer(param_groups(model, 1e-3, 0.0), "adamw", 1e-3, 0.9, cpu)
        options = {"extra_supervision": config["model"]["extra_supervision"], "label_mode": "upsample",
                   "extra_supervision_weight": config["model"]["extra_supervision_weight"], "ignore_index": 255}
        steps[run.name] = (model, optimizer, options)
    times: dict[str, list[float]] = {run.name: [] for run in runs}
    for round_ in range(rounds + 1):  # one warm-up round
        for name, (model, optimizer, options) in steps.items():
            start = time.perf_counter()
            train_step(model, batch, optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=False),
                       guard=NonFiniteGuard(cpu), device=cpu, amp_dtype=None, channels_last=True,
                       loss_fn=segmentation_loss, loss_options=options, scales=tuple(model.scales),
                       info=DistInfo(device=cpu))  # fmt: skip
            if round_ >= 1:
                times[name].append(time.perf_counter() - start)
    return {name: 10 / statistics.median(t) for name, t in times.items()}


def analyze(runs: Path, out: Path) -> dict[str, dict]:
    """``msattn analyze`` of the ANALYZED runs; each report's weight-by-size plot as ``<out>/<run>-by-size.png``."""
    from msattn.analysis.plots import weights_by_size

    summaries = {}
    for name, scales in ANALYZED.items():
        run = runs / name
        if not finished(run):
            continue
        folder = out / f"analyze-{name}"
        args = ["analyze", "--checkpoint", str(run / "last.pt"), "--out", str(folder), "--device", "cpu"]
        for s in scales:
            args += ["--scales", f"{s:g}"]
        subprocess.run(msattn(*args), check=True, stdout=subprocess.DEVNULL)
        report = json.loads((folder / "report.json").read_text())
        png = weights_by_size(report)
        if png:
            (out / f"{name}-by-size.png").write_bytes(png)
        summaries[name] = {
            "methods": {m["key"]: m["miou"] for m in report["methods"]},
            "weights_by_size": [(b["label"], b["weight_mean"]) for b in report["size_bins"]["bins"]],
            "accuracy_by_size": [(b["label"], b["accuracy"]) for b in report["size_bins"]["bins"]],
            "correlation": report["size_bins"]["weight_size_correlation"],
            "gflops": {m["key"]: m["gflops"] for m in report["methods"]},
        }
    return summaries


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/hier"), help="folder of the run folders")
    parser.add_argument("--out", type=Path, default=None, help="where the results go (default: <runs>/table)")
    parser.add_argument("--time", action="store_true", help="time inference and training on this machine")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (--time)")
    parser.add_argument("--analyze", action="store_true", help="run msattn analyze and write the per-size plots")
    args = parser.parse_args()
    out = args.out or args.runs / "table"
    out.mkdir(parents=True, exist_ok=True)
    present = [(label, args.runs / run, scales) for label, run, scales in ROWS if finished(args.runs / run)]
    missing = sorted({run for _, run, _ in ROWS if not finished(args.runs / run)})
    load = os.getloadavg()
    timed = time_rows(present, args.rounds) if args.time and present else {}
    trained = time_training(sorted({run for _, run, _ in present}), max(3, args.rounds // 4)) if args.time else {}
    rows = []
    for label, run, scales in present:
        result = evaluate(run, scales, out)
        rows.append({"row": label, "run": run.name, "scales": list(scales), "miou": result["miou"],
                     "train_images_per_s_logged": logged_speed(run), "train_images_per_s": trained.get(run.name),
                     "inference_ms": timed.get(label)})  # fmt: skip
    lines = ["| model | mIoU (%) | train img/s (logged) | train img/s (timed) | inference ms/img |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {100 * r['miou']:.2f} | {fmt(r['train_images_per_s_logged'], '.2f')} | "
                     f"{fmt(r['train_images_per_s'], '.2f')} | {fmt(r['inference_ms'], '.1f')} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    for run in missing:
        print(f"not trained: {run}: {shlex.join(['msattn', 'train', *TRAININGS[run], '--out', str(args.runs / run)])}")
    analyses = analyze(args.runs, out) if args.analyze else {}
    record = {"rows": rows, "missing": missing, "trainings": TRAININGS, "analyses": analyses,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_before": load, "load_after": os.getloadavg(), "rounds": args.rounds,
              "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
