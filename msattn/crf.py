"""Fully connected CRF (Krähenbühl & Koltun) on saved class probabilities, as in DeepLab.

:class:`CRFParams` is also the recipe's ``[crf]`` section. :func:`dense_crf` refines one
image; :func:`refine_folder` refines a folder written by ``msattn predict --save-probs``
with worker processes; :func:`grid_search` scores a small grid against ground truth.
``pydensecrf`` (package ``pydensecrf2``) is imported only when a CRF actually runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msattn.errors import ConfigError, DataError, DependencyError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROB_FLOOR = 1e-8  # probabilities are clipped to this before -log

#: DeepLab's search ranges, trimmed to a grid small enough to run on a held-out subset.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "bi_w": (3.0, 4.0, 5.0),
    "bi_xy_std": (50.0, 80.0, 121.0),
    "bi_rgb_std": (3.0, 5.0, 10.0),
}


@dataclass
class CRFParams:
    """Dense CRF settings; defaults are DeepLab-LargeFOV's VOC values.

    bi_w / bi_xy_std / bi_rgb_std: bilateral (appearance) kernel weight, spatial and colour std;
    pos_w / pos_xy_std: Gaussian (smoothness) kernel weight and spatial std;
    iterations: mean-field iterations.
    """

    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`ConfigError` (naming ``crf.<key>`` and ``source``) for a non-positive or non-numeric value."""
        where = f"{source}: " if source is not None else ""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "iterations":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                want = "a positive integer"
            else:
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value > 0
                )
                want = "a positive number"
            if not ok:
                raise ConfigError(f"{where}crf.{field.name} must be {want}, got {value!r}")

    def replace(self, **changes: Any) -> CRFParams:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))


