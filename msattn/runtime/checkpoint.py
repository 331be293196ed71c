"""Checkpoints: one self-describing file that evaluate/predict need nothing beside.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(..., weights_only=True)`` and no pickled code ever runs.
It is written to a temporary file in the same folder and renamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msattn import __version__
from msattn.config.recipe import Recipe, recipe_from_dict
from msattn.errors import CheckpointError, ConfigError
from msattn.io import atomic_write
from msattn.models.scale import ARCH_VERSION, build_model
from msattn.models.spec import ModelSpec

FORMAT = "msattn-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "model_args", "dataset")


def make_checkpoint(
    model: torch.nn.Module,
    dataset: dict[str, Any],
    config: dict[str, Any] | None = None,
    iteration: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a checkpoint dict; ``extra`` holds optimizer/scheduler/scaler/rng/best_miou/metrics."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch_version": ARCH_VERSION,
        "msattn_version": __version__,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_args": dict(model.model_args),
        "dataset": dict(dataset),
        "config": config or {},
        "iteration": int(iteration),
        **extra,
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a failed write (disk full, kill) leaves the previous file intact."""
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint safely (``weights_only=True``); problems raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains pickled Python objects, which msattn refuses to load (weights_only=True)"
        raise CheckpointError(f"{path}: not a loadable msattn checkpoint: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an msattn checkpoint (made by another tool?)")
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: not an msattn checkpoint (its format version is missing or malformed)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this msattn ({__version__}) reads; upgrade msattn"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def arch_version(state: dict[str, Any]) -> int:
    """The architecture version a checkpoint was trained with (1: before pool5a and the corner-aligned grid)."""
    version = state.get("arch_version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def old_arch_warning(state: dict[str, Any], source: str | Path = "checkpoint") -> str | None:
    """A warning for checkpoints of architecture version 1, else None."""
    if arch_version(state) >= 2:
        return None
    return (
        f"{source} was trained by msattn 0.1 (architecture 1: no pool5a, centre-aligned resizing); it runs as "
        "trained, without pool5a, but on the corner-aligned grid of this version: scores may differ slightly "
        "from those it was selected with; retrain for DeepLab-exact results"
    )


def model_from_checkpoint(state: dict[str, Any], source: str | Path = "checkpoint") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes, load its weights and put it in eval mode.

    Checkpoints of architecture version 1 (no pool5a) are rebuilt without pool5a; callers
    show :func:`old_arch_warning`.
    """
    args = state.get("model_args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: malformed checkpoint (model_args is not a table)")
    args = dict(args)
    if arch_version(state) < 2:
        args.setdefault("pool5a", False)
    try:
        model = build_model(ModelSpec.from_args(args))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: model weights do not match the stored model arguments ({first})") from None
    return model.eval()


def dataset_meta(state: dict[str, Any], source: str | Path = "checkpoint") -> dict[str, Any]:
    """The checkpoint's ``dataset`` section, checked: CheckpointError naming ``dataset.<key>`` when malformed.

    Returns ``name`` (str), ``classes`` (list of str or None), ``palette`` ([[r, g, b], ...] or
    None), ``mean``/``std`` (3 floats or None), ``ignore_index`` (int) and ``root`` (str).
    """
    meta = state.get("dataset")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: malformed checkpoint (dataset is not a table)")

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{source}: malformed checkpoint: dataset.{key} must be {want}, got {meta.get(key)!r:.60}")

    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise bad("classes", "a list of class names")
    palette = meta.get("palette")
    if palette is not None and not (
        isinstance(palette, list)
        and all(isinstance(rgb, (list, tuple)) and len(rgb) == 3 for rgb in palette)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for rgb in palette for v in rgb)
    ):
        raise bad("palette", "a list of [r, g, b] colours (0..255)")
    norm = {}
    for key in ("mean", "std"):
        value = meta.get(key)
        ok = value is None or (
            isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and (key == "mean" or all(v > 0 for v in value))
        )  # fmt: skip
        if not ok:
            raise bad(key, "3 numbers (one per RGB channel" + (", positive)" if key == "std" else ")"))
        norm[key] = None if value is None else [float(v) for v in value]
    ignore_index = meta.get("ignore_index", 255)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not 0 <= ignore_index <= 255:
        raise bad("ignore_index", "an integer in 0..255")
    root = meta.get("root", "")
    name = meta.get("name", "")
    return {
        "name": str(name),
        "classes": None if classes is None else list(classes),
        "palette": None if palette is None else [list(rgb) for rgb in palette],
        "mean": norm["mean"],
        "std": norm["std"],
        "ignore_index": ignore_index,
        "root": "" if root is None else str(root),
    }


def checkpoint_recipe(state: dict[str, Any]) -> Recipe | None:
    """The checkpoint's recipe, or None when it has none or this version cannot read it."""
    if not state.get("config"):
        return None
    try:
        return recipe_from_dict(state["config"], source="checkpoint config")
    except ConfigError:
        return None
