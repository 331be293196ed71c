"""Test-time scales: checked once, in the order the model's attention head was trained for.

An attention model's head outputs one weight map per scale, in the order of the scales it
was trained with: its channel ``i`` belongs to trained scale ``i``. A ``--scales`` list in
another order is put back into the trained order (with a note); scales the head never saw
are refused. Max/avg merging and single-scale models take any set of scales. A hierarchical
model (:mod:`msattn.models.hierarchical`) takes any list that holds 1.0, in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from msattn.errors import UsageError
from msattn.models.spec import HIERARCHICAL, hierarchical_inference_problem

#: The largest test-time scale accepted (a 500-pixel image at scale 4 is already 2,000 pixels wide).
MAX_SCALE = 4.0


def check_scales(scales: Sequence[float], option: str = "--scales") -> tuple[float, ...]:
    """``scales`` as floats if each is finite, in (0, MAX_SCALE] and none repeats; else one-line UsageError."""
    values = tuple(float(s) for s in scales)
    if not values:
        raise UsageError(f"{option}: give at least one scale")
    bad = [s for s in values if not math.isfinite(s) or not 0 < s <= MAX_SCALE]
    if bad:
        raise UsageError(f"{option}: scales must lie in (0, {MAX_SCALE:g}], got {bad[0]:g} (e.g. --scales 1.0 --scales 0.5)")
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise UsageError(f"{option}: scale {repeated[0]:g} is given twice; give each scale once")
    return values


def resolve_scales(
    given: Sequence[float] | None, model: Any, option: str = "--scales"
) -> tuple[tuple[float, ...], str | None]:
    """The scales to run ``model`` at, and a note when they were reordered.

    ``given`` None: the model's own (trained) scales. For a model with an attention head
    (``model.head``), ``given`` must be the trained scales in any order; they are returned in
    the trained order, so that attention map ``i`` is the weight of scale ``i``. A hierarchical
    model takes any list holding 1.0, kept in the order given (its weights follow that order).
    """
    trained = tuple(float(s) for s in model.scales)
    if given is None or len(given) == 0:
        return trained, None
    scales = check_scales(given, option)
    if getattr(model, "merge", None) == HIERARCHICAL:
        problem = hierarchical_inference_problem(scales)
        if problem:
            raise UsageError(f"{option}: {problem}; add 1.0 (any other scales may join it, e.g. 2.0, 1.0, 0.5)")
        return scales, None  # any list holding 1.0, in any order: the chain sorts them
    if getattr(model, "head", None) is None:
        return scales, None  # max/avg merging and one-scale models: any set, any order
    if sorted(scales) != sorted(trained):
        raise UsageError(
            f"{option}: this attention model was trained on {len(trained)} scales {list(trained)}; its head "
            f"weighs exactly those (in any order), not {list(scales)}; give them or leave {option} out "
            "(max/avg and single-scale models take any scales)"
        )
    if scales != trained:
        return trained, f"{option} {list(scales)} taken in the trained order {list(trained)} (the attention head's order)"
    return trained, None
