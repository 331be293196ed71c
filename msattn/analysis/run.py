"""``msattn analyze``: one pass of a checkpoint over a split -> report.json, index.html, terminal tables.

The pass is resumable: every ~30 s (and at the end) the sums so far are saved in
``<out>/analysis_state.pt`` with a fingerprint of everything that determines them (checkpoint
hash, dataset split, scales, size bins, image limit, ...). Re-running the same command
continues where it stopped; a finished pass is not repeated (only the report is rebuilt); a
state with another fingerprint is discarded and the pass starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Subset

from msattn import __version__
from msattn.analysis import summary
from msattn.analysis.accumulate import Accumulator, as_numpy, calibration_keys
from msattn.analysis.costs import method_costs, read_bench
from msattn.analysis.gallery import gallery
from msattn.analysis.html import render_html
from msattn.analysis.methods import (
    Method,
    build_methods,
    forward_maps,
    model_merge,
    own_method,
)
from msattn.analysis.objects import DEFAULT_BINS, check_bins
from msattn.analysis.terminal import print_headline
from msattn.data.datasets import SegmentationFolder
from msattn.data.info import read_dataset_info
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from msattn.errors import DataError, DependencyError, UsageError
from msattn.geometry import padded_size
from msattn.infer.options import InferenceOptions
from msattn.io import atomic_write, check_id, file_sha256, write_json, write_text
from msattn.locks import folder_lock
from msattn.models.spec import HIERARCHICAL, hierarchical_inference_problem
from msattn.runtime.checkpoint import checkpoint_recipe, load_checkpoint, model_from_checkpoint
from msattn.runtime.distributed import resolve_device
from msattn.runtime.metrics import json_safe

STATE_NAME = "analysis_state.pt"
REPORT_NAME = "report.json"
HTML_NAME = "index.html"
REPORT_FORMAT = "msattn-analysis"
REPORT_FORMAT_VERSION = 1
STATE_FORMAT = "msattn-analysis-state"
#: bump when the sums of a pass change meaning (old states are then discarded, not resumed)
STATE_VERSION = 1
SAVE_EVERY_S = 30.0


@dataclass
class Settings:
    """What the numbers of a report depend on (all of it goes into the fingerprint but ``batch_size``,
    ``workers``, ``device``, ``gallery`` and ``bench``, which change speed or presentation only)."""

    split: str = "val"
    scales: tuple[float, ...] | None = None
    max_images: int | None = None
    bins: tuple[float, ...] = DEFAULT_BINS
    include_background: bool = False
    amp: bool = True
    pad_to: int | None = None
    gallery: int = 4
    batch_size: int = 4
    workers: int = 0
    bench: str | None = None

    def fingerprinted(self) -> dict[str, Any]:
        keep = ("split", "scales", "max_images", "bins", "include_background", "amp", "pad_to")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if k in keep}


@dataclass
class Job:
    """Everything one analysis needs, resolved."""

    model: torch.nn.Module
    dataset: Any
    class_names: list[str]
    scales: tuple[float, ...]
    methods: list[Method]
    own: Method
    skip_classes: tuple[int, ...]
    total: int
    device: torch.device
    amp_dtype: torch.dtype | None
    settings: Settings
    provenance: dict[str, Any]
    palette: list[list[int]]
    mean: Sequence[float]
    std: Sequence[float]
    model_args: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- entry point


def analyze_checkpoint(
    checkpoint: Path,
    out: Path,
    data: Path | None = None,
    json_path: Path | None = None,
    settings: Settings | None = None,
    device: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """``msattn analyze``: run the pass (resuming a matching saved one), write the report, print the tables."""
    settings = settings or Settings()
    settings.bins = check_bins(settings.bins)
    if settings.gallery < 0 or settings.batch_size < 1 or (settings.max_images is not None and settings.max_images < 1):
        raise UsageError("need --gallery >= 0, --batch-size >= 1 and --max-images >= 1")
    require_matplotlib()
    if console is None:
        console = Console(highlight=False, soft_wrap=True)
        if not console.is_terminal:  # a log file or a pipe: do not squeeze the tables into 80 columns
            console = Console(highlight=False, soft_wrap=True, width=160)
    bench = _read_bench(settings.bench)
    job = prepare_job(checkpoint, data, settings, device)
    out = Path(out)
    check_out_folder(out, json_path)
    with folder_lock(out, "analyze"):
        state = run_pass(job, out, console)
        report = build_report(job, state, bench)
        write_outputs(job, report, out, json_path, console)
    print_headline(report, console)
    console.print(f"report: {out / HTML_NAME} and {out / REPORT_NAME}", markup=False)
    return report


def require_matplotlib() -> None:
    """The report's plots need matplotlib (the ``msattn[report]`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DependencyError(
            'msattn analyze draws its plots with matplotlib, which is not installed: pip install "msattn[report]"'
        ) from None


