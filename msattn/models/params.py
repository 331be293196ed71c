"""SGD parameter groups in the DeepLab convention."""

from __future__ import annotations

from torch import nn

from msattn.models.backbones import CLASSIFIER_PREFIXES

#: parameter-name prefixes of the classifier group (VGG-16's fc8, a LargeFOV head's fc8, DeepLab-v2's ASPP branches)
CLASSIFIER_NAMES = tuple(f"backbone.{prefix}" for prefix in CLASSIFIER_PREFIXES)
#: parameter names of the attention heads: the softmax head (``head.``), the hierarchical gate head (``gate.``)
ATTENTION_PREFIXES = ("head.", "gate.")


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    attention_lr_mult: float | None = None,
) -> list[dict]:
    """Split parameters into SGD groups, each with ``lr = lr * lr_mult``:

    backbone weights (x1, decayed), backbone biases (x2, no decay), classifier (fc8, or
    DeepLab-v2's ASPP branches ``backbone.aspp.*``) weights (x ``head_lr_mult``, decayed) and
    biases (x 2 ``head_lr_mult``, no decay), attention-head weights (x ``attention_lr_mult``, None: ``head_lr_mult``) and biases (x2 that, no decay).
    The hierarchical model's gate head (``gate.*``) counts as the attention head: its conv and
    batch-norm scale weights go with the attention weights, its batch-norm shifts with the
    attention biases.
    The backbone's normalisation layers (BatchNorm under ``batchnorm = "train"``/``"sync"``, a
    timm model's LayerNorm/GroupNorm) form the group ``norm``: x1, no weight decay (DeepLab-v2
    freezes them, so it has no rule; decaying a BatchNorm scale only pulls it towards 0, so
    detectron2 (``WEIGHT_DECAY_NORM = 0``) and timm leave them undecayed, as here).
    Schedulers must multiply each group's ``lr_mult`` by the scheduled base lr. Parameters that
    need no gradient (frozen BatchNorm's) are in no group.
    """
    attention_lr_mult = head_lr_mult if attention_lr_mult is None else attention_lr_mult
    buckets: dict[str, list[nn.Parameter]] = {
        "backbone_weight": [], "backbone_bias": [], "head_weight": [], "head_bias": [],
        "attention_weight": [], "attention_bias": [], "norm": [],
    }  # fmt: skip
    norms = {id(p) for name, p in _backbone_norm_parameters(model)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in norms:
            buckets["norm"].append(param)
            continue
        part = (
            "attention" if name.startswith(ATTENTION_PREFIXES)
            else "head" if name.startswith(CLASSIFIER_NAMES) else "backbone"
        )  # fmt: skip
        kind = "bias" if name.endswith("bias") else "weight"
        buckets[f"{part}_{kind}"].append(param)
    mults = {
        "backbone_weight": (1.0, weight_decay),
        "backbone_bias": (2.0, 0.0),
        "head_weight": (head_lr_mult, weight_decay),
        "head_bias": (2.0 * head_lr_mult, 0.0),
        "attention_weight": (attention_lr_mult, weight_decay),
        "attention_bias": (2.0 * attention_lr_mult, 0.0),
        "norm": (1.0, 0.0),
    }
    groups = []
    for name, params in buckets.items():
        if params:
            mult, decay = mults[name]
            groups.append({"params": params, "name": name, "lr_mult": mult, "lr": lr * mult, "weight_decay": decay})
    return groups


#: normalisation layers whose affine parameters join the ``norm`` group
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _backbone_norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every normalisation layer of the backbone (not of the attention or gate head)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return []
    return [(f"{name}.{pname}", p) for name, module in backbone.named_modules() if isinstance(module, NORM_TYPES)
            for pname, p in module.named_parameters(recurse=False)]  # fmt: skip
