"""``msattn predict``: label maps, overlays, probabilities and attention maps for image files.

:func:`predict_images` turns inputs into files in the output folder; the forward pass is
:mod:`msattn.infer.forward` (through a backend, :mod:`msattn.infer.backends`), the files
:mod:`msattn.infer.files`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from msattn import __version__
from msattn.config.crf import CRFParams, crf_params_from_dict
from msattn.crf.dense import dense_crf, import_densecrf
from msattn.errors import DataError, MsattnError, ResourceError, UsageError
from msattn.images import open_image
from msattn.infer.backends import memory_model, open_backend
from msattn.infer.files import Outputs, _Labels, write_prediction
from msattn.infer.graphs import inference_batch_size
from msattn.infer.inputs import gather_inputs, unique_names
from msattn.infer.options import InferenceOptions
from msattn.io import clean_temporaries
from msattn.locks import folder_lock
from msattn.outputs import Item, Mark, inputs_key, plan_outputs, refuse_inputs_in_out, settings_key, write_settings
from msattn.runtime.distributed import DistInfo, all_reduce_sum, broadcast_object, process_group
from msattn.tiling.images import predict_image_tiled
from msattn.tiling.layout import count_tiles
from msattn.tiling.run import Planner, TilingOptions
from msattn.tiling.stitch import Scratch

# ----------------------------------------------------------------------------- the command


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _crf_params(section: dict[str, Any] | None, source: Any) -> Any:
    """The recipe's [crf] settings (from a checkpoint or an exported model's metadata), else the defaults."""
    import_densecrf()  # fail before any work when pydensecrf is missing
    return crf_params_from_dict(section, f"{source} (config.crf)") if section else CRFParams()


def predict_images(
    inputs: Sequence[Path],
    out: Path,
    options: InferenceOptions = InferenceOptions(),
    *,
    checkpoint: Path | None = None,
    model: Path | None = None,
    backend: str | None = None,
    outputs: Outputs = Outputs(),
    crf: bool = False,
    resume: bool = False,
    images_dir: Path | None = None,
) -> dict[str, int]:
    """``msattn predict``: write label maps, overlays and (optionally) probabilities and attention maps.

    ``options`` (:class:`InferenceOptions`) say how images go through the model; ``outputs``
    which files are written (``overlay=False`` with neither probabilities nor attention writes
    the label PNGs alone, the format of the PASCAL VOC evaluation server). Inputs are files,
    folders and ``.txt`` lists (:mod:`msattn.infer.inputs`; ``images_dir`` resolves list entries
    and bare ids). ``backend`` (:func:`msattn.infer.backends.open_backend`): ``torch`` runs
    ``checkpoint``, ``onnxruntime`` an exported ``model``. Images over ``options.tiling``'s tile or
    the memory budget are predicted tile by tile (:mod:`msattn.tiling`).

    The output folder is locked (one writer) and never holds the inputs; a file there that
    predict did not write is never written over (refused before any work). Every output
    carries a mark of the settings and input that made it (:mod:`msattn.outputs`): with
    ``resume``, images whose files all exist with the current mark are skipped, stale ones
    redone (saying why). Unreadable images are reported and skipped; DataError only when no
    image could be processed. Images of the same size in a batch run together. Under
    ``torchrun`` every rank predicts its share (``rank::world_size``) and rank 0 locks and
    reports. Returns counts over all ranks {"written", "failed", "done"}.

    On CUDA, ``options.compile_graphs`` (the default; ``--no-compile`` turns it off) pads images
    to size buckets and replays one CUDA graph per batch shape; images of one bucket then share a
    batch, and the batch size defaults to 8 (else 1; :mod:`msattn.infer.graphs`).
    """
    job = _Job(outputs, crf, resume, backend, options.replace(tiling=options.tiling or TilingOptions()))
    with process_group(options.device) as dist_info:
        return _predict_images(dist_info, inputs, (checkpoint, model), Path(out), job, images_dir)


@dataclass(frozen=True)
class _Job:
    """What one ``msattn predict`` call was asked for."""

    outputs: Outputs
    crf: bool
    resume: bool
    backend: str | None  # torch / onnxruntime (None: the one the given file needs)
    inference: InferenceOptions


@dataclass
class _Run:
    """What one predict run computes with, decided before any file is written."""

    backend: Any  # msattn.infer.backends: TorchBackend (eager or CUDA graphs) or OnnxBackend
    info: _Labels
    scales: tuple[float, ...]
    merge: str
    crf_params: Any
    settings: dict[str, Any]  # everything that changes the numbers (the outputs' mark)
    notes: list[str]
    batch_size: int
    planner: Any  # msattn.tiling.Planner: whole or tiles, per image


def _prepare_run(files: tuple[Path | None, Path | None], job: _Job, device: torch.device) -> _Run:
    """Open the backend and settle the scales, labels, CRF and the settings every output records."""
    checkpoint, model = files
    options = job.inference
    backend = open_backend(job.backend, checkpoint, model, device, options)
    if backend.num_classes > 255:
        raise UsageError(f"{backend.source}: {backend.num_classes} classes do not fit an 8-bit label PNG")
    info = _Labels(list(backend.classes), backend.palette, backend.mean, backend.std)
    crf_params = _crf_params(backend.crf_section, backend.source) if job.crf else None
    tiling = options.tiling
    settings = {
        "model_sha256": backend.sha256,
        "backend": backend.name,
        "scales": list(backend.scales),
        "crf": crf_params.to_dict() if crf_params is not None else None,
        "pad_to": options.pad_to,
        "amp": "bf16" if getattr(backend, "amp_dtype", None) is not None else "off",
        "tile": tiling.tile, "overlap": tiling.overlap, "max_memory": tiling.max_memory,
        "msattn_version": __version__,
    }  # fmt: skip
    notes = [backend.note] if backend.note else []
    if job.outputs.save_attention and len(backend.scales) == 1:
        notes.append("the model runs on one scale: there are no attention maps to save")
    policy = getattr(getattr(backend, "runner", None), "policy", None)
    batch_size = inference_batch_size(options.batch_size, 1, policy) if policy is not None else options.batch_size or 1
    planner = Planner(tiling, memory_model(backend), str(device))
    notes += [planner.note] if planner.note and (tiling.tile is not None or tiling.max_memory is not None) else []
    return _Run(backend, info, tuple(backend.scales), backend.merge, crf_params, settings, notes, batch_size, planner)


def _predict_images(
    dist_info: DistInfo, inputs: Sequence[Path], files: tuple[Path | None, Path | None], out: Path, job: _Job,
    images_dir: Path | None,
) -> dict[str, int]:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    found = gather_inputs(inputs, images_dir)
    paths = list(dict.fromkeys(found.paths))  # the same file named twice runs once
    if len(paths) < len(found.paths):
        repeated = sorted({str(p) for p in found.paths if found.paths.count(p) > 1})
        found.notes.append(f"{len(repeated)} input(s) named more than once, predicted once: {', '.join(repeated[:3])}"
                           + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""))  # fmt: skip
    if not paths:
        raise DataError(f"no images found in {', '.join(str(p) for p in inputs)}")
    refuse_inputs_in_out(out, {f"input images ({d})": d for d in dict.fromkeys(p.parent for p in paths)})
    run = _prepare_run(files, job, dist_info.device)
    outputs, key = job.outputs, settings_key(run.settings)
    names, renames = unique_names(paths, lambda n: outputs.files(n, run.scales))
    items = [Item(tuple(outputs.files(n, run.scales)), Mark("predict", key, inputs_key([p]))) for p, n in zip(paths, names)]
    console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    for note in [*found.notes, *renames, *run.notes]:
        console.print(f"note: {note}", markup=False)
    with contextlib.ExitStack() as lock:
        plan = _shared_plan(dist_info, out, items, run.settings, job.resume, lock)
        for note in plan.notes:
            console.print(f"note: {note}", markup=False)
        mine = [i for i in plan.todo if i % dist_info.world_size == dist_info.rank]  # this rank's share
        tally = _Tally()
        started = time.perf_counter()
        try:
            _predict_loop(run, [(paths[i], names[i], items[i].mark) for i in mine], out, job.outputs, dist_info, tally)
        finally:
            if dist_info.is_main and tally.written:  # what made the files, for later runs' messages
                _record_settings(out, key, run.settings)
        written, failed, done, tiled = tally.written, tally.failed, len(plan.done), tally.tiled
        if dist_info.distributed:
            written, failed, tiled = all_reduce_sum([written, failed, tiled], dist_info)
            if dist_info.is_main and written and not tally.written:
                _record_settings(out, key, run.settings)
        hint = _hint(out, [names[i] for i in plan.done + plan.todo], outputs, run.scales) if dist_info.is_main else None
        seconds = time.perf_counter() - started
        speed = f" ({written / seconds:.1f} img/s, batch {run.batch_size})" if written and seconds > 0 else ""
        in_tiles = f" ({tiled} in tiles)" if tiled else ""
        summary = run.backend.summary()
        Console(highlight=False, soft_wrap=True, quiet=not dist_info.is_main).print(
            f"predicted {written} image(s){in_tiles}, skipped {failed}{f', {done} already done' if done else ''} -> "
            f"{out}" + speed + (f"\n{summary}" if summary else "") + (f"\nopen {hint}" if hint else ""),
            markup=False,
        )
        if written == 0 and done == 0:
            first = tally.first_problem or "(on another rank)"
            raise DataError(f"none of the {len(paths)} input image(s) could be read; first: {first}")
    return {"written": written, "failed": failed, "done": done}


@dataclass
class _Tally:
    written: int = 0
    failed: int = 0
    tiled: int = 0
    first_problem: str = ""

    def count(self, problem: str | None, console: Any, tiled: bool = False) -> None:
        """One image done: written, or skipped with ``problem`` (printed, the first one kept)."""
        if problem:
            console.print(f"skipped {problem}", markup=False)
            self.first_problem = self.first_problem or problem
            self.failed += 1
        else:
            self.written += 1
            self.tiled += tiled


def _hint(out: Path, names: Sequence[str], outputs: Outputs, scales: Sequence[float]) -> Path | None:
    """The one file to open first: the first image's attention figure, else its overlay, else its labels."""
    for name in names:
        files = outputs.files(name, scales)
        for wanted in (f"{name}_attention.png", f"{name}_overlay.jpg", f"{name}.png"):
            if wanted in files and (out / wanted).is_file():
                return out / wanted
    return None