def crf_params_from_dict(values: Mapping[str, Any], source: str | os.PathLike[str] = "<crf>") -> CRFParams:
    """Build :class:`CRFParams` from a ``[crf]`` mapping; unknown keys and bad values raise :class:`ConfigError`."""
    unknown = sorted(set(values) - set(CRF_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key crf.{unknown[0]} (known: {', '.join(CRF_FIELDS)})")
    kwargs = {k: float(v) if k != "iterations" and _is_number(v) else v for k, v in values.items()}
    try:
        return CRFParams(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_crf_params(recipe: str | os.PathLike[str]) -> CRFParams:
    """Read the ``[crf]`` section of a recipe TOML file (defaults where absent)."""
    import tomllib

    path = Path(recipe)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    section = data.get("crf", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: crf must be a table ([crf]), got {type(section).__name__}")
    return crf_params_from_dict(section, path)


# ----------------------------------------------------------------------------- one image


def _import_densecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise DependencyError(
            f"the dense CRF needs pydensecrf ({exc}); install it with: pip install pydensecrf2"
        ) from None
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine class probabilities with the fully connected CRF.

    image: uint8 [H,W,3] RGB; probs: float [C,H,W] (softmax output); returns float32 [C,H,W]
    (the mean-field marginals, summing to 1 over C).
    """
    params = params or CRFParams()
    dcrf = _import_densecrf()
    if probs.ndim != 3 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf wants image [H,W,3] and probs [C,H,W], got {image.shape} and {probs.shape}")
    num_classes, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but probabilities are {width}x{height}")
    unary = -np.log(np.clip(probs.astype(np.float32), PROB_FLOOR, 1.0)).reshape(num_classes, -1)
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(
        sxy=params.bi_xy_std,
        srgb=params.bi_rgb_std,
        rgbim=np.array(image, dtype=np.uint8, order="C"),  # a writable copy: pydensecrf needs one
        compat=params.bi_w,
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_classes, height, width)


# ----------------------------------------------------------------------------- files


def find_image(folder: Path, name: str) -> Path | None:
    """The image ``<name>.jpg|.jpeg|.png`` (any case) in ``folder``, or None."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_probs(path: Path) -> dict[str, np.ndarray]:
    """Read a predict ``.npz``: "probs" float [C,H,W] plus optional "palette", "classes"; DataError if corrupt."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read probabilities ({exc})") from None
    probs = data.get("probs")
    if probs is None or probs.ndim != 3 or probs.shape[0] < 1:
        raise DataError(f"{path}: no 'probs' array of shape [C,H,W]")
    if not np.issubdtype(probs.dtype, np.floating) or not np.isfinite(probs).all():
        raise DataError(f"{path}: 'probs' must hold finite floating-point probabilities")
    return data


def _load_pair(image_path: Path, npz_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from msattn.io import open_image

    data = load_probs(npz_path)
    image = np.asarray(open_image(image_path, "RGB"))
    if image.shape[:2] != data["probs"].shape[1:]:
        h, w = data["probs"].shape[1:]
        raise DataError(
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but {npz_path.name} holds {w}x{h} probabilities"
        )
    return image, data


def _palette_of(data: Mapping[str, np.ndarray]) -> np.ndarray:
    from msattn.engine.visualize import voc_palette

    palette = data.get("palette")
    if palette is not None and palette.ndim == 2 and palette.shape[1] == 3:
        return palette.astype(np.uint8)
    return voc_palette()


def refine_one(image_path: Path, npz_path: Path, out_path: Path, params: CRFParams) -> str | None:
    """Refine one image and write ``out_path`` (palette PNG). Returns an error message or None."""
    from msattn.engine.visualize import label_image
    from msattn.io import save_image

    try:
        image, data = _load_pair(image_path, npz_path)
        refined = dense_crf(image, data["probs"].astype(np.float32), params)
        labels = refined.argmax(axis=0).astype(np.uint8)
        save_image(label_image(labels, _palette_of(data)), out_path)
    except DataError as exc:
        return str(exc)
    return None


def _search_one(image_path: Path, npz_path: Path, label_path: Path, params: CRFParams | None) -> np.ndarray | str:
    """Confusion matrix [C,C] of the CRF (or argmax when ``params`` is None) for one image, or an error."""
    try:
        image, data = _load_pair(image_path, npz_path)
        probs = data["probs"].astype(np.float32)
        label = read_label(label_path, probs.shape[0], probs.shape[1:])
        refined = dense_crf(image, probs, params) if params is not None else probs
        return confusion_matrix(refined.argmax(axis=0), label, probs.shape[0])
    except DataError as exc:
        return str(exc)


def read_label(path: Path, num_classes: int, size: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """Read a ground-truth label PNG (palette or grey, value = class, ``ignore_index`` ignored) as int64 [H,W]."""
    from msattn.io import open_image

    img = open_image(path, mode=None)
    if img.mode not in {"P", "L"}:
        raise DataError(f"{path}: label must be a palette or greyscale PNG of class indices, got mode {img.mode}")
    label = np.asarray(img, dtype=np.int64)
    if label.shape != tuple(size):
        raise DataError(f"{path}: label is {label.shape[1]}x{label.shape[0]}, probabilities are {size[1]}x{size[0]}")
    bad = (label >= num_classes) & (label != ignore_index)
    if bad.any():
        value = int(label[bad][0])
        raise DataError(f"{path}: label value {value} is not a class (0..{num_classes - 1}) or {ignore_index}")
    return label


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix [C,C] (rows = ground truth) via :class:`msattn.engine.metrics.ConfusionMatrix`."""
    import torch

    from msattn.engine.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(num_classes, ignore_index)
    matrix.update(
        torch.from_numpy(np.asarray(pred, dtype=np.int64)),
        torch.from_numpy(np.asarray(label, dtype=np.int64)),
    )
    return matrix.mat.numpy()


def mean_iou(confusion: np.ndarray) -> float:
    """mIoU of a [C,C] confusion matrix, as ``msattn evaluate`` computes it (absent classes left out)."""
    import torch

    from msattn.engine.metrics import ConfusionMatrix

    matrix = ConfusionMatrix(confusion.shape[0])
    matrix.mat = torch.from_numpy(np.asarray(confusion, dtype=np.int64))
    return float(matrix.compute()["miou"])


# ----------------------------------------------------------------------------- parallel driver


def _run_parallel(
    fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], workers: int, description: str
) -> Iterator[tuple[int, Any]]:
    """Yield (task index, result) as tasks finish, with a Rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        bar = progress.add_task(description, total=len(tasks))
        if workers <= 0 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                yield i, fn(*task)
                progress.advance(bar)
            return
        import multiprocessing

        # spawn: workers must not inherit the parent's thread pools (torch/OpenMP) through fork
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                yield futures[future], future.result()
                progress.advance(bar)


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _skipped(console: Any, message: str) -> None:
    from rich.markup import escape

    console.print(f"[yellow]skipped[/] {escape(message)}")


def _list_npz(probs: Path) -> list[str]:
    if not probs.is_dir():
        raise DataError(f"{probs}: probabilities folder not found")
    names = sorted(p.stem for p in probs.glob("*.npz") if p.is_file())
    if not names:
        raise DataError(f"{probs}: no .npz files (write them with: msattn predict --save-probs)")
    return names


def refine_folder(
    images: Path, probs: Path, out: Path, params: CRFParams | None = None, workers: int = 2
) -> dict[str, int]:
    """Refine every ``<name>.npz`` in ``probs`` with its image from ``images``; write ``out/<name>.png``.

    Already written outputs are skipped (resume); a missing or corrupt input is reported and
    skipped. Returns counts {"refined", "skipped_done", "failed"}; DataError if nothing could be refined.
    """
    from msattn.io import clean_temporaries

    params = params or CRFParams()
    names = _list_npz(probs)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another --out")
    clean_temporaries(out)  # the folder itself is made by the first write: a failed run leaves nothing
    console = _err_console()
    todo = [n for n in names if not (out / f"{n}.png").exists()]
    done = len(names) - len(todo)
    if done:
        console.print(f"resuming: {done} of {len(names)} already refined in {out}")
    tasks, failed, problems = [], 0, []
    for name in todo:
        image_path = find_image(images, name)
        if image_path is None:
            problems.append(f"{name}: no {name}.jpg/.jpeg/.png in {images}")
            _skipped(console, problems[-1])
            failed += 1
            continue
        tasks.append((image_path, probs / f"{name}.npz", out / f"{name}.png", params))
    refined = 0
    for i, error in _run_parallel(refine_one, tasks, workers, "CRF refine"):
        if error is None:
            refined += 1
        else:
            failed += 1
            problems.append(f"{tasks[i][1].stem}: {error}")
            _skipped(console, problems[-1])
    if todo and refined == 0:
        first = f"; first: {problems[0]}" if problems else ""
        raise DataError(f"{probs}: none of the {len(todo)} images could be refined{first}")
    return {"refined": refined, "skipped_done": done, "failed": failed}


def grid_search(
    images: Path,
    probs: Path,
    labels: Path,
    base: CRFParams | None = None,
    grid: Mapping[str, Iterable[float]] | None = None,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Score every combination of ``grid`` (default :data:`SEARCH_GRID`) by mIoU against ``labels``.

    Other settings come from ``base``. Returns rows sorted best first; each row holds the
    grid values, "params" (the full setting as a dict) and "miou". The plain argmax baseline
    is included as a row whose "params" is None.
    """
    base = base or CRFParams()
    grid = grid or SEARCH_GRID
    if not labels.is_dir():
        raise DataError(f"{labels}: label folder not found")
    console = _err_console()
    items = []
    for name in _list_npz(probs):
        image_path, label_path = find_image(images, name), labels / f"{name}.png"
        if image_path is None or not label_path.is_file():
            missing = label_path if image_path else images / f"{name}.jpg"
            _skipped(console, f"{name}: {missing} not found")
            continue
        items.append((image_path, probs / f"{name}.npz", label_path))
    if not items:
        raise DataError(f"{probs}: no image has both an image in {images} and a label in {labels}")
    keys = list(grid)
    settings: list[CRFParams | None] = [None] + [
        base.replace(**dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))
    ]
    tasks = [(*item, s) for s in settings for item in items]
    totals: list[np.ndarray | None] = [None] * len(settings)
    bad: set[str] = set()
    for i, result in _run_parallel(_search_one, tasks, workers, "CRF search"):
        if isinstance(result, str):
            if result not in bad:
                _skipped(console, result)
            bad.add(result)
            continue
        s = i // len(items)
        totals[s] = result if totals[s] is None else _add_confusion(totals[s], result)
    rows = []
    for s, total in zip(settings, totals):
        if total is None:
            raise DataError(f"{probs}: no image could be scored (see messages above)")
        row: dict[str, Any] = {k: (getattr(s, k) if s else None) for k in keys}
        row.update(params=s.to_dict() if s else None, miou=mean_iou(total))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["miou"] if not math.isnan(r["miou"]) else math.inf)


def _add_confusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape:
        raise DataError(f"probability files disagree on the number of classes ({a.shape[0]} vs {b.shape[0]})")
    return a + b


# ----------------------------------------------------------------------------- CLI


def resolve_params(overrides: Mapping[str, Any] | None = None, recipe: Path | None = None) -> CRFParams:
    """Defaults, then the recipe's ``[crf]`` section, then explicit (non-None) CLI values."""
    params = load_crf_params(recipe) if recipe is not None else CRFParams()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(CRF_FIELDS))
    if unknown:
        raise UsageError(f"unknown CRF option {unknown[0]}")
    merged = params.to_dict() | overrides
    return crf_params_from_dict(merged, "command line")


