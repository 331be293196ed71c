"""Share-net over scales and its merges: max, average, attention to scale, and hierarchical attention.

The hierarchical merge (Tao et al. 2020) lives in :mod:`msattn.models.hierarchical`; ScaleNet only dispatches to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from msattn.geometry import resize_bilinear, scaled_size
from msattn.models.backbone import scaled
from msattn.models.backbones import build_backbone
from msattn.models.hierarchical import GATE_HIDDEN, GateHead, hierarchical_forward
from msattn.models.spec import ATTENTION_INITS, ATTENTION_NORMS, ModelSpec, check_scales

#: 1: no pool5a, align_corners=False resizing (msattn <= 0.1 checkpoints); 2: DeepLab-exact
ARCH_VERSION = 2


class AttentionHead(nn.Module):
    """The paper's attention model: 3x3 conv (hidden) + ReLU (+ dropout), 1x1 conv to S, softmax over S.

    Options beyond the paper (defaults = the paper): ``init="zero"`` starts the score layer at
    zero (uniform weights at the start); ``temperature`` divides the scores before the
    softmax; ``norm="l2"`` scales every scale's fc7 feature vector to unit RMS per position
    before the head, so the scores cannot grow with the features' magnitude.
    """

    def __init__(
        self,
        feature_channels: int,
        num_scales: int,
        hidden: int = 512,
        dropout: float = 0.5,
        init: str = "normal",
        temperature: float = 1.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if init not in ATTENTION_INITS:
            raise ValueError(f"attention init must be one of {ATTENTION_INITS}, got {init!r}")
        if norm not in ATTENTION_NORMS:
            raise ValueError(f"attention norm must be one of {ATTENTION_NORMS}, got {norm!r}")
        if not temperature > 0:
            raise ValueError(f"attention temperature must be > 0, got {temperature}")
        self.num_scales, self.temperature, self.norm = num_scales, float(temperature), norm
        self.conv1 = nn.Conv2d(feature_channels * num_scales, hidden, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, num_scales, 1)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if init == "zero":
            nn.init.zeros_(self.conv2.weight)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, S*F, h, w] -> pre-softmax scores [N, S, h, w] (divided by the temperature)."""
        if self.norm == "l2":
            n, sf, h, w = feats.shape
            per_scale = feats.reshape(n, self.num_scales, sf // self.num_scales, h, w)
            rms = per_scale.pow(2).mean(dim=2, keepdim=True).add(1e-6).sqrt()
            feats = (per_scale / rms).reshape(n, sf, h, w)
        scores = self.conv2(self.drop(torch.relu(self.conv1(feats))))
        return scores / self.temperature if self.temperature != 1.0 else scores

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [N, S*F, h, w] -> weights [N, S, h, w] (softmax over the scale axis)."""
        return torch.softmax(self.scores(feats), dim=1)


class ScaleNet(nn.Module):
    """A backbone (DeepLab-LargeFOV by default) shared across input scales, with max/avg/attention merging.

    With one scale it is the plain backbone (DeepLab-LargeFOV for ``vgg16_largefov``). The
    backbone is built from ``spec`` (:func:`msattn.models.backbones.build_backbone`) unless one
    is given (e.g. a ``timm:`` backbone built with a stand-in timm module). ``forward`` returns a dict with
    ``"out"`` (merged logits at output stride 8 of the largest scale), ``"per_scale"``
    (one logit map per scale at its own resolution), ``"attention"`` ([N, S, h, w] merge
    weights, ``None`` with a single scale) and ``"scales"``.

    Scale inputs and the resizing of score maps and features to the reference grid follow
    :mod:`msattn.geometry` (corner-aligned; give inputs of 8k+1 pixels per side for an exact grid).

    ``merge="hierarchical"`` (:mod:`msattn.models.hierarchical`) has a sigmoid gate head
    (``self.gate``; ``self.head`` stays None) and chains any scales that hold 1.0: ``"out"`` is
    on the 1.0 grid (not the largest scale's), ``"attention"`` holds the chain's effective
    weights (summing to 1) and the dict has one more key, ``"gates"`` (each scale's sigmoid
    map on its own grid, None for the highest scale, whose gate the chain does not use).
    """

    def __init__(self, spec: ModelSpec, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.scales = spec.scales
        self.merge = spec.merge
        self.extra_supervision = spec.extra_supervision
        self.backbone = build_backbone(spec) if backbone is None else backbone
        self.head: AttentionHead | None = None
        if spec.has_attention_head:
            self.head = AttentionHead(
                self.backbone.feature_channels, len(spec.scales), scaled(spec.attention_hidden, spec.width),
                spec.attention_dropout, init=spec.attention_init, temperature=spec.attention_temperature,
                norm=spec.attention_norm,
            )  # fmt: skip
        self.gate: GateHead | None = None
        if spec.is_hierarchical:
            self.gate = GateHead(self.backbone.feature_channels, scaled(GATE_HIDDEN, spec.width))

    @property
    def stride(self) -> int:
        """The backbone's output stride (8): input pixels per output cell."""
        return int(self.backbone.stride)

    @property
    def model_args(self) -> dict[str, Any]:
        """The flat table checkpoints store (:meth:`ModelSpec.to_args`)."""
        return self.spec.to_args()

    def forward(self, images: torch.Tensor, scales: Sequence[float] | None = None) -> dict:
        """images [N, 3, H, W] -> {"out", "per_scale", "attention", "scales"} (and "gates": hierarchical)."""
        scales = self.scales if scales is None else tuple(float(s) for s in scales)
        check_scales(scales)
        if self.gate is not None:
            return hierarchical_forward(self.backbone, self.gate, images, scales, self.training)
        if self.head is not None:
            if len(scales) != len(self.scales):
                raise ValueError(f"an attention model trained on {len(self.scales)} scales needs as many, got {scales}")
            if sorted(scales) != sorted(self.scales):  # the head weighs exactly the scales it was trained on
                raise ValueError(f"an attention model trained on scales {list(self.scales)} needs those, got {scales}")
            scales = self.scales  # the head's output channels follow the training order
        feats, per_scale = [], []
        for s in scales:
            x = images if s == 1.0 else resize_bilinear(images, scaled_size(images.shape[-2:], s))
            f, logits = self.backbone(x)
            if self.head is not None:  # only the attention head needs the fc7 features
                feats.append(f)
            per_scale.append(logits)
        if len(scales) == 1:
            return {"out": per_scale[0], "per_scale": per_scale, "attention": None, "scales": scales}
        ref_size = per_scale[scales.index(max(scales))].shape[-2:]
        stacked = torch.stack([resize_bilinear(lg, ref_size) for lg in per_scale], dim=1)  # [N, S, C, h, w]
        out, attention = self._merge(stacked, feats, ref_size)
        return {"out": out, "per_scale": per_scale, "attention": attention, "scales": scales}

    def _merge(
        self, stacked: torch.Tensor, feats: list[torch.Tensor], ref_size: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = stacked.shape[:2]
        if self.merge == "max":
            out = stacked.max(dim=1).values
            with torch.no_grad():  # which scale supplied the winning score, for visualisation
                winner = stacked.amax(dim=2).argmax(dim=1, keepdim=True)  # [N, 1, h, w]
                # scatter, not F.one_hot: one_hot reads the indices' range back to the host
                weights = torch.zeros_like(stacked[:, :, 0]).scatter_(1, winner, 1.0)  # [N, S, h, w]
            return out, weights
        if self.merge == "avg" or self.head is None:
            weights = stacked.new_full((n, s, *ref_size), 1.0 / s)
            return stacked.mean(dim=1), weights
        cat = torch.cat([resize_bilinear(f, ref_size) for f in feats], dim=1)  # [N, S*F, h, w]
        weights = self.head(cat)  # [N, S, h, w]
        return (stacked * weights.unsqueeze(2)).sum(dim=1), weights


def build_model(spec: ModelSpec | int | None = None, /, *args: Any, timm_module: Any = None, **kwargs: Any) -> ScaleNet:
    """Build DeepLab-LargeFOV (one scale) or the share-net with max/avg/attention/hierarchical merging.

    ``build_model(spec)`` takes a :class:`ModelSpec`; ``build_model(num_classes, scales, merge,
    **options)`` (or all by keyword, as a checkpoint's ``model_args``) builds the spec from :class:`ModelSpec`'s fields first (``build_model(21)`` is the
    paper's single-scale DeepLab-LargeFOV). ``timm_module`` stands in for timm when building a
    ``timm:`` backbone (tests).
    """
    if isinstance(spec, ModelSpec):
        if args or kwargs:
            raise TypeError("build_model(spec) takes no other arguments")
    else:
        spec = ModelSpec(*(() if spec is None else (spec,)), *args, **kwargs)
    return ScaleNet(spec, None if timm_module is None else build_backbone(spec, timm_module))