def _predict_loop(
    run: _Run, work: list[tuple[Path, str, Any]], out: Path, outputs: Outputs, dist_info: DistInfo, tally: _Tally
) -> None:
    """Predict and write ``work`` [(image path, output name, mark)], counting into ``tally``."""
    console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not dist_info.is_main) as progress:
        bar = progress.add_task("predict", total=len(work))
        for chunk in _chunks(work, run.batch_size):
            loaded = []
            for path, name, mark in chunk:
                try:
                    loaded.append((name, np.array(open_image(path, "RGB")), mark))
                except DataError as exc:
                    tally.count(str(exc), progress.console)
                    progress.advance(bar)
            for group in _same_size_groups(loaded, run.backend.group_key):
                whole = [g for g in group if run.planner.plan(*g[1].shape[:2]) is None]
                for name, image, mark in (g for g in group if run.planner.plan(*g[1].shape[:2]) is not None):
                    _predict_tiled(run, name, image, mark, out, outputs, progress, tally)  # too large whole
                    progress.advance(bar)
                results = _predict_group(run.backend, [(n, im) for n, im, _ in whole]) if whole else []
                for (name, image, mark), (p, att) in zip(whole, results):
                    refined = _crf(image, p, run.crf_params) if run.crf_params is not None else p
                    labels = refined.argmax(axis=0).astype(np.uint8)
                    problem = _write_all_or_nothing(out, name, image, p, att, labels, run, outputs, mark)
                    tally.count(problem, progress.console)
                    progress.advance(bar)