def crf_refine_command(
    images: Path,
    probs: Path,
    out: Path,
    overrides: Mapping[str, Any] | None = None,
    recipe: Path | None = None,
    labels: Path | None = None,
    search: bool = False,
    workers: int = 2,
) -> None:
    """``msattn crf-refine``: refine a folder of saved probabilities, or grid-search the CRF settings."""
    from rich.console import Console

    params = resolve_params(overrides, recipe)
    _import_densecrf()  # a missing pydensecrf stops here, before any file is read or written
    console = Console(highlight=False, soft_wrap=True)
    if not search:
        if labels is not None:
            raise UsageError("--labels is only used with --search")
        counts = refine_folder(images, probs, out, params, workers)
        console.print(
            f"refined {counts['refined']}, already done {counts['skipped_done']}, "
            f"failed {counts['failed']} -> {out}"
        )
        return
    if labels is None:
        raise UsageError("--search needs --labels DIR (ground-truth label PNGs)")
    # settings given on the command line stay fixed; the others are searched
    grid = {key: (overrides[key],) if overrides.get(key) is not None else values for key, values in SEARCH_GRID.items()}
    rows = grid_search(images, probs, labels, params, grid=grid, workers=workers)
    _print_search(console, rows)
    from msattn.io import write_json

    best = next(r for r in rows if r["params"] is not None)
    write_json(out / "crf_search.json", {"best": best["params"] | {"miou": best["miou"]}, "results": rows})
    console.print(f"results written to {out / 'crf_search.json'}")


def _print_search(console: Any, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="CRF grid search (mIoU, %)")
    for key in SEARCH_GRID:
        table.add_column(key, justify="right")
    table.add_column("mIoU", justify="right")
    for row in rows:
        cells = ["-" if row[k] is None else f"{row[k]:g}" for k in SEARCH_GRID]
        if row["params"] is None:
            cells = ["no CRF"] + [""] * (len(cells) - 1)
        table.add_row(*cells, f"{100 * row['miou']:.2f}")
    console.print(table)
    best = next(r for r in rows if r["params"] is not None)
    baseline = next(r for r in rows if r["params"] is None)
    setting = " ".join(f"--{k.replace('_', '-')} {best[k]:g}" for k in SEARCH_GRID)
    console.print(
        f"best: {setting} (mIoU {100 * best['miou']:.2f}, without CRF {100 * baseline['miou']:.2f})"
    )
