"""Prediction: label maps, overlays, probabilities and attention maps for image files.

:func:`predict_probs` / :func:`predict_batch` are the small reusable pieces (evaluate uses
them): normalised images in, class probabilities and merge weights at image size out.
:func:`predict_images` is ``msattn predict``: inputs -> files in the output folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msattn.engine.distributed import DistInfo
from msattn.errors import DataError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIST_SUFFIX = ".txt"


# ----------------------------------------------------------------------------- the forward pass


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on CUDA when ``amp``; never on CPU (bf16 is ~100x slower there)."""
    return torch.bfloat16 if amp and device.type == "cuda" else None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def predict_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class probabilities and merge weights at image size for a batch of same-size images.

    images: normalised float [N,3,H,W] on the model's device. The batch is padded (bottom and
    right, with the mean colour) to the next 8k+1 side, or to ``pad_to`` (e.g. 513) when it
    fits, so that the output grid is exact (:mod:`msattn.geometry`); the results are cropped
    back. Returns float32 ``probs`` [N,C,H,W] (softmax of the corner-aligned upsampled merged
    logits) and ``attention`` [N,S,H,W] (the model's merge weights at image size; for max
    merging the one-hot map of the winning scale, kept one-hot by nearest upsampling) or
    None for a single-scale model. ``flip`` averages with the mirrored image.
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the network under autocast.
    """
    nearest = getattr(model, "merge", None) == "max"
    with torch.inference_mode(), _autocast(images.device, amp_dtype):
        probs, attention = _forward(model, images, scales, nearest, pad_to)
        if flip:
            probs_f, attention_f = _forward(model, images.flip(-1), scales, nearest, pad_to)
            probs = (probs + probs_f.flip(-1)) / 2
            if attention is not None and attention_f is not None:
                attention = (attention + attention_f.flip(-1)) / 2
    return probs, attention


def _forward(
    model: torch.nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] | None,
    nearest: bool,
    pad_to: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from msattn.geometry import crop_to, pad_to_grid, resize_bilinear, resize_nearest, upsample_logits

    size = tuple(images.shape[-2:])
    padded = pad_to_grid(images, pad_to)  # [N,3,8k+1,8l+1], mean colour below and right
    full = tuple(padded.shape[-2:])
    output = model(padded, scales=scales)
    logits = crop_to(upsample_logits(output["out"].float(), full), size)
    probs = torch.softmax(logits, dim=1)  # [N,C,H,W]
    attention = output.get("attention")
    if attention is not None:
        resize = resize_nearest if nearest else resize_bilinear  # bilinear keeps weights summing to 1
        attention = crop_to(resize(attention.float(), full), size)
    return probs, attention


def predict_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One normalised image [1,3,H,W] (or [3,H,W]) -> (probs [C,H,W], attention [S,H,W] or None).

    See :func:`predict_batch`; tensors stay on the model's device, float32.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"predict_probs wants one image [1,3,H,W], got {tuple(image.shape)}")
    probs, attention = predict_batch(model, image, scales=scales, flip=flip, amp_dtype=amp_dtype, pad_to=pad_to)
    return probs[0], None if attention is None else attention[0]


# ----------------------------------------------------------------------------- inputs and names


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Expand image files, folders (their images, sorted, not recursive) and ``.txt`` list files
    (one path per line, relative to the list's folder; blank lines and ``#`` comments skipped).

    Paths on the command line must exist; entries of a list are checked when they are read.
    """
    found: list[Path] = []
    for path in inputs:
        path = Path(path)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() == LIST_SUFFIX:
            found += _read_list(path)
        elif not path.exists():
            raise DataError(f"{path}: input not found")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        else:
            raise DataError(f"{path}: not an image (.jpg, .jpeg, .png), folder or .txt list")
    return found


def _read_list(path: Path) -> list[Path]:
    from msattn.io import read_list_lines

    return [Path(os.path.normpath(path.parent / line)) for line in read_list_lines(path)]