def _write_all_or_nothing(
    out: Path, name: str, image: np.ndarray, probs: np.ndarray, attention: np.ndarray | None, labels: np.ndarray,
    run: _Run, outputs: Outputs, mark: Any,
) -> str | None:
    """Write one image's files; when one cannot be written, remove the image's files and say why.

    A full disk (or any msattn error) stops the run; a file this image alone cannot become (say
    an overlay wider than JPEG allows) costs this image, not the batch, and leaves no part behind.
    """
    try:
        write_prediction(out, name, image, probs, attention, labels, run.info, run.scales, run.merge, outputs, mark)
        return None
    except (MsattnError, MemoryError):
        raise
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's (no space, permissions...)
            raise
        for file in outputs.files(name, run.scales):
            (out / file).unlink(missing_ok=True)
        return f"{name}: its outputs could not be written ({exc}); none of them was kept"


def _record_settings(out: Path, key: str, settings: dict[str, Any]) -> None:
    write_settings(out, "predict", key, settings)


def _shared_plan(
    dist_info: DistInfo, out: Path, items: list[Any], settings: dict[str, Any], resume: bool, lock: contextlib.ExitStack
) -> Any:
    """Rank 0 plans the run (refusing foreign files before it touches the folder), then takes the folder's
    lock into ``lock`` and clears a killed run's temporaries; every rank gets the plan or the refusal.
    """
    plan = error = None
    if dist_info.is_main:
        try:
            plan = plan_outputs(out, items, "predict", settings, keep_current=resume)
            lock.enter_context(folder_lock(out, "msattn predict"))
            clean_temporaries(out)  # leftovers of a killed run; nobody else writes here now
        except (UsageError, OSError) as exc:  # raised below on every rank: none may wait for rank 0
            error = exc
    if dist_info.distributed:
        plan, message = broadcast_object((plan, None if error is None else str(error)), dist_info)
        error = UsageError(message) if message and error is None else error
    if error is not None:
        raise error
    return plan


