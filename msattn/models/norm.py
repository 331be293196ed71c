"""BatchNorm of the backbones that have it: frozen (DeepLab-v2's default), trained, or synchronised.

DeepLab-v2 trains its ResNet with small batches and keeps every BatchNorm layer fixed at its
ImageNet values (Caffe's ``use_global_stats: true`` and a Scale layer with ``lr_mult: 0``):
:class:`FrozenBatchNorm2d` is that layer, ``y = (x - mean) / sqrt(var + eps) * weight + bias``
with nothing learnt and no batch statistics, in training as in evaluation. Its ``weight`` and
``bias`` are parameters that do not require gradients (so parameter counts include them and no
optimizer group holds them); its state-dict keys are BatchNorm2d's (``num_batches_tracked`` is
accepted and dropped), so weights move between the modes.

``batchnorm = "train"`` builds :class:`torch.nn.BatchNorm2d`; ``"sync"`` builds the same and
:func:`sync_batchnorm` turns it into :class:`torch.nn.SyncBatchNorm` where training runs under
torchrun (evaluation, export and single-process runs keep plain BatchNorm2d).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from msattn.models.spec import BATCHNORMS

NormFactory = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (no gradient, no running updates)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, float(eps)
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d's counter: nothing to keep
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def norm_factory(mode: str, eps: float = 1e-5, momentum: float = 0.1) -> NormFactory:
    """A function ``channels -> BatchNorm layer`` for ``mode`` (see :data:`msattn.models.spec.BATCHNORMS`)."""
    if mode not in BATCHNORMS:
        raise ValueError(f"batchnorm must be one of {BATCHNORMS}, got {mode!r}")
    if mode == "frozen":
        return lambda channels: FrozenBatchNorm2d(channels, eps=eps)
    return lambda channels: nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every plain BatchNorm2d / SyncBatchNorm under ``module`` by a :class:`FrozenBatchNorm2d`
    holding its values (in place where possible; returns the module, replaced if it is one itself)."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``batchnorm = "sync"``: BatchNorm2d -> SyncBatchNorm, for training under torchrun (DDP).

    Call it on the model before wrapping it in DistributedDataParallel, only when the spec asks
    for it (``model.spec.batchnorm == "sync"``) and the run is distributed; the state dict keys
    are unchanged, so checkpoints load into a plain BatchNorm2d model for evaluation and export.
    """
    spec = getattr(model, "spec", None)
    if spec is None or spec.batchnorm != "sync":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def frozen_batchnorm_count(module: nn.Module) -> int:
    """How many frozen BatchNorm layers ``module`` has (timm's own frozen layers included)."""
    return sum(1 for m in module.modules() if type(m).__name__.startswith("FrozenBatchNorm"))
