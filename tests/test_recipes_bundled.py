"""The recipes ship with the package: ``msattn train NAME``, ``msattn recipes`` (list, show, copy), the wheel's files."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from msattn.config.bundled import bundled_recipes, copy_recipe, recipe_summary, recipes_dir, resolve_recipe
from msattn.config.recipe import load_recipe
from msattn.errors import ConfigError, UsageError
from msattn.train.setup import resolve_paths

ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))


def test_every_recipe_file_is_bundled_without_a_list() -> None:
    assert "demo" in REPO_RECIPES and "demo-scales" in REPO_RECIPES
    assert [r.name for r in bundled_recipes()] == REPO_RECIPES
    assert recipes_dir().resolve() == (ROOT / "recipes").resolve()
    for recipe in bundled_recipes():
        assert recipe.path.read_bytes() == (ROOT / "recipes" / f"{recipe.name}.toml").read_bytes()


def test_pyproject_ships_every_recipe_as_package_data() -> None:
    """The package-data globs (relative to msattn/, through the _recipes symlink) match every recipe."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["msattn"]
    shipped = {str(p.relative_to(ROOT / "msattn")) for p in (ROOT / "msattn").glob("_recipes/*")}
    matched = {f for f in shipped if any(fnmatch.fnmatch(f, g) for g in globs)}
    assert {f"_recipes/{name}.toml" for name in REPO_RECIPES} <= matched
    assert (ROOT / "msattn" / "_recipes").is_symlink()  # recipes/ stays the one copy README's commands use


def _setuptools_version() -> tuple[int, ...]:
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@pytest.mark.slow
@pytest.mark.skipif(_setuptools_version() < (77,), reason="building the wheel offline needs setuptools>=77 installed "
                    "(pyproject's build requirement; CI builds and installs the wheel in .ci/run)")
