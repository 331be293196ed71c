"""Initial weights of a training run and the input normalisation they expect.

- ``model.pretrained = "torchvision"`` or a torchvision ``vgg16-*.pth``: ImageNet VGG-16,
  RGB on [0, 1] normalised with ImageNet's mean and std (``input_norm = "torchvision"``).
- ``model.pretrained = FILE.pt`` written by ``msattn convert-weights`` (DeepLab's
  ``init.caffemodel``, the paper's start): RGB 0..255 minus the Caffe mean
  (``input_norm = "caffe"``).
- ``model.init_from = RUN/last.pt``: an msattn checkpoint; tensors whose name and shape
  match are copied (a classifier for another class count stays freshly drawn), and the
  checkpoint's normalisation is kept.
- none: random initialisation (``input_norm = "torchvision"`` statistics).

``model.input_norm = "auto"`` takes the convention of the weights; an explicit value that
contradicts them is honoured with a warning. ``data.mean``/``data.std`` override both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msattn.config.recipe import Recipe
from msattn.data.transforms import INPUT_NORMS
from msattn.errors import CheckpointError
from msattn.models.caffe import is_converted_weights
from msattn.models.convert import init_from_largefov, init_from_vgg16, load_vgg16_state_dict
from msattn.runtime.checkpoint import load_checkpoint


@dataclass(frozen=True)
class InputNorm:
    """The normalisation a run uses: its name and the RGB mean/std on [0, 1]."""

    name: str  # "torchvision", "caffe" or "custom"
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_pretrained(source: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """ImageNet weights for ``model.pretrained``: (state dict, layout, input norm).

    layout is ``"torchvision"`` (torchvision VGG-16 keys, converted by
    :func:`msattn.models.convert.init_from_vgg16`) or ``"largefov"`` (backbone keys, from
    ``msattn convert-weights``).
    """
    if source != "torchvision" and Path(source).suffix.lower() == ".caffemodel":
        raise CheckpointError(
            f"{source}: convert the Caffe model first: msattn convert-weights {source} --out init.pt, "
            "then set model.pretrained to init.pt"
        )
    state = load_vgg16_state_dict(source)
    if is_converted_weights(state):
        weights = state.get("state_dict")
        if not isinstance(weights, dict):
            raise CheckpointError(f"{source}: malformed converted weights (no state_dict)")
        return weights, "largefov", str(state.get("input_norm", "caffe"))
    return state, "torchvision", "torchvision"


@dataclass
class InitialWeights:
    """What a new run starts from: ``kind`` is "random", "vgg16" (torchvision layout), "largefov"
    (converted Caffe weights) or "checkpoint"; ``input_norm`` is what those weights expect."""

    kind: str
    source: str | None = None
    state: dict[str, torch.Tensor] | None = None
    input_norm: str | None = None


def load_initial_weights(recipe: Recipe) -> InitialWeights:
    """Read model.pretrained or model.init_from once (errors name the file), before any training."""
    model = recipe.model
    if model.pretrained is not None:
        state, layout, norm = load_pretrained(model.pretrained)
        return InitialWeights("largefov" if layout == "largefov" else "vgg16", model.pretrained, state, norm)
    if model.init_from is not None:
        ckpt = load_checkpoint(model.init_from)
        return InitialWeights("checkpoint", model.init_from, ckpt["model"], checkpoint_input_norm(ckpt))
    return InitialWeights("random")


def checkpoint_input_norm(state: dict[str, Any]) -> str:
    """The ``input_norm`` recorded in a checkpoint (older ones: "torchvision" or "custom" by their mean)."""
    meta = state.get("dataset") or {}
    name = meta.get("input_norm")
    if isinstance(name, str):
        return name
    mean = tuple(float(v) for v in meta.get("mean") or ())
    return next((k for k, (m, _) in INPUT_NORMS.items() if mean and all(abs(a - b) < 1e-6 for a, b in zip(m, mean))),
                "custom")


def resolve_input_norm(recipe: Recipe, from_weights: str | None, warn: Any = print) -> InputNorm:
    """The run's normalisation: data.mean/std if set, else model.input_norm (``auto``: the weights')."""
    wanted = recipe.model.input_norm
    known = from_weights if from_weights in INPUT_NORMS else None
    if wanted == "auto":
        name = known or "torchvision"
    else:
        name = wanted
        if known is not None and known != wanted:
            warn(f"warning: model.input_norm = {wanted!r}, but the initial weights expect {known!r} inputs")
    mean, std = INPUT_NORMS[name]
    if recipe.data.mean is not None or recipe.data.std is not None:
        mean = recipe.data.mean or mean
        std = recipe.data.std or std
        name = "custom"
    return InputNorm(name, tuple(mean), tuple(std))


def apply_initial_weights(model: torch.nn.Module, initial: InitialWeights, console: Any) -> None:
    """Load :func:`load_initial_weights`' result into a freshly built model (random: nothing to do)."""
    if initial.kind == "random" or initial.state is None:
        return
    if initial.kind == "checkpoint":
        init_from_state(model, initial.state, str(initial.source), console)
        return
    console.print(f"initialising from ImageNet VGG-16 ({initial.source}; {initial.input_norm} inputs)", markup=False)
    if initial.kind == "largefov":
        init_from_largefov(model, initial.state, str(initial.source))
    else:
        init_from_vgg16(model, initial.state)


def init_from_state(model: torch.nn.Module, source: dict[str, torch.Tensor], path: str, console: Any) -> None:
    """Copy every tensor of a checkpoint's weights whose name and shape match; report what stays fresh."""
    own = model.state_dict()
    usable = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.features.") for k in usable):
        raise CheckpointError(f"{path}: no backbone weight matches this model (another width?); nothing to start from")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    console.print(
        f"initialised {len(usable)} tensors from {path}" + (f"; kept fresh: {', '.join(skipped)}" if skipped else ""),
        markup=False,
    )
