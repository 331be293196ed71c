"""Model core: DeepLab-LargeFOV backbone, share-net scale merging, loss, parameter groups, weight conversion."""

from msattn.models.backbone import LargeFOV
from msattn.models.loss import cross_entropy, segmentation_loss
from msattn.models.params import param_groups
from msattn.models.scale import MERGES, AttentionHead, ScaleNet, build_model, upsample_logits

__all__ = [
    "MERGES",
    "AttentionHead",
    "LargeFOV",
    "ScaleNet",
    "build_model",
    "cross_entropy",
    "param_groups",
    "segmentation_loss",
    "upsample_logits",
]
