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

MERGES = ("max", "avg", "attention")
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
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.attention_init not in ATTENTION_INITS:
            raise ValueError(f"attention init must be one of {ATTENTION_INITS}, got {self.attention_init!r}")
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"attention norm must be one of {ATTENTION_NORMS}, got {self.attention_norm!r}")
        if not self.attention_temperature > 0:
            raise ValueError(f"attention temperature must be > 0, got {self.attention_temperature}")
        if self.fc6_dilation < 1:
            raise ValueError(f"fc6_dilation must be >= 1, got {self.fc6_dilation}")

    @property
    def has_attention_head(self) -> bool:
        """True when the model learns per-pixel scale weights (attention merging over >= 2 scales)."""
        return self.merge == "attention" and len(self.scales) > 1

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