def _predict_tiled(
    run: _Run, name: str, image: np.ndarray, mark: Any, out: Path, outputs: Outputs, progress: Any, tally: _Tally
) -> None:
    """Predict one image tile by tile (a progress bar of its own) and write its files (all or none)."""
    height, width = image.shape[:2]
    plan = run.planner.plan(height, width)
    task = progress.add_task(f"  {name}: {plan.tile}px tiles", total=count_tiles(height, width, plan))
    scratch = Scratch(out)  # memory-mapped stores for the largest images, removed below
    try:
        result = predict_image_tiled(
            run.backend, image, plan, run.planner, scratch,
            keep_probs=outputs.save_probs or run.crf_params is not None, keep_attention=outputs.save_attention,
            exact_probs=run.crf_params is not None, on_tile=lambda: progress.advance(task),
        )  # fmt: skip
        labels = result.labels
        if run.crf_params is not None:
            labels = _crf(image, np.asarray(result.probs, dtype=np.float32), run.crf_params).argmax(axis=0)
            labels = labels.astype(np.uint8)
        probs = result.probs if outputs.save_probs else None
        problem = _write_all_or_nothing(out, name, image, probs, result.attention, labels, run, outputs, mark)
    finally:
        scratch.close()
        progress.remove_task(task)
    tally.count(problem, progress.console, tiled=True)


def _predict_group(backend: Any, group: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Run images of one size (or one size bucket, with CUDA graphs) as one batch through ``backend``
    (:mod:`msattn.infer.backends`) -> [(probs [C,H,W], attention [S,H,W] or None)] as numpy.

    Out of GPU memory on a batch, the images are retried one by one; out of memory on one
    image stops with a :class:`ResourceError` that says what to turn down.
    """
    try:
        results = backend.predict_group([img for _, img in group])
    except torch.cuda.OutOfMemoryError:
        results = None  # handled below, outside the except block, so the failed tensors are freed
    if results is not None:
        return results
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(group) > 1:
        return [r for item in group for r in _predict_group(backend, [item])]
    name, image = group[0]
    h, w = image.shape[:2]
    amp = getattr(backend, "amp_dtype", None) is not None
    raise ResourceError(
        f"out of GPU memory on {name} ({w}x{h}, scales {list(backend.scales)}) even alone: give smaller --scales, "
        f"keep --amp on{'' if amp else ' (it is off)'}, predict in tiles (--tile 1025, or a lower --max-memory), "
        "use --no-compile, or use --device cpu"
    )


def _crf(image: np.ndarray, probs: np.ndarray, params: Any) -> np.ndarray:
    return dense_crf(image, probs, params)


def _same_size_groups(loaded: list[tuple[Any, ...]], key: Any = None) -> list[list[tuple[Any, ...]]]:
    """Group (name, image, ...) tuples by ``key(image size)`` (default: the size; with CUDA graphs its
    bucket), keeping first-seen order."""
    groups: dict[Any, list[tuple[Any, ...]]] = {}
    for item in loaded:
        size = tuple(item[1].shape[:2])
        groups.setdefault(size if key is None else key(size), []).append(item)
    return list(groups.values())