@dataclass(frozen=True)
class Outputs:
    """Which files predict writes per image: ``<name>.png`` always, the rest on request."""

    save_probs: bool = False
    save_attention: bool = False
    overlay: bool = True

    def files(self, name: str, scales: Sequence[float]) -> list[str]:
        """File names written for image ``name``."""
        files = [f"{name}.png"] + ([f"{name}_overlay.jpg"] if self.overlay else [])
        if self.save_probs:
            files.append(f"{name}.npz")
        if self.save_attention and len(scales) > 1:
            files += [attention_file(name, s) for s in scales] + [f"{name}_attention.png"]
        return files


def attention_file(name: str, scale: float) -> str:
    """``<name>_attention_<scale>.png`` with the scale written as a float (1.0, 0.75, 0.5)."""
    return f"{name}_attention_{float(scale)}.png"


def unique_names(paths: Sequence[Path], files_of: Any = None) -> tuple[list[str], list[str]]:
    """Output names (file stems) for ``paths``, renaming ``x`` to ``x_2``, ``x_3``... where two inputs
    would write the same file. Returns (names, one message per rename).

    ``files_of(name) -> list[str]`` lists the files a name writes (default: just the name).
    """
    files_of = files_of or (lambda n: [n])
    taken: set[str] = set()
    names, notes = [], []
    for path in paths:
        stem, name, k = path.stem, path.stem, 1
        while any(f in taken for f in files_of(name)):
            k += 1
            name = f"{stem}_{k}"
        if name != stem:
            notes.append(f"{path}: another input already writes '{stem}', writing this one as '{name}'")
        taken.update(files_of(name))
        names.append(name)
    return names, notes


# ----------------------------------------------------------------------------- writing


@dataclass
class _Labels:
    """What predict needs from the checkpoint's dataset section."""

    classes: list[str]
    palette: np.ndarray  # uint8 [K,3]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from msattn.io import atomic_write

    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def write_prediction(
    out: Path,
    name: str,
    image: np.ndarray,
    probs: np.ndarray,
    attention: np.ndarray | None,
    labels: np.ndarray,
    info: _Labels,
    scales: Sequence[float],
    merge: str,
    outputs: Outputs,
) -> None:
    """Write one image's files (all atomically): labels PNG, overlay, optional npz and attention maps.

    The label PNG and npz are full size; the overlay and attention pictures of huge images are
    downscaled (:mod:`msattn.tiling.preview`). ``probs``/``attention`` may be float16 or memory-mapped.
    """
    from msattn.engine.visualize import attention_figure, attention_heatmap, label_image, scale_title
    from msattn.io import save_image
    from msattn.tiling.preview import overlay_bands, picture_views

    save_image(label_image(labels, info.palette), out / f"{name}.png")
    views = picture_views(image, labels, attention if outputs.save_attention else None, merge)  # smaller when huge
    if outputs.overlay:
        save_image(overlay_bands(views.overlay_image, views.overlay_labels, info.palette),
                   out / f"{name}_overlay.jpg", quality=90)  # fmt: skip
    if outputs.save_probs:
        arrays = {
            "probs": np.asarray(probs, dtype=np.float16),  # no copy of a float16 (memory-mapped) store
            "scales": np.asarray(scales, dtype=np.float32),
            "classes": np.asarray(info.classes, dtype=str),
            "palette": info.palette,
        }
        if attention is not None:
            arrays["attention"] = np.asarray(attention, dtype=np.float16)
        _write_npz(out / f"{name}.npz", arrays)
    if outputs.save_attention and views.figure_weights is not None:
        for weights, scale in zip(views.figure_weights, scales):
            heat = attention_heatmap(views.figure_image, weights, title=scale_title(scale, merge))
            save_image(heat, out / attention_file(name, scale))
        figure = attention_figure(
            views.figure_image, views.figure_labels, views.figure_weights, scales, info.palette, info.classes, merge
        )
        save_image(figure, out / f"{name}_attention.png")


# ----------------------------------------------------------------------------- the command


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _crf_params(section: dict[str, Any] | None, source: Any) -> Any:
    """The recipe's [crf] settings (from a checkpoint or an exported model's metadata), else the defaults."""
    from msattn.crf import CRFParams, _import_densecrf, crf_params_from_dict

    _import_densecrf()  # fail before any work when pydensecrf is missing
    return crf_params_from_dict(section, f"{source} (config.crf)") if section else CRFParams()


