"""Byte sizes as people write them (``"4GB"``, ``"512MiB"``) and read them (``"1.5 GiB"``)."""

from __future__ import annotations

import re

from msattn.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip


def parse_memory(text: str | int, what: str = "--max-memory") -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"`` or a number of bytes -> bytes (UsageError naming ``what``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise UsageError(f"{what}: expected a size such as 4GB, 512MiB or 2000000000 (bytes), got {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size < 2**20:
        raise UsageError(f"{what}: {text!r} is less than 1 MiB; give a size such as 4GB")
    return size


def format_bytes(size: float) -> str:
    """1536 MiB -> '1.5 GiB'."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"
