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
from msattn.errors import CheckpointError
from msattn.io import atomic_write

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
    from msattn.models.scale import ARCH_VERSION

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
    from msattn.models import build_model

    args = state.get("model_args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: malformed checkpoint (model_args is not a table)")
    args = dict(args)
    if arch_version(state) < 2:
        args.setdefault("pool5a", False)
    try:
        model = build_model(**args)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: model weights do not match the stored model arguments ({first})") from None
    return model.eval()
