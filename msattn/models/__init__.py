"""Model core: backbone, share-net scale merging, loss, parameter groups, weight conversion.

Import names from the module that defines them (``msattn.models.scale.build_model``,
``msattn.models.spec.ModelSpec``, ``msattn.models.loss.segmentation_loss``...). The names below
are the 0.1 import paths of the documented API, kept as aliases for the 0.2 release only.
"""

from msattn.geometry import upsample_logits
from msattn.models.backbone import LargeFOV
from msattn.models.loss import cross_entropy, segmentation_loss
from msattn.models.params import param_groups
from msattn.models.scale import AttentionHead, ScaleNet, build_model
from msattn.models.spec import MERGES

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