def predict_images(
    inputs: Sequence[Path],
    checkpoint: Path | None,
    out: Path,
    save_probs: bool = False,
    save_attention: bool = False,
    crf: bool = False,
    scales: Sequence[float] | None = None,
    batch_size: int = 1,
    amp: bool = True,
    device: str | None = None,
    resume: bool = False,
    overlay: bool = True,
    pad_to: int | None = None,
    model: Path | None = None,
    backend: str | None = None,
    tiling: Any = None,
) -> dict[str, int]:
    """``msattn predict``: write label maps, overlays and (optionally) probabilities and attention maps.

    ``overlay=False`` with neither probabilities nor attention writes the label PNGs alone (the
    format of the PASCAL VOC evaluation server). ``pad_to`` pads every image to that 8k+1 side.
    ``backend`` (:func:`msattn.backends.open_backend`): ``torch`` runs ``checkpoint``,
    ``onnxruntime`` an exported ``model``. ``tiling`` (:class:`msattn.tiling.TilingOptions`):
    ``--tile``/``--overlap``/``--max-memory``; images over the tile or the memory budget are
    predicted tile by tile (:mod:`msattn.tiling`).

    Unreadable images are reported and skipped; DataError only when no image could be processed.
    Images of the same size in a batch run together, others one by one. With ``resume``, images
    whose every output file already exists are skipped (an interrupted run continues). Under
    ``torchrun`` every rank predicts its share of the images (``rank::world_size``) and rank 0
    reports. Returns counts over all ranks {"written", "failed", "done"}.
    """
    from msattn.engine.distributed import process_group

    with process_group(device) as dist_info:
        from msattn.backends import open_backend
        from msattn.tiling import TilingOptions

        outputs = Outputs(save_probs=save_probs, save_attention=save_attention, overlay=overlay)
        runner = open_backend(backend, checkpoint, model, dist_info.device, scales, amp, pad_to)
        return _predict_images(dist_info, inputs, runner, out, outputs, crf, batch_size, resume, tiling or TilingOptions())


def _predict_images(
    dist_info: DistInfo,
    inputs: Sequence[Path],
    backend: Any,
    out: Path,
    outputs: Outputs,
    crf: bool,
    batch_size: int,
    resume: bool,
    tiling: Any,
) -> dict[str, int]:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from msattn.backends import memory_model
    from msattn.engine.distributed import all_reduce_sum, barrier
    from msattn.io import clean_temporaries, open_image
    from msattn.tiling import Planner

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    paths = list(dict.fromkeys(collect_inputs(inputs)))  # the same file named twice runs once
    if not paths:
        raise DataError(f"no images found in {', '.join(str(p) for p in inputs)}")
    run_scales = backend.scales
    if backend.num_classes > 255:
        raise UsageError(f"{backend.source}: {backend.num_classes} classes do not fit an 8-bit label PNG")
    info = _Labels(list(backend.classes), backend.palette, backend.mean, backend.std)
    crf_params = _crf_params(backend.crf_section, backend.source) if crf else None
    merge = backend.merge
    planner = Planner(tiling, memory_model(backend), str(dist_info.device))

    names, notes = unique_names(paths, lambda n: outputs.files(n, run_scales))
    if dist_info.is_main:  # the folder itself is made by the first write: a failed run leaves nothing
        clean_temporaries(out)
    barrier(dist_info)  # no rank writes before the leftovers of a killed run are gone
    console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=not dist_info.is_main)
    for note in notes:
        console.print(f"[yellow]note[/] {escape(str(note))}")
    if outputs.save_attention and len(run_scales) == 1:
        console.print("[yellow]note[/] the model runs on one scale: there are no attention maps to save")

    mine = list(zip(paths, names))[dist_info.rank :: dist_info.world_size]  # this rank's share
    todo = mine
    if resume:
        todo = [(p, n) for p, n in mine if not all((out / f).is_file() for f in outputs.files(n, run_scales))]
    done = len(mine) - len(todo)
    written = failed = tiled = 0
    first_problem = ""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not dist_info.is_main) as progress:
        bar = progress.add_task("predict", total=len(todo))
        for chunk in _chunks(todo, batch_size):
            loaded = []
            for path, name in chunk:
                try:
                    loaded.append((name, np.array(open_image(path, "RGB"))))
                except DataError as exc:
                    progress.console.print(f"[yellow]skipped[/] {escape(str(exc))}")
                    first_problem = first_problem or str(exc)
                    failed += 1
                    progress.advance(bar)
            for group in _same_size_groups(loaded):
                plan = planner.plan(*group[0][1].shape[:2])
                if plan is not None:  # too large to predict whole: tile by tile, one image at a time
                    for name, image in group:
                        _predict_tiled(backend, name, image, plan, planner, out, outputs, info, merge, crf_params,
                                       progress)  # fmt: skip
                        written += 1
                        tiled += 1
                        progress.advance(bar)
                    continue
                results = _predict_group(backend, group)
                for (name, image), (p, att) in zip(group, results):
                    refined = _crf(image, p, crf_params) if crf_params is not None else p
                    labels = refined.argmax(axis=0).astype(np.uint8)
                    write_prediction(
                        out, name, image, p, att, labels, info, run_scales, merge, outputs
                    )
                    written += 1
                    progress.advance(bar)
    if dist_info.distributed:
        written, failed, done, tiled = all_reduce_sum([written, failed, done, tiled], dist_info)
        first_problem = first_problem or "(on another rank)"
    already = f", {done} already done" if done else ""
    in_tiles = f" ({tiled} in tiles)" if tiled else ""
    Console(highlight=False, quiet=not dist_info.is_main).print(
        f"predicted {written} image(s){in_tiles}, skipped {failed}{already} -> {out}", markup=False
    )
    if written == 0 and done == 0:
        raise DataError(f"none of the {len(paths)} input image(s) could be read; first: {first_problem}")
    return {"written": written, "failed": failed, "done": done}


