"""What a model is: one dataclass holding every argument of the share-net.

A :class:`ModelSpec` is built once (from a recipe by training, from a checkpoint by every
other command) and handed to :func:`msattn.models.scale.build_model`. Checkpoints store it
flat as ``model_args`` (:meth:`ModelSpec.to_args`), the format msattn 0.1 wrote, so old
checkpoints load unchanged (:meth:`ModelSpec.from_args`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the merges of "Attention to Scale" (Chen et al. 2016): one weight map per scale, over a fixed scale set
MERGES = ("max", "avg", "attention")
#: hierarchical multi-scale attention (Tao, Sapra & Catanzaro 2020; :mod:`msattn.models.hierarchical`):
#: trained on two scales, run on any list that holds 1.0. Not in ``MERGES``, whose users (benchmark
#: cases, scale-subset analysis) build every merge over any scale set.
HIERARCHICAL = "hierarchical"
#: every ``ModelSpec.merge``
MODEL_MERGES = (*MERGES, HIERARCHICAL)
ATTENTION_INITS = ("normal", "zero")
ATTENTION_NORMS = ("none", "l2")
#: DeepLab-LargeFOV's fc6 dilation
FC6_DILATION = 12

#: keys beyond the paper: stored in ``model_args`` only when they differ from these defaults,
#: so checkpoints of the paper's network keep the keys msattn 0.1 wrote
_OPTIONAL_ARGS: dict[str, Any] = {
    "attention_init": "normal",
    "attention_temperature": 1.0,
    "attention_norm": "none",
    "fc6_dilation": FC6_DILATION,
}
#: options of the softmax attention head that a hierarchical model refuses when not at their defaults
_SOFTMAX_HEAD_ARGS = ("attention_init", "attention_temperature", "attention_norm")


@dataclass(frozen=True)
class ModelSpec:
    """Every argument of the share-net (see :class:`msattn.models.scale.ScaleNet`).

    ``width`` scales every channel count (1 = the paper's network; tiny widths make test and
    demo models). ``dropout`` follows fc6 and fc7; ``attention_dropout`` follows the attention
    head's first layer (None: the same as ``dropout``). ``pool5a=False`` rebuilds the network of
    msattn checkpoints older than architecture version 2. ``attention_init``,
    ``attention_temperature`` and ``attention_norm`` are the attention head's options beyond the
    paper (see :class:`msattn.models.scale.AttentionHead`); ``fc6_dilation`` (DeepLab-LargeFOV: 12)
    scales the field of view down for small images.
    """

    num_classes: int
    scales: tuple[float, ...] = (1.0,)
    merge: str = "attention"
    extra_supervision: bool = True
    width: float = 1.0
    dropout: float = 0.5
    attention_hidden: int = 512
    attention_dropout: float | None = None
    pool5a: bool = True
    attention_init: str = "normal"
    attention_temperature: float = 1.0
    attention_norm: str = "none"
    fc6_dilation: int = FC6_DILATION

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        check_scales(scales)
        object.__setattr__(self, "scales", scales)
        if self.attention_dropout is None:
            object.__setattr__(self, "attention_dropout", self.dropout)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.merge not in MODEL_MERGES:
            raise ValueError(f"merge must be one of {MODEL_MERGES}, got {self.merge!r}")
        if self.attention_init not in ATTENTION_INITS:
            raise ValueError(f"attention init must be one of {ATTENTION_INITS}, got {self.attention_init!r}")
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"attention norm must be one of {ATTENTION_NORMS}, got {self.attention_norm!r}")
        if not self.attention_temperature > 0:
            raise ValueError(f"attention temperature must be > 0, got {self.attention_temperature}")
        if self.fc6_dilation < 1:
            raise ValueError(f"fc6_dilation must be >= 1, got {self.fc6_dilation}")
        if self.merge == HIERARCHICAL:
            problem = hierarchical_training_problem(self.scales)
            if problem:
                raise ValueError(problem)
            changed = [key for key in _SOFTMAX_HEAD_ARGS if getattr(self, key) != _OPTIONAL_ARGS[key]]
            if changed:
                raise ValueError(
                    f"{changed[0]} is an option of the softmax attention head (merge 'attention'); "
                    "a hierarchical model's gate head has no such option"
                )

    @property
    def has_attention_head(self) -> bool:
        """True when the model has the paper's softmax attention head (attention merging over >= 2 scales)."""
        return self.merge == "attention" and len(self.scales) > 1

    @property
    def is_hierarchical(self) -> bool:
        """True for hierarchical multi-scale attention (a sigmoid gate head, any scales holding 1.0 at test time)."""
        return self.merge == HIERARCHICAL

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_args(self) -> dict[str, Any]:
        """The flat ``model_args`` table a checkpoint stores (keys beyond the paper only when set)."""
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        args["scales"] = list(self.scales)
        for key, default in _OPTIONAL_ARGS.items():
            if args[key] == default:
                del args[key]
        return args

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ModelSpec:
        """The spec a checkpoint's ``model_args`` describes; unknown or missing keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown model argument {unknown[0]!r}")
        if "num_classes" not in args:
            raise ValueError("model arguments lack num_classes")
        return cls(**dict(args))


def check_scales(scales: tuple[float, ...]) -> None:
    """Scales must be at least one, positive and distinct (ValueError otherwise)."""
    if not scales:
        raise ValueError("at least one scale is needed")
    if any(not (s > 0) for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"scales must be distinct, got {scales}")


def hierarchical_training_problem(scales: tuple[float, ...]) -> str | None:
    """Why ``scales`` cannot train a hierarchical model (None when they can: two scales, one of them 1.0)."""
    if len(scales) != 2 or 1.0 not in scales:
        return (
            "a hierarchical model trains on exactly two scales, one of them 1.0 (e.g. [1.0, 0.5]), "
            f"got {list(scales)}; more scales are for inference (e.g. eval.scales = [2.0, 1.0, 0.5])"
        )
    return None


def hierarchical_inference_problem(scales: tuple[float, ...]) -> str | None:
    """Why a hierarchical model cannot run on ``scales`` (None when it can: 1.0 is among them)."""
    if 1.0 not in scales:
        return (
            f"a hierarchical model needs scale 1.0 among its scales (its output is on the 1.0 grid), got {list(scales)}"
        )
    return None
