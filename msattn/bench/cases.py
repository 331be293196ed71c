"""What ``msattn bench`` times: its cases (a scale set and a merge), their settings and the options naming them.

A hierarchical case (:mod:`msattn.models.hierarchical`) is a model trained on two scales run
on the case's scales: in inference the model of :data:`HIERARCHICAL_TRAINING` called with
the case's scales (any set holding 1.0), in training the model of the case's scales (two,
one of them 1.0; the other sets are skipped in the training modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from msattn.errors import UsageError
from msattn.models.scale import build_model
from msattn.models.spec import (
    DEFAULT_BACKBONE,
    HIERARCHICAL,
    MERGES,
    MODEL_MERGES,
    TIMM_PREFIX,
    check_backbone,
    hierarchical_training_problem,
)

SCALE_SETS: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, 0.5), (1.0, 0.75, 0.5))
#: the scales a hierarchical inference case's model is trained on (the paper's)
HIERARCHICAL_TRAINING = (1.0, 0.5)
#: the modes that time training steps (a hierarchical case there trains on its own two scales)
TRAINING_MODES = ("train", "train-e2e")
NUM_CLASSES = 21  # PASCAL VOC: the paper's network has 20,505,429 parameters with 21 classes
IGNORE_INDEX = 255


@dataclass
class Case:
    """One scale set + merge of one mode, with its timed step and the times measured."""

    scales: tuple[float, ...]
    merge: str | None  # None with one scale: nothing to merge
    step: Callable[[], None]  # one timed call (forward, or a full training step)
    eager_step: Callable[[], None]  # the same on the uncompiled model (FLOPs are counted on it)
    state_bytes: Callable[[], int]  # resident state of this case: weights (+ optimizer momentum)
    times: list[float] = field(default_factory=list)
    capture_s: float | None = None  # CUDA graph capture (and compile) time, once
    trained_scales: tuple[float, ...] | None = None  # a hierarchical inference case: its model's training scales
    params: int = 0  # parameters of the case's model (backbone, classifier, attention head)


def scale_merge_pairs(mode: str = "inference") -> list[tuple[tuple[float, ...], str | None]]:
    """The benchmarked (scales, merge) pairs of ``mode``: one for a single scale, every merge for the others
    (hierarchical on every set in inference, on the sets it can train on in the training modes)."""
    pairs: list[tuple[tuple[float, ...], str | None]] = []
    for scales in SCALE_SETS:
        if len(scales) == 1:
            pairs.append((scales, None))
            continue
        pairs += [(scales, merge) for merge in MERGES]
        if runs_in_mode(scales, HIERARCHICAL, mode):
            pairs.append((scales, HIERARCHICAL))
    return pairs


def runs_in_mode(scales: Sequence[float], merge: str | None, mode: str) -> bool:
    """False for a hierarchical case that ``mode`` cannot run (training on other than two scales incl. 1.0)."""
    return merge != HIERARCHICAL or mode not in TRAINING_MODES or not hierarchical_training_problem(tuple(scales))


def case_model(
    scales: tuple[float, ...],
    merge: str | None,
    mode: str,
    model_kwargs: dict[str, Any],
    num_classes: int = NUM_CLASSES,
) -> tuple[Any, tuple[float, ...] | None]:
    """The (CPU) model of a case and the scales its forward is called with (None: the model's own).

    ``model_kwargs``: what every model of the run shares (:meth:`Settings.model_kwargs`: backbone, width).
    """
    if merge == HIERARCHICAL and mode not in TRAINING_MODES:
        return build_model(num_classes, scales=HIERARCHICAL_TRAINING, merge=merge, **model_kwargs), tuple(scales)
    return build_model(num_classes, scales=scales, merge=merge or "avg", **model_kwargs), None


def area_ratio(scales: Sequence[float]) -> float:
    """Pure pixel-area cost of a scale set relative to scale 1: sum of s^2."""
    return sum(s * s for s in scales)


@dataclass(frozen=True)
class Settings:
    """What every case of a run shares (the CLI options)."""

    device: torch.device
    batch: int
    amp: bool
    compile_model: bool
    channels_last: bool
    width: float
    iters: int
    warmup: int
    graph: bool = False  # inference as captured CUDA graphs
    cases: tuple[tuple[tuple[float, ...], str | None], ...] | None = None  # --case filter; None: all
    say: Callable[..., None] = field(default=lambda text, force=True: None, compare=False)  # progress on stderr
    backbone: str = DEFAULT_BACKBONE  # --backbone: every model of the run is built on it

    def model_kwargs(self) -> dict[str, object]:
        """What every benchmarked model is built with besides classes, scales and merge (backbone and width)."""
        return {"backbone": self.backbone, "width": self.width}

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when --amp (CUDA only; refused on CPU before we get here)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def check_bench_backbone(backbone: str, width: float) -> None:
    """``--backbone``: a known name (UsageError listing them); a timm model has its own channels (width 1)."""
    try:
        check_backbone(backbone)
    except ValueError as exc:
        raise UsageError(f"--backbone: {exc}") from None
    if backbone.startswith(TIMM_PREFIX) and width != 1.0:
        raise UsageError(f"--width {width:g}: a timm backbone has its model's channel counts; use --width 1")


def parse_case(text: str) -> tuple[tuple[float, ...], str | None]:
    """``--case`` text -> (scales, merge): ``1``, ``1,0.5:max``, ``1,0.75,0.5:attention``."""
    scales_text, _, merge = text.partition(":")
    try:
        scales = tuple(float(v) for v in scales_text.split(","))
    except ValueError:
        raise UsageError(f"--case {text}: expected scales[:merge], e.g. 1 or 1,0.75,0.5:attention") from None
    if len(scales) == 1:
        return scales, None
    if merge not in MODEL_MERGES:
        raise UsageError(f"--case {text}: name the merge of a multi-scale case ({', '.join(MODEL_MERGES)})")
    if merge == HIERARCHICAL and 1.0 not in scales:
        raise UsageError(
            f"--case {text}: a hierarchical model needs scale 1.0 among its scales (e.g. 2,1,0.5:hierarchical)"
        )
    return scales, merge


def check_cases(cases: Sequence[tuple[tuple[float, ...], str | None]] | None, modes: Sequence[str]) -> None:
    """A UsageError for a hierarchical ``--case`` that no chosen mode can run (training on three scales)."""
    for scales, merge in cases or ():
        if not any(runs_in_mode(scales, merge, mode) for mode in modes):
            scales_text = ",".join(f"{s:g}" for s in scales)
            raise UsageError(
                f"--case {scales_text}:{merge}: {hierarchical_training_problem(scales)} (--mode inference runs it; "
                "a hierarchical case is trained on two scales)"
            )


def selected_pairs(
    settings: Settings, pairs: Sequence[tuple[tuple[float, ...], str | None]] | None = None, mode: str = "inference"
) -> list[tuple[tuple[float, ...], str | None]]:
    """The (scales, merge) pairs to run in ``mode``: ``pairs`` (default: :func:`scale_merge_pairs`), or every
    ``--case`` asked for; hierarchical cases the mode cannot run are left out.

    Cases asked for run in ``pairs``' order (the single scale first: the ratios' reference), then
    the others in the order given; a case asked twice runs once.
    """
    pairs = list(pairs if pairs is not None else scale_merge_pairs(mode))
    if settings.cases is not None:
        asked = list(dict.fromkeys(settings.cases))
        pairs = [p for p in pairs if p in asked] + [p for p in asked if p not in pairs]
    return [(scales, merge) for scales, merge in pairs if runs_in_mode(scales, merge, mode)]


def case_name(scales: Sequence[float], merge: str | None) -> str:
    """``{1, 0.5} max``: how tables and progress lines name a case."""
    return "{" + ", ".join(f"{s:g}" for s in scales) + "}" + (f" {merge}" if merge else "")
