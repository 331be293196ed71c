"""Recipe values: the checks of :mod:`msattn.config.recipe`'s keys and the typed conversion of TOML/JSON values.

:func:`_opt` declares a key (default, check, help); the checks (:func:`_between`, :func:`_one_of`...)
return a problem text or None; :func:`_build_section` converts and checks one section's table
into its dataclass, raising :class:`~msattn.errors.ConfigError` naming the key and its origin.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal

from msattn.errors import ConfigError, UsageError
from msattn.models.spec import check_backbone, known_backbones
from msattn.sizes import parse_memory

MAX_INT = 2**31 - 1
#: old key name -> new key name (old recipes and checkpoints keep loading)
KEY_ALIASES = {"model.init_checkpoint": "model.init_from"}

Check = Callable[[Any], "str | None"]


# ----------------------------------------------------------------------------- value checks


def _between(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A check that a number (or every number of a tuple) lies in [lo, hi] (open ends optional)."""

    def check(value: Any) -> str | None:
        for v in value if isinstance(value, tuple) else (value,):
            if lo is not None and (v <= lo if lo_open else v < lo):
                return f"must be {'>' if lo_open else '>='} {lo:g}, got {v!r}"
            if hi is not None and (v >= hi if hi_open else v > hi):
                return f"must be {'<' if hi_open else '<='} {hi:g}, got {v!r}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"

    return check


def _length(n: int) -> Check:
    def check(value: Any) -> str | None:
        return None if len(value) == n else f"needs exactly {n} values, got {len(value)}"

    return check


def _all(*checks: Check) -> Check:
    def check(value: Any) -> str | None:
        for c in checks:
            problem = c(value)
            if problem:
                return problem
        return None

    return check


def _nonempty_distinct(value: tuple) -> str | None:
    if not value:
        return "needs at least one value"
    if len(set(value)) != len(value):
        return f"values must be distinct, got {list(value)}"
    return None


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _opt(default: Any, check: Check | None = None, help: str = "") -> Any:  # noqa: A002 - dataclass metadata
    return field(default=default, metadata={"check": check, "help": help})


_positive_int = _between(1, MAX_INT)
_count = _between(0, MAX_INT)


def _grid_side(value: int) -> str | None:
    """Sides of 8k+1 pixels keep DeepLab's output grid exact (msattn.geometry)."""
    if (value - 1) % 8 == 0:
        return None
    lo = 8 * ((value - 1) // 8) + 1
    return f"must be 8k+1 pixels (the stride-8 grid is exact only then), got {value}: use {lo} or {lo + 8}"

_scales_check = _all(_nonempty_distinct, _between(0, 4, lo_open=True))


def _length_between(lo: int, hi: int) -> Check:
    def check(value: Any) -> str | None:
        return None if lo <= len(value) <= hi else f"needs {lo} to {hi} values, got {len(value)}"

    return check


def _backbone_check(value: str) -> str | None:
    """A backbone name msattn knows (msattn.models.spec.BACKBONES) or ``timm:<name>``."""
    try:
        check_backbone(value)
    except ValueError:
        return f"must be one of {known_backbones()}, got {value!r}"
    return None


def _memory_size(value: str) -> str | None:
    """A memory budget such as "4GB" or "512MiB" (:func:`msattn.sizes.parse_memory`)."""
    try:
        parse_memory(value, what="")
    except UsageError as exc:
        return str(exc).removeprefix(": ")
    return None


# ----------------------------------------------------------------------------- typed conversion


class _Bad(Exception):
    """Internal: a value problem, turned into ConfigError with the key and origin."""


def _describe(value: Any) -> str:
    names = {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "a table"
    }
    for kind, name in names.items():
        if type(value) is kind:
            text = reprlib.repr(value)  # depth- and length-limited
            return f"{name} ({text if len(text) <= 40 else text[:37] + '...'})"
    return f"a {type(value).__name__}"


def _expected(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for error messages."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(f'"{v}"' for v in typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _convert(value: Any, hint: Any) -> Any:
    """Convert a TOML/JSON value to the annotated type or raise _Bad."""
    origin = typing.get_origin(hint)
    if origin is Literal:  # a fixed word, e.g. "auto"
        if value in typing.get_args(hint) and isinstance(value, str):
            return value
        raise _Bad(f"must be {_expected(hint)}, got {_describe(value)}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if type(None) in typing.get_args(hint) and (
            value is None or (isinstance(value, str) and value.strip().lower() == "none")
        ):
            return None
        if len(args) > 1:  # e.g. int | Literal["auto"]: the first that fits
            for inner in args:
                try:
                    return _convert(value, inner)
                except _Bad:
                    continue
            raise _Bad(f"must be {' or '.join(_expected(a) for a in args)}, got {_describe(value)}")
        (inner,) = args
        return _convert(value, inner)
    if hint is bool:
        if not isinstance(value, bool):
            raise _Bad(f"must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"must be a number, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise _Bad(f"is out of range, got {_describe(value)}") from None
        if not math.isfinite(number):
            raise _Bad(f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise _Bad(f"must be a string, got {_describe(value)}")
        if "\x00" in value:
            raise _Bad("must not contain NUL characters")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad(f"must be an array, got {_describe(value)}")
        args = typing.get_args(hint)
        item = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise _Bad(f"needs exactly {len(args)} values, got {len(value)}")
        try:
            return tuple(_convert(v, item) for v in value)
        except _Bad as exc:
            raise _Bad(f"values {exc}") from None
    raise TypeError(f"unsupported recipe type {hint!r}")  # a bug in this module, not user input


def _build_section(name: str, cls: type, values: Any, origin_of: Callable[[str], str]) -> Any:
    """Validate one section mapping and build its dataclass."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{origin_of('')}: [{name}] must be a table, got {_describe(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        alias = KEY_ALIASES.get(f"{name}.{key}")
        if alias is not None and alias.split(".")[1] not in values:
            key = alias.split(".")[1]
        if key not in fields:
            raise ConfigError(f"{origin_of(key)}: unknown key {name}.{key}{_suggest(key, fields)}")
        try:
            value = _convert(raw, hints[key])
            check = fields[key].metadata.get("check")
            problem = check(value) if (check is not None and value is not None) else None
        except _Bad as exc:
            problem = str(exc)
        if problem:
            raise ConfigError(f"{origin_of(key)}: {name}.{key} {problem}")
        kwargs[key] = value
    try:
        section = cls(**kwargs)
    except ConfigError as exc:  # CRFParams validates itself and names the key
        named = re.search(rf"\b{name}\.(\w+)", str(exc))
        raise ConfigError(f"{origin_of(named.group(1) if named else '')}: {exc}") from None
    for key, f in fields.items():  # defaults must pass too (e.g. the required data.root)
        if key not in kwargs:
            check = f.metadata.get("check")
            default = getattr(section, key)
            if check is not None and default is not None and check(default):
                raise ConfigError(f"{origin_of(key)}: missing key {name}.{key} ({f.metadata.get('help', '')})")
    return section


def _suggest(key: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" (known keys: {', '.join(known)})"
