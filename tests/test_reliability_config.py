"""Property-based: any recipe FILE, and any ``--set`` string, gives a valid Recipe or a ConfigError.

Documents are written as real TOML text (with every TOML value type: booleans, 64-bit integers,
floats incl. inf/nan, strings, dates and times, arrays, inline tables, nested tables) and loaded
with :func:`msattn.config.recipe.load_recipe`, so the parser, the overrides and the validator are
exercised together. A loaded recipe must be valid (it survives a round trip through
``recipe_to_dict``); a ConfigError must name the file or the ``--set`` override.
Nothing else may escape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from msattn.config.recipe import SECTION_NAMES, Recipe, _section_classes, load_recipe, recipe_from_dict, recipe_to_dict
from msattn.errors import ConfigError

FIELDS = sorted({f.name for cls in _section_classes().values() for f in dataclasses.fields(cls)})
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- writing TOML


def toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    """Top-level scalars first, then one ``[table]`` per dict value (nested dicts become inline tables)."""
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(name)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- strategies

names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=6))
section_names = st.one_of(st.sampled_from([*SECTION_NAMES, "Data", "optimiser"]), st.text(max_size=6))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 8, 32, 321, 2**31, -1]),
    st.floats(),
    st.sampled_from([0.0, 0.5, 1.0, 0.75, 1e-3, 4.0, 1e300]),
    st.text(max_size=10),
    st.sampled_from(["none", "None", "attention", "max", "avg", "poly", "step", "bf16", "fp16", "off", "demo",
                     "torchvision", "cpu", "cuda:7", "upsample", " ", ""]),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.dates(),
    st.times(),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)
tables = st.dictionaries(names, values, max_size=6)
#: arbitrary documents: any sections (or stray top-level keys), any keys, any values
documents = st.dictionaries(section_names, tables | scalars, max_size=5)


@st.composite
def near_valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid minimal recipe with a few real keys set to arbitrary values: reaches deep validation."""
    doc: dict[str, Any] = {"data": {"root": "data/somewhere"}}
    for _ in range(draw(st.integers(1, 6))):
        section = draw(st.sampled_from(SECTION_NAMES))
        cls = _section_classes()[section]
        key = draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
        doc.setdefault(section, {})[key] = draw(values)
    return doc


set_values = st.one_of(
    values.map(toml_value),
    st.text(max_size=20),
    st.integers(1, 3000).map(lambda n: "[" * n),  # deep nesting must not crash the parser
    st.integers(1, 3000).map(lambda n: "{a=" * n),
)
overrides = st.lists(
    st.one_of(
        st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from([*SECTION_NAMES, "x"]), names, set_values),
        st.text(max_size=20),
    ),
    max_size=3,
)


# ----------------------------------------------------------------------------- the property


def check_loads_or_config_error(path: Path, sets: list[str] = ()) -> Recipe | None:
    try:
        recipe = load_recipe(path, list(sets))
    except ConfigError as exc:
        message = str(exc)  # (msattn.cli.app.main prints it on one line whatever key names it quotes)
        assert str(path) in message or "--set" in message, message
        return None
    assert isinstance(recipe, Recipe)
    assert recipe_from_dict(recipe_to_dict(recipe), source="round trip") == recipe
    return recipe


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recipe-fuzz")


def write(folder: Path, text: str | bytes) -> Path:
    path = folder / "recipe.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@SETTINGS
@given(documents)
def test_any_toml_document_loads_or_raises_config_error(workdir: Path, doc: dict[str, Any]) -> None:
    text = toml_document(doc)
    tomllib.loads(text)  # the generator writes valid TOML: the validator, not the parser, is under test
    check_loads_or_config_error(write(workdir, text))


@SETTINGS
@given(near_valid_documents(), overrides)
@example({"data": {"root": "d"}}, ["optim.lr=" + "[" * 3000])
def test_real_keys_with_any_values_and_any_overrides(workdir: Path, doc: dict[str, Any], sets: list[str]) -> None:
    check_loads_or_config_error(write(workdir, toml_document(doc)), sets)


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_text_or_bytes_loads_or_raises_config_error(workdir: Path, text: str | bytes) -> None:
    check_loads_or_config_error(write(workdir, text))


def test_the_minimal_recipe_loads(workdir: Path) -> None:
    """The base of near_valid_documents is itself valid, so the property sees both outcomes."""
    recipe = check_loads_or_config_error(write(workdir, toml_document({"data": {"root": "data/somewhere"}})))
    assert recipe is not None and recipe.data.root == "data/somewhere"
