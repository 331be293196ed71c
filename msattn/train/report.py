"""What training tells the user: metrics.jsonl, TensorBoard, the console, validation and the final report.

Every user string (paths, dataset and class names) is printed without Rich markup, and every
score in the one format of :func:`msattn.runtime.metrics.format_miou` ("66.64%").
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from msattn.config.recipe import Recipe
from msattn.infer.options import InferenceOptions
from msattn.infer.scoring import evaluate_model, print_metrics_table
from msattn.io import write_json, write_text
from msattn.runtime.distributed import DistInfo, all_reduce_mean
from msattn.runtime.metrics import format_miou, json_safe
from msattn.train.stream import rng_neutral


class MetricsLog:
    """metrics.jsonl (one JSON object a line, flushed) and TensorBoard scalars when tensorboard is installed.

    Nothing is written until :meth:`open` (called after the first finished step). On resume,
    lines after the checkpoint's iteration (written by the killed run) and a half-written
    last line are dropped, and TensorBoard purges its events after that iteration. The
    TensorBoard writer is created at the first record.
    """

    def __init__(self, out_dir: Path, start: int, enabled: bool = True) -> None:
        self.out_dir, self.start, self.enabled = out_dir, start, enabled
        self.handle: Any = None
        self.tb: Any = None
        self._tb_tried = False

    def open(self) -> None:
        if not self.enabled or self.handle is not None:
            return
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if self.start > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("iteration", 0) <= self.start:
                    kept.append(json.dumps(record))
        write_text(path, "".join(line + "\n" for line in kept))
        self.handle = path.open("a", encoding="utf-8")

    def _tensorboard(self) -> Any:
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.start or None)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None
        return self.tb

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self.handle is None:
            return
        self.handle.write(json.dumps(json_safe(record)) + "\n")
        self.handle.flush()
        tb = self._tensorboard()
        if tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class LossWindow:
    """Loss terms summed on the device between two log points (no host-device sync until :meth:`means`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.iterations = 0
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the window began."""
        return time.perf_counter() - self.started

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.iterations += 1

    def means(self, info: DistInfo) -> dict[str, float]:
        """The window's mean of every term over iterations and ranks (a collective); resets the window."""
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([torch.as_tensor(self.sums[n]) for n in names]) / self.iterations, info)
        self.sums, self.iterations, self.started = {}, 0, time.perf_counter()
        return {n: float(v) for n, v in zip(names, means.tolist())}


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


@contextlib.contextmanager
def progress_bar(console: Console, enabled: bool) -> Iterator[Any]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress


def run_validation(
    model: torch.nn.Module, dataset: Any, recipe: Recipe, dataset_info: Any, info: DistInfo
) -> dict[str, Any]:
    """Validation mIoU of the current weights (sharded over ranks, reduced); moves no RNG of the process.

    The recipe's ``[eval]`` with the training's autocast (``train.amp``), eager and never tiled.
    """
    options = InferenceOptions.from_recipe(recipe.eval, amp=recipe.train.amp)
    with rng_neutral(info.device):
        return evaluate_model(
            model, dataset, len(dataset_info.classes), list(dataset_info.classes), dataset_info.ignore_index, options,
            limit=recipe.eval.limit, dist=info, progress=False,
        )  # fmt: skip


def report_final(recipe: Recipe, out_dir: Path, metrics: dict[str, Any], dataset_info: Any, console: Console) -> None:
    """After training: eval.json, the per-class table, the mIoU and where everything is."""
    if not metrics:
        console.print("no validation split: nothing to report")
        return
    select = recipe.data.select_split
    report = {
        "checkpoint": str(out_dir / "last.pt"),
        "split": recipe.data.val_split,
        "best_checkpoint_selected_on": select,
        **metrics,
    }
    write_json(out_dir / "eval.json", json_safe(report))
    title = f"{dataset_info.name} {recipe.data.val_split}: last.pt"  # print_metrics_table prints it verbatim
    print_metrics_table(metrics, title=title, console=console)
    console.print(
        f"mIoU {format_miou(metrics['miou'])} on {metrics['num_images']} {recipe.data.val_split} images (last.pt)",
        markup=False,
    )
    best = "best.pt, " if (out_dir / "best.pt").is_file() else ""
    files = f"last.pt, {best}config.json, metrics.jsonl, eval.json"
    if select is not None:
        console.print(f"best.pt was chosen on the held-out split {select!r}; the score above is last.pt's",
                      markup=False)  # fmt: skip
    console.print(f"outputs: {out_dir}/ ({files})", markup=False)
