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
#: the backbones msattn builds itself (``timm:<name>`` adds any timm model, see :data:`TIMM_PREFIX`)
BACKBONES = ("vgg16_largefov", "resnet101", "resnet50", "efficientnet_lite0")
DEFAULT_BACKBONE = "vgg16_largefov"
TIMM_PREFIX = "timm:"
#: classifier heads on a backbone's features: DeepLab-v2's ASPP-L or DeepLab-LargeFOV's fc6/fc7/fc8
HEADS = ("aspp", "largefov")
#: BatchNorm of backbones that have it: frozen (DeepLab-v2), trained per process, or synchronised (torchrun)
BATCHNORMS = ("frozen", "train", "sync")
#: DeepLab-v2's ASPP-L dilations
ASPP_DILATIONS = (6, 12, 18, 24)
RESNETS = ("resnet101", "resnet50")
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
    "backbone": DEFAULT_BACKBONE,
    "batchnorm": "frozen",
    "stride_in_1x1": False,
    "aspp_dilations": list(ASPP_DILATIONS),
}
#: options of the softmax attention head that a hierarchical model refuses when not at their defaults
_SOFTMAX_HEAD_ARGS = ("attention_init", "attention_temperature", "attention_norm")


def known_backbones() -> str:
    """The backbone names, for error messages."""
    return ", ".join((*BACKBONES, f"{TIMM_PREFIX}<name>"))


def check_backbone(name: str) -> None:
    """ValueError for an unknown backbone name (listing the known ones)."""
    if not isinstance(name, str) or not (name in BACKBONES or (name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):].strip())):
        raise ValueError(f"unknown backbone {name!r}: the known backbones are {known_backbones()}")


def default_head(backbone: str) -> str:
    """The classifier head a backbone gets unless told otherwise: LargeFOV for VGG-16, ASPP-L for the others."""
    return "largefov" if backbone == DEFAULT_BACKBONE else "aspp"


def has_batchnorm(backbone: str) -> bool:
    """Whether a backbone has BatchNorm layers (VGG-16 LargeFOV has none)."""
    return backbone != DEFAULT_BACKBONE


@dataclass(frozen=True)
class ModelSpec:
    """Every argument of the share-net (see :class:`msattn.models.scale.ScaleNet`).

    ``width`` scales every channel count (1 = the paper's network; tiny widths make test and
    demo models). ``dropout`` follows fc6 and fc7; ``attention_dropout`` follows the attention
    head's first layer (None: the same as ``dropout``). ``pool5a=False`` rebuilds the network of
    msattn checkpoints older than architecture version 2. ``attention_init``,
    ``attention_temperature`` and ``attention_norm`` are the attention head's options beyond the
    paper (see :class:`msattn.models.scale.AttentionHead`); ``fc6_dilation`` (DeepLab-LargeFOV: 12)
    scales the field of view down for small images (LargeFOV heads).

    ``backbone`` is one of :data:`BACKBONES` or ``"timm:<name>"``; ``head`` is its classifier,
    ``"aspp"`` (DeepLab-v2's ASPP-L, four 3x3 branches with ``aspp_dilations``, summed) or
    ``"largefov"`` (fc6/fc7/fc8); None takes the backbone's default (:func:`default_head`: LargeFOV
    for VGG-16, ASPP-L for the others). ``batchnorm`` is ``"frozen"`` (DeepLab-v2: statistics and
    affine fixed), ``"train"`` or ``"sync"`` (SyncBatchNorm under torchrun), for backbones with
    BatchNorm. ``stride_in_1x1`` puts a ResNet block's stride in its first 1x1 convolution
    (Caffe's layout, DeepLab-v2's converted weights) instead of the 3x3 (torchvision's).
    ``width`` scales every channel count msattn chooses (timm backbones have their model's: width 1).
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
    backbone: str = DEFAULT_BACKBONE
    head: str | None = None
    batchnorm: str = "frozen"
    stride_in_1x1: bool = False
    aspp_dilations: tuple[int, ...] = ASPP_DILATIONS

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
        self._check_backbone()

    def _check_backbone(self) -> None:
        check_backbone(self.backbone)
        if self.head is None:
            object.__setattr__(self, "head", default_head(self.backbone))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.backbone == DEFAULT_BACKBONE and self.head != "largefov":
            raise ValueError(f"the {DEFAULT_BACKBONE} backbone has the LargeFOV head only, got head {self.head!r}")
        if self.batchnorm not in BATCHNORMS:
            raise ValueError(f"batchnorm must be one of {BATCHNORMS}, got {self.batchnorm!r}")
        if self.batchnorm != "frozen" and not has_batchnorm(self.backbone):
            raise ValueError(f"the {self.backbone} backbone has no BatchNorm: batchnorm {self.batchnorm!r} does not apply")
        if not self.pool5a and self.backbone != DEFAULT_BACKBONE:
            raise ValueError(f"pool5a belongs to {DEFAULT_BACKBONE}; the {self.backbone} backbone has none")
        if self.stride_in_1x1 and self.backbone not in RESNETS:
            raise ValueError(f"stride_in_1x1 is a ResNet layout ({', '.join(RESNETS)}), not one of {self.backbone}")
        dilations = tuple(int(d) for d in self.aspp_dilations)
        if not dilations or any(d < 1 for d in dilations) or dilations != tuple(self.aspp_dilations):
            raise ValueError(f"aspp_dilations must be one or more integers >= 1, got {self.aspp_dilations!r}")
        object.__setattr__(self, "aspp_dilations", dilations)
        if self.head != "aspp" and dilations != ASPP_DILATIONS:
            raise ValueError(f"aspp_dilations belong to the ASPP head; this model's head is {self.head!r}")
        if self.head != "largefov" and self.fc6_dilation != FC6_DILATION:
            raise ValueError(f"fc6_dilation belongs to the LargeFOV head; this model's head is {self.head!r}")
        if self.backbone.startswith(TIMM_PREFIX) and self.width != 1.0:
            raise ValueError(f"a timm backbone has its model's channel counts: width must be 1, got {self.width}")

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
        args["aspp_dilations"] = list(self.aspp_dilations)
        for key, default in _OPTIONAL_ARGS.items():
            if args[key] == default:
                del args[key]
        if args["head"] == default_head(self.backbone):  # None rebuilds it
            del args["head"]
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