def test_the_wheel_carries_every_recipe(tmp_path: Path) -> None:
    """pip wheel (no download: the installed setuptools) from a copy of the sources; the recipes are in it."""
    source = tmp_path / "src"
    for name in ("msattn", "recipes", "datasets"):
        shutil.copytree(ROOT / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "--no-index", "-q", "-w", str(tmp_path / "dist")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("msattn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"msattn/_recipes/{name}.toml" for name in REPO_RECIPES} <= names
    assert "msattn/_lists/voc/val.txt" in names and "msattn/config/bundled.py" in names


# ----------------------------------------------------------------------------- msattn train NAME


def test_train_takes_a_bundled_recipe_by_name(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ here: an installed package's user
    code, out, err = run_cli("train", "demo-scales", "--dry-run")
    assert code == 0, err
    assert "recipe: the bundled demo-scales" in err and "runs/demo-scales" in out
    assert load_recipe(ROOT / "recipes" / "demo-scales.toml").data.crop_size == 97
    assert "crop_size = 97" in out
    code, out, err = run_cli("train", "demo.toml", "--dry-run")
    assert code == 0 and "recipe: the bundled demo" in err


def test_a_file_wins_over_a_bundled_recipe_and_says_so(run_cli, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.toml").write_text('[data]\nroot = "mine"\nauto_prepare = "none"\n')
    code, out, err = run_cli("train", "demo.toml", "--dry-run")
    assert code == 0, err
    assert "recipe: demo.toml (the file; not the bundled recipe demo)" in err
    assert str(tmp_path / "mine") in out
    code, out, err = run_cli("train", "demo", "--dry-run")  # no file called demo: the bundled one
    assert code == 0 and "recipe: the bundled demo" in err and "demo.toml here is not used" in err
    assert str(tmp_path / "data" / "demo") in out
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "demo.toml", tmp_path / "sub" / "demo.toml")
    code, out, err = run_cli("train", "sub/demo.toml", "--dry-run")  # a path with a folder: never a bundled one
    assert code == 0 and "recipe:" not in err and str(tmp_path / "mine") in out


def test_a_missing_recipe_names_the_bundled_ones(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train", "recipes/demo.toml", "--dry-run")  # README's path, outside the repository
    assert code == 2 and "recipes/demo.toml: recipe not found" in err and "give it as demo" in err
    code, _, err = run_cli("train", "demoo")
    assert code == 2 and "demoo: recipe not found" in err and "demo-scales" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="recipe not found"):
        resolve_recipe(tmp_path / "nope.toml")
    assert resolve_recipe(tmp_path) == (tmp_path, None)  # a folder: load_recipe says what it is


# ----------------------------------------------------------------------------- msattn recipes


def test_recipes_lists_every_bundled_recipe_on_one_line_each(run_cli) -> None:
    code, out, err = run_cli("recipes")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == REPO_RECIPES
    for line, recipe in zip(lines, bundled_recipes()):
        assert recipe.summary and line.endswith(recipe.summary)
        assert len(line) <= 80, line  # a summary is one line that fits a terminal
    assert "msattn train NAME" in err and "msattn recipes copy" in err


def test_recipe_summary_is_the_first_comment_line() -> None:
    assert recipe_summary("\n# The demo: tiny.\n# more\n[data]\n") == "The demo: tiny."
    assert recipe_summary("#\n#   spaced  \n") == "spaced"
    assert recipe_summary('[data]\n# late\nroot = "x"\n') == ""


def test_recipes_show_prints_the_recipe_as_shipped(run_cli, tmp_path: Path) -> None:
    code, out, _ = run_cli("recipes", "show", "demo")
    assert code == 0 and out == (ROOT / "recipes" / "demo.toml").read_text()
    (tmp_path / "mine.toml").write_text(out)
    assert load_recipe(tmp_path / "mine.toml") == load_recipe(ROOT / "recipes" / "demo.toml")
    code, _, err = run_cli("recipes", "show", "nope")
    assert code == 2 and "nope: no bundled recipe of that name" in err and "demo-scales" in err


def test_recipes_copy_starts_your_own_and_never_writes_over_a_file(run_cli, tmp_path: Path) -> None:
    original = (ROOT / "recipes" / "demo-scales.toml").read_bytes()
    code, out, err = run_cli("recipes", "copy", "demo-scales", tmp_path / "mine.toml")
    assert code == 0, err
    assert (tmp_path / "mine.toml").read_bytes() == original and "msattn train" in out
    (tmp_path / "mine.toml").write_text("# my edits\n")
    code, _, err = run_cli("recipes", "copy", "demo", tmp_path / "mine.toml")
    assert code == 2 and "already exists" in err and (tmp_path / "mine.toml").read_text() == "# my edits\n"
    code, _, err = run_cli("recipes", "copy", "demo", tmp_path)  # a folder: <folder>/demo.toml
    assert code == 0 and (tmp_path / "demo.toml").read_bytes() == (ROOT / "recipes" / "demo.toml").read_bytes()
    code, _, err = run_cli("recipes", "copy", "demo", tmp_path / "missing" / "x.toml")
    assert code == 2 and "folder not found" in err and not (tmp_path / "missing").exists()
    with pytest.raises(UsageError, match="no bundled recipe"):
        copy_recipe("nope", tmp_path / "nope.toml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml", "mine.toml"]  # no partial files left


# ----------------------------------------------------------------------------- --dry-run > resolved.toml


@pytest.mark.parametrize("name", ["demo", "voc"])
def test_dry_run_stdout_is_the_resolved_recipe_alone(run_cli, tmp_path: Path, name: str) -> None:
    """``msattn train RECIPE --dry-run > resolved.toml`` gives a recipe that loads as the same recipe."""
    source = ROOT / "recipes" / f"{name}.toml"
    code, out, err = run_cli("train", source, "--dry-run", "--out", tmp_path / "run", "--set", "train.seed=3")
    assert code == 0, err
    assert "recipe OK" in err and "batch" in err
    tomllib.loads(out)  # nothing but TOML (comments included)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(out)
    expected = resolve_paths(load_recipe(source, ["train.seed=3"]))
    assert load_recipe(resolved) == expected
