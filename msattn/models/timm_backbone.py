"""``backbone = "timm:<name>"``: any timm model with ``features_only=True, output_stride=8``.

timm is an optional extra (``pip install "msattn[timm]"``): it needs the torchvision built for
the installed torch, so it is imported only when a ``timm:`` backbone is built. Every function
here takes the ``timm`` module as a parameter (None: import it), so the adapter's logic is
tested with a stand-in module where timm is not installed.

The trunk is ``timm.create_model(name, features_only=True, output_stride=8)``; its deepest
feature map (``feature_info``'s last entry, which must report reduction 8) goes to the head.
BatchNorm follows ``batchnorm``: frozen (timm's ``freeze_batch_norm_2d`` where it exists, then
msattn's :class:`~msattn.models.norm.FrozenBatchNorm2d` for plain BatchNorm2d layers), or as
timm builds it. **Geometry:** msattn's 8k+1 rule depends on the model's padding. Building the
trunk measures the output side of two 8k+1 inputs; ``grid_exact`` says whether they gave k+1
(ResNets, RegNets and EfficientNets do; ConvNeXt's 4x4 patchify stem does not: its outputs sit
between grid pixels and ScaleNet's resizing stays approximate).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import nn

from msattn.errors import UsageError
from msattn.models.norm import freeze_batchnorm
from msattn.models.spec import TIMM_PREFIX

OUTPUT_STRIDE = 8
#: 8k+1 sides whose outputs are measured when the trunk is built (k = 8 and 12)
PROBE_SIDES = (65, 97)
INSTALL_HINT = (
    'pip install "msattn[timm]" (timm needs the torchvision release built for your torch: install the '
    "matching torch/torchvision pair, e.g. torch 2.14.1 with torchvision 0.29.1)"
)


def timm_name(backbone: str) -> str:
    """``"timm:resnet50d"`` -> ``"resnet50d"``."""
    if not backbone.startswith(TIMM_PREFIX) or not backbone[len(TIMM_PREFIX):].strip():
        raise ValueError(f"not a timm backbone name: {backbone!r} (expected timm:<model name>)")
    return backbone[len(TIMM_PREFIX):].strip()


def import_timm(timm_module: ModuleType | Any | None = None) -> Any:
    """The timm module (``timm_module`` when given); UsageError saying how to install it."""
    if timm_module is not None:
        return timm_module
    try:
        return importlib.import_module("timm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's "operator torchvision::nms does not exist"
        raise UsageError(f"a timm: backbone needs timm, which cannot be imported ({type(exc).__name__}: {exc}); "
                         f"{INSTALL_HINT}") from None  # fmt: skip


def create_features_model(name: str, timm_module: Any = None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, features_only=True, output_stride=8, ...)``, errors naming the model."""
    timm = import_timm(timm_module)
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, output_stride=OUTPUT_STRIDE, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown model, no features_only/dilation support, offline...
        raise UsageError(
            f"timm model {name!r} cannot be built with features_only=True, output_stride={OUTPUT_STRIDE} "
            f"({type(exc).__name__}: {exc})"
        ) from None


class TimmTrunk(nn.Module):
    """A timm features_only model at output stride 8; ``forward`` -> its deepest feature map."""

    def __init__(self, name: str, batchnorm: str = "frozen", timm_module: Any = None) -> None:
        super().__init__()
        self.timm_name = name
        self.model = create_features_model(name, timm_module)
        info = getattr(self.model, "feature_info", None)
        if info is None:
            raise UsageError(f"timm model {name!r} has no feature_info: not a features_only model")
        reduction = int(info.reduction()[-1])
        if reduction != OUTPUT_STRIDE:
            raise UsageError(
                f"timm model {name!r} reaches output stride {reduction} with output_stride={OUTPUT_STRIDE}: msattn "
                f"needs {OUTPUT_STRIDE} (the model does not support dilation)"
            )
        self.out_channels = int(info.channels()[-1])
        self.batchnorm = batchnorm
        if batchnorm == "frozen":
            self.freeze(timm_module)
        self.probed = {side: self._measure(side) for side in PROBE_SIDES}
        self.grid_exact = all(out == (side - 1) // OUTPUT_STRIDE + 1 for side, out in self.probed.items())

    def freeze(self, timm_module: Any = None) -> None:
        """Freeze every BatchNorm layer (timm's own freezing first, for its fused BatchNormAct2d)."""
        timm = import_timm(timm_module)
        layers = getattr(timm, "layers", None)
        freeze = getattr(layers, "freeze_batch_norm_2d", None)
        if callable(freeze):
            self.model = freeze(self.model)
        self.model = freeze_batchnorm(self.model)

    @torch.no_grad()
    def _measure(self, side: int) -> int:
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(torch.zeros(1, 3, side, side))[-1]
        finally:
            self.model.train(was_training)
        return int(out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]

    def output_side(self, side: int) -> int:
        """Output side for an input side: measured (one forward pass) unless probed already."""
        if side not in self.probed:
            self.probed[side] = self._measure(side)
        return self.probed[side]


def timm_pretrained_features(name: str, source: str, timm_module: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """A pretrained features model and its ``pretrained_cfg``: ``source`` "timm" (timm's download,
    online) or a local weights file (``pretrained_cfg_overlay``)."""
    overlay = {} if source in ("timm", "imagenet") else {"pretrained_cfg_overlay": {"file": str(source)}}
    model = create_features_model(name, timm_module, pretrained=True, **overlay)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, dict(cfg)