def _predict_tiled(
    backend: Any,
    name: str,
    image: np.ndarray,
    plan: Any,
    planner: Any,
    out: Path,
    outputs: Outputs,
    info: _Labels,
    merge: str,
    crf_params: Any,
    progress: Any,
) -> None:
    """Predict one image tile by tile (a progress bar of its own) and write its files."""
    from msattn.tiling.images import predict_image_tiled
    from msattn.tiling.layout import count_tiles
    from msattn.tiling.stitch import Scratch

    height, width = image.shape[:2]
    task = progress.add_task(f"  {name}: {plan.tile}px tiles", total=count_tiles(height, width, plan))
    scratch = Scratch(out)  # memory-mapped stores for the largest images, removed below
    try:
        result = predict_image_tiled(
            backend, image, plan, planner, scratch,
            keep_probs=outputs.save_probs or crf_params is not None, keep_attention=outputs.save_attention,
            exact_probs=crf_params is not None, on_tile=lambda: progress.advance(task),
        )  # fmt: skip
        labels = result.labels
        if crf_params is not None:
            labels = _crf(image, np.asarray(result.probs, dtype=np.float32), crf_params).argmax(axis=0).astype(np.uint8)
        probs = result.probs if outputs.save_probs else None
        write_prediction(out, name, image, probs, result.attention, labels, info, backend.scales, merge, outputs)
    finally:
        scratch.close()
        progress.remove_task(task)


def _predict_group(backend: Any, group: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Run same-size images as one batch -> [(probs [C,H,W], attention [S,H,W] or None)] as numpy.

    Out of GPU memory on a batch, the images are retried one by one; out of memory on one
    image stops with a :class:`ResourceError` that says what to turn down.
    """
    from msattn.errors import ResourceError

    try:
        probs_np, att_np = backend.forward(np.stack([img for _, img in group]))  # [N,C,H,W], [N,S,H,W]
    except torch.cuda.OutOfMemoryError:
        probs_np = att_np = None  # handled below, outside the except block, so the failed tensors are freed
    if probs_np is not None:
        return [(probs_np[i], None if att_np is None else att_np[i]) for i in range(len(group))]
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
        "or use --device cpu"
    )


def _crf(image: np.ndarray, probs: np.ndarray, params: Any) -> np.ndarray:
    from msattn.crf import dense_crf

    return dense_crf(image, probs, params)


def _same_size_groups(loaded: list[tuple[str, np.ndarray]]) -> list[list[tuple[str, np.ndarray]]]:
    """Group (name, image) pairs by image size, keeping first-seen order."""
    groups: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for item in loaded:
        groups.setdefault(item[1].shape, []).append(item)
    return list(groups.values())
