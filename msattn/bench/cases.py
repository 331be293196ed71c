"""What ``msattn bench`` times: its cases (a scale set and a merge), their settings and the options naming them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from msattn.errors import UsageError
from msattn.models.spec import DEFAULT_BACKBONE, MERGES, TIMM_PREFIX, check_backbone

SCALE_SETS: tuple[tuple[float, ...], ...] = ((1.0,), (1.0, 0.5), (1.0, 0.75, 0.5))
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
    params: int = 0  # parameters of the case's model (backbone, classifier, attention head)


def scale_merge_pairs() -> list[tuple[tuple[float, ...], str | None]]:
    """The benchmarked (scales, merge) pairs: one for a single scale, every merge for the others."""
    pairs: list[tuple[tuple[float, ...], str | None]] = []
    for scales in SCALE_SETS:
        pairs += [(scales, None)] if len(scales) == 1 else [(scales, merge) for merge in MERGES]
    return pairs


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
    if merge not in MERGES:
        raise UsageError(f"--case {text}: name the merge of a multi-scale case ({', '.join(MERGES)})")
    return scales, merge


def selected_pairs(
    settings: Settings, pairs: Sequence[tuple[tuple[float, ...], str | None]] | None = None
) -> list[tuple[tuple[float, ...], str | None]]:
    """The (scales, merge) pairs to run: ``pairs`` (default: every pair of SCALE_SETS) filtered by ``--case``."""
    pairs = list(pairs if pairs is not None else scale_merge_pairs())
    if settings.cases is None:
        return pairs
    return [p for p in pairs if p in settings.cases] or list(settings.cases)


def case_name(scales: Sequence[float], merge: str | None) -> str:
    """``{1, 0.5} max``: how tables and progress lines name a case."""
    return "{" + ", ".join(f"{s:g}" for s in scales) + "}" + (f" {merge}" if merge else "")
