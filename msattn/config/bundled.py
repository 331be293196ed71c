"""The recipes shipped with msattn: ``recipes/*.toml`` in the repository, ``msattn/_recipes`` when installed.

``msattn/_recipes`` is a symlink to ``../recipes`` in the source tree; building a wheel copies every
``*.toml`` there in as package data (``pyproject.toml``), so a recipe added to ``recipes/`` is
bundled with no list to maintain, and ``msattn train demo`` works in a checkout, an editable
install and a wheel alike. A recipe's one-line summary is its first comment line (TOML keys are
strict: a description key would be an unknown key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from msattn.errors import ConfigError, UsageError

SUFFIX = ".toml"


@dataclass(frozen=True)
class BundledRecipe:
    """One shipped recipe: its name (the file's stem) and file."""

    name: str
    path: Path

    @property
    def summary(self) -> str:
        """The recipe's first comment line, without the ``#``."""
        return recipe_summary(self.path.read_text(encoding="utf-8-sig"))


def recipes_dir() -> Path:
    """The folder holding the bundled recipes (``msattn/_recipes``, or ``recipes/`` beside the package)."""
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir / "_recipes", package_dir.parent / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*" + SUFFIX)):
            return candidate
    raise ConfigError(f"{package_dir / '_recipes'}: the bundled recipes are missing; reinstall msattn")


def bundled_recipes() -> list[BundledRecipe]:
    """Every bundled recipe, by name."""
    found = [BundledRecipe(p.stem, p) for p in recipes_dir().glob("*" + SUFFIX) if p.is_file()]
    return sorted(found, key=lambda r: r.name)


def find_bundled(name: str) -> BundledRecipe | None:
    """The bundled recipe called ``name`` (``demo`` or ``demo.toml``), or None."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    return next((r for r in bundled_recipes() if r.name == stem), None)


def get_bundled(name: str) -> BundledRecipe:
    """The bundled recipe called ``name``; an unknown name is a usage error listing the names."""
    recipe = find_bundled(name)
    if recipe is None:
        raise UsageError(f"{name}: no bundled recipe of that name ({_names()})")
    return recipe


def recipe_summary(text: str) -> str:
    """The first comment line of a recipe's text (before any table or key), or ""."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            summary = stripped.lstrip("#").strip()
            if summary:
                return summary
        elif stripped:
            break
    return ""


def resolve_recipe(text: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``msattn train RECIPE``'s file: (path, a note saying which one was used, or None).

    An existing file wins; otherwise a bare name (``demo``, ``demo.toml``: no folder in it) is a
    bundled recipe. A missing file is a ConfigError that names the bundled recipe of the same
    name when there is one (``recipes/demo.toml`` outside the repository).
    """
    text = os.fspath(text)
    path = Path(text)
    bare = "/" not in text and os.sep not in text
    match = find_bundled(path.name) if path.suffix in ("", SUFFIX) and path.name else None
    if path.is_file():
        note = f"recipe: {text} (the file; not the bundled recipe {match.name})" if bare and match else None
        return path, note
    if bare and match:
        note = f"recipe: the bundled {match.name} ({match.path})"
        if not path.suffix and Path(text + SUFFIX).is_file():
            note += f"; {text}{SUFFIX} here is not used (give the file name to train it)"
        return match.path, note
    if not path.exists():
        hint = f"a bundled recipe has that name: give it as {match.name}" if match else f"bundled: {_names()}"
        raise ConfigError(f"{text}: recipe not found ({hint})")
    return path, None  # a folder: the reader names it


def copy_recipe(name: str, dest: str | os.PathLike[str]) -> Path:
    """Copy the bundled recipe ``name`` to ``dest`` (a file, or a folder to hold ``<name>.toml``); returns the file.

    Never writes over an existing file: the copy is written beside it and linked into place,
    which fails when the name is taken (also when another process took it meanwhile).
    """
    recipe = get_bundled(name)
    target = Path(dest)
    if target.is_dir():
        target = target / recipe.path.name
    if target.exists() or target.is_symlink():
        raise UsageError(f"{target}: already exists; choose another destination (nothing written)")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent}: folder not found (nothing written)")
    data = recipe.path.read_bytes()
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        partial.write_bytes(data)
        try:
            os.link(partial, target)  # atomic, and refuses an existing name
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create exclusively instead
            with open(target, "xb") as handle:
                handle.write(data)
    except FileExistsError:
        raise UsageError(f"{target}: already exists; choose another destination (nothing written)") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _names() -> str:
    return ", ".join(r.name for r in bundled_recipes()) + "; msattn recipes lists them"
