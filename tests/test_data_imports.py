"""The import structure of ``msattn.data``: no import circles, no re-exported names in ``msattn.data.prepare``.

Read from the source files (every import, also those inside functions), so nothing is imported.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "msattn" / "data"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(DATA.rglob("*.py"))}


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.Import, ast.ImportFrom))]  # fmt: skip


def _graph() -> dict[str, set[str]]:
    """Module -> the msattn.data modules it imports (``from pkg import module`` counts as the module)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for node in _imports(path):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif node.module:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        edges[name] = {t for t in targets if t in MODULES and t != name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that ends where it starts; None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_circle_in_msattn_data() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_check_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@functools.cache
def _defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _prepare_names_used(path: Path) -> list[tuple[str, str]]:
    """(module, name) for each ``from msattn.data.prepare.X import name`` and each ``X.name`` after
    ``from msattn.data.prepare import X`` in the file at ``path``."""
    text = path.read_text(encoding="utf-8")
    if "msattn.data.prepare" not in text:
        return []
    tree = ast.parse(text)
    used, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msattn.data.prepare"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:  # a module: its attributes are checked below
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                else:
                    used.append((node.module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.append((aliases[node.value.id], node.attr))
    return used


@pytest.mark.parametrize("folder", ["msattn", "tests"])
def test_prepare_names_are_imported_from_the_module_that_defines_them(folder: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}: {name} from {module}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             for module, name in _prepare_names_used(path)
             if module in MODULES and name not in _defined_names(MODULES[module])]  # fmt: skip
    assert not wrong, "names taken from a module that does not define them: " + "; ".join(wrong)


def test_no_module_getattr_in_msattn_data_prepare() -> None:
    for path in (DATA / "prepare").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"], path