def _read_bench(path: str | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise DataError(f"{path}: bench JSON not found (write one with msattn bench --json FILE)")
    return read_bench(Path(path))


def check_out_folder(out: Path, json_path: Path | None = None) -> None:
    """Refuse to write over report files that msattn analyze did not write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    ours = _is_our_report(out / REPORT_NAME) or _is_our_state(out / STATE_NAME)
    for name in (REPORT_NAME, HTML_NAME, STATE_NAME):
        if (out / name).exists() and not ours:
            raise UsageError(f"{out / name}: not written by msattn analyze; choose another --out")
    if json_path is not None and Path(json_path).exists() and not _is_our_report(Path(json_path)):
        raise UsageError(f"{json_path}: exists and is not an msattn analyze report; choose another --json")


def _is_our_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_our_state(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return isinstance(saved, dict) and saved.get("format") == STATE_FORMAT


# ----------------------------------------------------------------------------- resolving the inputs


def prepare_job(checkpoint: Path, data: Path | None, settings: Settings, device: str | None) -> Job:
    """Load the checkpoint and the split, check the scales, decide the methods and the provenance."""
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(dev)
    meta = state["dataset"]
    root = Path(data) if data is not None else Path(str(meta.get("root", "")))
    if not str(root) or not (root / "dataset.json").is_file():
        raise DataError(f"{root}: dataset folder not found (pass --data DIR; the checkpoint's was {meta.get('root')})")
    check_id(settings.split, "--split")
    info = read_dataset_info(root)
    if list(info.classes) != list(meta.get("classes", [])):
        raise DataError(f"{root}: its classes differ from the checkpoint's; analyze on the dataset the model was trained on")
    if not (root / f"{settings.split}.txt").is_file():
        raise DataError(f"{root / (settings.split + '.txt')}: split list not found")
    trained = tuple(float(s) for s in state["model_args"].get("scales", [1.0]))
    config = checkpoint_recipe(state)
    scales = check_scales(model, settings.scales, default_scales(model, trained, config))
    if settings.pad_to is None and config is not None:
        settings.pad_to = config.eval.pad_to
    mean, std = meta.get("mean") or IMAGENET_MEAN, meta.get("std") or IMAGENET_STD
    max_pixels = config.data.max_pixels if config is not None else None
    dataset = SegmentationFolder(root, settings.split, transform=EvalTransform(mean=mean, std=std), max_pixels=max_pixels)
    total = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))
    provenance = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "iteration": state.get("iteration"),
        "arch_version": state.get("arch_version", 1),
        "trained_by_msattn": state.get("msattn_version"),
        "model_args": state.get("model_args"),
        "data": str(root),
        "split": settings.split,
        "split_sha256": file_sha256(root / f"{settings.split}.txt"),
        "dataset_json_sha256": file_sha256(root / "dataset.json"),
        "images": total,
        "scales": list(scales),
        "trained_scales": list(trained),
        "settings": settings.fingerprinted() | {"batch_size": settings.batch_size, "gallery": settings.gallery,
                                                "bench": settings.bench},
        "msattn_version": __version__,
        "torch_version": torch.__version__,
        "device": str(dev),
    }
    return job_for_model(model, dataset, list(info.classes), settings, dev, provenance=provenance,
                         palette=[list(c) for c in info.palette], mean=mean, std=std, model_args=state.get("model_args"),
                         scales=scales)


def job_for_model(
    model: torch.nn.Module,
    dataset: Any,
    class_names: list[str],
    settings: Settings,
    device: torch.device,
    provenance: dict[str, Any] | None = None,
    palette: list[list[int]] | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    model_args: dict[str, Any] | None = None,
    scales: Sequence[float] | None = None,
) -> Job:
    """A job for any model with ScaleNet's forward (``model(images, scales=...) -> dict``) and ``scales``,
    ``merge`` attributes, over any dataset of ``{"image", "label", "id"}`` items."""
    scales = tuple(float(s) for s in (scales or settings.scales or model.scales))
    own = own_method(scales, model_merge(model, scales))
    skip = () if settings.include_background or class_names[0].lower() != "background" else (0,)
    total = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))
    provenance = {"checkpoint": None, "split": settings.split, "scales": list(scales), "merge": own.merge,
                  "images": total, "settings": settings.fingerprinted(), "msattn_version": __version__,
                  **(provenance or {})}
    return Job(model, dataset, class_names, scales, build_methods(scales, own.merge), own, skip, total, device,
               InferenceOptions(amp="bf16" if settings.amp else "off").amp_dtype(device), settings, provenance,
               palette if palette is not None else [], mean, std, model_args=model_args)


def default_scales(model: torch.nn.Module, trained: tuple[float, ...], config: Any) -> tuple[float, ...]:
    """The scales of a pass without ``--scales``: the trained ones; for a hierarchical model (trained on
    two, run on any list holding 1.0) the recipe's ``eval.scales`` when it names them, as evaluate does."""
    if getattr(model, "merge", None) == HIERARCHICAL and config is not None and config.eval.scales:
        return tuple(float(s) for s in config.eval.scales)
    return trained


def check_scales(model: torch.nn.Module, scales: Sequence[float] | None, trained: tuple[float, ...]) -> tuple[float, ...]:
    """The scales of the pass: ``--scales`` (checked) or ``trained`` (the default, :func:`default_scales`)."""
    if not scales:
        return trained
    scales = tuple(float(s) for s in scales)
    if any(not (0 < s <= 4) for s in scales) or len(set(scales)) != len(scales):
        raise UsageError(f"--scales: need distinct values in (0, 4], got {list(scales)}")
    if getattr(model, "merge", None) == HIERARCHICAL:
        problem = hierarchical_inference_problem(scales)
        if problem:
            raise UsageError(f"--scales: {problem}; add 1.0 (every subset holding it is in the report)")
        return scales
    if getattr(model, "head", None) is not None and sorted(scales) != sorted(trained):
        raise UsageError(f"--scales: this attention model runs on its trained scales {list(trained)} only "
                         "(max/avg subsets of them are in the report)")
    return scales


def fingerprint(job: Job) -> str:
    keys = ("checkpoint_sha256", "data", "split", "split_sha256", "dataset_json_sha256", "scales")
    payload = {k: job.provenance.get(k) for k in keys} | {"settings": job.settings.fingerprinted(),
                                                      "state_version": STATE_VERSION,
                                                      "methods": [m.key for m in job.methods]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the pass


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _same_size_groups(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: list[list[dict[str, Any]]] = []
    for item in items:
        if groups and groups[-1][0]["image"].shape == item["image"].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def new_accumulator(job: Job) -> Accumulator:
    return Accumulator(job.methods, job.own, len(job.class_names), len(job.scales), job.skip_classes, job.device)


def load_state(path: Path, expected: str) -> dict[str, Any] | None:
    """The saved pass at ``path`` when its fingerprint is ``expected``; None otherwise."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged state is recomputed, never trusted
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != expected:
        return None
    return saved


def save_state(path: Path, print_: str, acc: Accumulator, done: bool) -> None:
    with atomic_write(path, "wb") as handle:
        torch.save({"format": STATE_FORMAT, "fingerprint": print_, "done": done, "accumulator": acc.state_dict()}, handle)


def run_pass(job: Job, out: Path, console: Console) -> dict[str, Any]:
    """Run (or resume, or reuse) the pass; returns the accumulator's state as numpy arrays."""
    path, expected = out / STATE_NAME, fingerprint(job)
    acc = new_accumulator(job)
    saved = load_state(path, expected)
    if saved is None and path.is_file():
        console.print(f"{path}: made with other settings or another checkpoint; starting the pass over", markup=False)
    if saved is not None:
        acc.load_state_dict(saved["accumulator"])
        if saved["done"]:
            console.print(f"the pass over {acc.images_done} images is already done ({path}); rebuilding the report",
                          markup=False)
            return as_numpy(acc.state_dict())
        console.print(f"resuming the pass at image {acc.images_done} of {job.total}", markup=False)
    start = acc.images_done
    loader = DataLoader(Subset(job.dataset, range(start, job.total)), batch_size=job.settings.batch_size,
                        shuffle=False, num_workers=job.settings.workers, collate_fn=_collate)
    job.model.eval()
    last_save = time.monotonic()
    with _progress(console) as progress:
        task = progress.add_task("analyze", total=job.total, completed=start)
        for items in loader:
            for group in _same_size_groups(items):
                images = torch.stack([item["image"] for item in group]).to(job.device)
                labels = torch.stack([item["label"] for item in group]).to(job.device)
                maps = forward_maps(job.model, images, labels, job.scales, job.methods, job.own, job.amp_dtype,
                                    job.settings.pad_to)
                acc.update(maps, labels, [item["id"] for item in group],
                           padded_size(images.shape[-2:], job.settings.pad_to))
            progress.update(task, completed=acc.images_done)
            if time.monotonic() - last_save > SAVE_EVERY_S:
                save_state(path, expected, acc, done=False)
                last_save = time.monotonic()
    save_state(path, expected, acc, done=True)
    return as_numpy(acc.state_dict())


def _progress(console: Console) -> Any:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


# ----------------------------------------------------------------------------- report


def build_report(job: Job, state: dict[str, Any], bench: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Every number of the report (the contents of report.json but the gallery)."""
    costs = method_costs(job.model_args, job.methods, state["sizes"], bench)
    rows = summary.method_table(state, job.methods, job.own, job.class_names, costs)
    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": job.provenance | {"images": int(state["images_done"]), "fingerprint": fingerprint(job)},
        "classes": job.class_names,
        "scales": list(job.scales),
        "model": job.own.key,
        "object_classes_skipped": [job.class_names[c] for c in job.skip_classes],
        "methods": rows,
        "merge_gain": summary.merge_gain_by_class(rows, job.own, job.class_names),
        "attention_by_class": summary.attention_by_class(state, job.scales, job.class_names),
        "size_bins": summary.size_bins(state, job.methods, job.own, job.scales, job.settings.bins),
        "calibration": summary.calibration(state, calibration_keys(job.methods, job.own)),
        "attention_entropy": summary.attention_entropy(state, job.scales),
        "padded_sizes": dict(state["sizes"]),
        "costs_note": "GFLOPs per image: convolutions and matmuls (torch.utils.flop_counter, as msattn bench), "
                      "averaged over the padded image sizes of the pass",
    }
    report["_images"] = summary.image_rows(state, job.methods, job.own)
    return report


def write_outputs(job: Job, report: dict[str, Any], out: Path, json_path: Path | None, console: Console) -> None:
    """Gallery, plots, index.html and report.json (and the --json copy)."""
    images = report.pop("_images")
    entries, pictures = gallery(job, images, job.settings.gallery)
    report["gallery"] = entries
    report["images_summary"] = {
        "gain_mean": _mean([r["gain"] for r in images]),
        "images_gained": sum(1 for r in images if r["gain"] is not None and r["gain"] > 0),
        "images_lost": sum(1 for r in images if r["gain"] is not None and r["gain"] < 0),
    }
    write_text(out / HTML_NAME, render_html(report, pictures))
    write_json(out / REPORT_NAME, json_safe(report))
    if json_path is not None:
        write_json(json_path, json_safe(report))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
