"""``--resume``: load ``last.pt`` and put every piece of state back.

A resumed run continues bit for bit on CPU: model, optimizer, LambdaLR schedule, GradScaler,
every rank's RNG states (torch CPU, every CUDA device, numpy, python) and the iteration,
from which the data stream follows (:mod:`msattn.train.stream`). On CUDA the same
state is restored; the continuation is exact as far as the kernels are deterministic
(``train.deterministic = true``) and choose the same algorithms in the new process.

A checkpoint that does not fit the recipe is refused with the recipe keys that differ;
keys that changed but fit (more iterations, another lr) are named in a warning that says
what the change does to the continuation.

Another number of processes (or another ``train.micro_batch``) is fine: iteration ``t``
reads the same global batch whatever the split (:func:`msattn.train.stream.split_batch`),
its loss is a mean over that whole batch, and weights, optimizer, schedule and scaler are
the same on every rank. The run then continues as the uninterrupted one up to float
rounding; what cannot carry over is each rank's RNG (dropout masks: drawn afresh, with a
warning) and, for BatchNorm layers that learn per process, the statistics of other passes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from msattn.config.recipe import Recipe, recipe_diff, recipe_from_dict, recipe_to_dict
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from msattn.errors import CheckpointError, ConfigError
from msattn.runtime.checkpoint import load_checkpoint
from msattn.runtime.distributed import DistInfo
from msattn.train.step import optimizer_kernels
from msattn.train.stream import backend_record, restore_rng, seed_everything
from msattn.train.weights import InputNorm, checkpoint_input_norm


def load_resume_state(out_dir: Path, resume: bool, console: Console) -> dict[str, Any] | None:
    """``<out>/last.pt`` when resuming (None for a new run)."""
    last = out_dir / "last.pt"
    if not resume:
        return None
    if not last.is_file():
        console.print(f"no {last} yet: starting a new run", markup=False)
        return None
    return load_checkpoint(last)


def recipe_changes(state: dict[str, Any], recipe: Recipe) -> list[str] | None:
    """``key (old -> new)`` for every recipe key that differs from the checkpoint's; None when unreadable."""
    try:
        previous = recipe_from_dict(state.get("config", {}), source="checkpoint config")
    except ConfigError:
        return None
    old, new = recipe_to_dict(previous), recipe_to_dict(recipe)
    changes = []
    for key in recipe_diff(previous, recipe):
        section, name = key.split(".", 1)
        changes.append(f"{key} ({json.dumps(old[section][name])} -> {json.dumps(new[section].get(name))})")
    return changes


def restore_training_state(
    state: dict[str, Any], source: Path, recipe: Recipe, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, scaler: Any, info: DistInfo, console: Console,
) -> tuple[int, float, dict[str, Any]]:  # fmt: skip
    """Restore everything from a checkpoint; returns (iteration, best mIoU, last validation metrics)."""
    changes = recipe_changes(state, recipe)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a checkpoint's groups bring the kernels of where it was written
            group.update(optimizer_kernels(info.device))
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = f"the recipe differs from the checkpoint's in {', '.join(changes)}" if changes else \
            f"the checkpoint does not match this recipe ({first})"
        raise CheckpointError(
            f"{source}: cannot resume: {why}; resume with the run's own recipe ({source.parent / 'config.json'}) "
            "or train into another --out"
        ) from None
    _warn_changes(changes, recipe, source, console)
    _warn_backends(state.get("backends"), info.device, console)
    _restore_rng_states(state, recipe, info, console)
    best = state.get("best_miou")
    iteration = int(state["iteration"])
    console.print(f"resumed from iteration {iteration}")
    metrics = state.get("metrics") or {}
    return iteration, (best if isinstance(best, float) else -math.inf), metrics


#: keys that change how a batch is split into forward passes, not what a step computes
SPLIT_ONLY = ("train.micro_batch",)


def _warn_changes(changes: list[str] | None, recipe: Recipe, source: Path, console: Console) -> None:
    if changes is None:
        console.print(f"warning: {source}: the checkpoint's recipe is unreadable by this version; resuming anyway",
                      markup=False)  # fmt: skip
        return
    if not changes:
        return
    note = "the run will not match an uninterrupted one"
    if all(c.split(" ", 1)[0] in SPLIT_ONLY for c in changes):
        note = "the batches are only split into other forward passes: the same batches and loss up to float rounding"
    elif any(c.startswith("train.iterations ") for c in changes) and recipe.optim.schedule == "poly":
        note += f" (the poly schedule now decays to 0 at iteration {recipe.train.iterations})"
    console.print(f"warning: resuming {source} with changed keys: {', '.join(changes)}; {note}", markup=False)


def _warn_backends(saved: Any, device: torch.device, console: Console) -> None:
    if not isinstance(saved, dict):
        return
    now = backend_record(device)
    changed = [key for key in now if key in saved and saved[key] != now[key]]
    if changed:
        console.print(
            f"warning: kernel settings changed since the checkpoint ({', '.join(changed)}): "
            "the continuation may differ from an uninterrupted run in the last bits",
            markup=False,
        )


def _restore_rng_states(state: dict[str, Any], recipe: Recipe, info: DistInfo, console: Console) -> None:
    """This rank's RNG states; reseeded, with a warning, when the checkpoint lacks them (other world size, DDP)."""
    states = (state.get("rng") or {}).get("per_rank") or []
    mine = states[info.rank] if len(states) == info.world_size else None
    if mine is not None:
        restore_rng(mine, info.device)
        return
    if len(states) != info.world_size:
        console.print(f"warning: checkpoint has RNG states of {len(states)} rank(s), this run has "
                      f"{info.world_size}: the batches, their loss and the weights continue exactly (up to float "
                      "rounding), dropout masks are drawn afresh", markup=False)  # fmt: skip
    else:
        console.print(f"warning: the checkpoint was saved after a failure without rank {info.rank}'s RNG state: "
                      "data order is exact, this rank's dropout masks are not")  # fmt: skip
    seed_everything(recipe.train.seed + 1000 * info.rank + int(state["iteration"]))


def resume_input_norm(state: dict[str, Any]) -> Any:
    """The normalisation a checkpoint's run used (a resumed run keeps it)."""
    meta = state.get("dataset") or {}
    mean = tuple(float(v) for v in meta.get("mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in meta.get("std") or IMAGENET_STD)
    return InputNorm(checkpoint_input_norm(state), mean, std)
