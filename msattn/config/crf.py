"""The recipe's ``[crf]`` section: the dense CRF's settings (:class:`CRFParams`), checked."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from msattn.errors import ConfigError


@dataclass
class CRFParams:
    """Dense CRF settings; defaults are DeepLab-LargeFOV's VOC values.

    bi_w / bi_xy_std / bi_rgb_std: bilateral (appearance) kernel weight, spatial and colour std;
    pos_w / pos_xy_std: Gaussian (smoothness) kernel weight and spatial std;
    iterations: mean-field iterations.
    """

    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0
    iterations: int = 10

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`ConfigError` (naming ``crf.<key>`` and ``source``) for a non-positive or non-numeric value."""
        where = f"{source}: " if source is not None else ""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "iterations":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                want = "a positive integer"
            else:
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value > 0
                )
                want = "a positive number"
            if not ok:
                raise ConfigError(f"{where}crf.{field.name} must be {want}, got {value!r}")

    def replace(self, **changes: Any) -> CRFParams:
        """A copy with ``changes`` applied; ``None`` values are ignored (unset CLI options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


CRF_FIELDS = tuple(f.name for f in dataclasses.fields(CRFParams))


def crf_params_from_dict(values: Mapping[str, Any], source: str | os.PathLike[str] = "<crf>") -> CRFParams:
    """Build :class:`CRFParams` from a ``[crf]`` mapping; unknown keys and bad values raise :class:`ConfigError`."""
    unknown = sorted(set(values) - set(CRF_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key crf.{unknown[0]} (known: {', '.join(CRF_FIELDS)})")
    kwargs = {k: float(v) if k != "iterations" and _is_number(v) else v for k, v in values.items()}
    try:
        return CRFParams(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
