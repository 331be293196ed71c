"""The package's shape: imports run one way, names come from where they are defined, sizes stay readable.

Read from the source with :mod:`ast` (nothing is imported). The layers are those of
``docs/architecture.md``: a module may import its own package and any lower layer, never a
higher one, and no two modules import each other through any chain.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "msattn"

#: lowest first; a module may import from its own layer's packages only within its own package
LAYERS: tuple[tuple[str, ...], ...] = (
    ("msattn", "msattn.errors", "msattn.io", "msattn.images", "msattn.geometry", "msattn.locks", "msattn.sizes"),
    ("msattn.outputs",),
    ("msattn.data", "msattn.models"),
    ("msattn.config",),
    ("msattn.visualize",),
    ("msattn.tiling",),
    ("msattn.runtime",),
    ("msattn.export", "msattn.crf"),
    ("msattn.infer",),
    ("msattn.train",),
    ("msattn.bench",),
    ("msattn.analysis",),
    ("msattn.cli",),
)
#: optional dependencies: imported where they are used, so that msattn runs without them
OPTIONAL = ("matplotlib", "onnx", "onnxruntime", "onnxscript", "pydensecrf", "timm", "tensorboard", "torch.utils.tensorboard")
#: packages whose commands import their implementation inside the command (``msattn --help``
#: would otherwise import torch: 0.2 s against 1.7 s, measured in msattn/cli/app.py's docstring)
LAZY_ALLOWED = ("msattn.cli",)
#: deprecated 0.1 import paths of documented names, kept for the 0.2 release (CHANGELOG); no module uses them
ALIAS_FACES = ("msattn.models",)
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    defined: set[str] = field(default_factory=set)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module = Module(_module_name(path), path, tree)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names = target.elts if isinstance(target, ast.Tuple) else [target]
                    module.defined |= {n.id for n in names if isinstance(n, ast.Name)}
        modules[module.name] = module
    return modules


MODULES = _modules()


def _top_level(tree: ast.Module) -> set[int]:
    """ids of the statements outside every function and class (module level, also inside if/try blocks)."""
    top: set[int] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        top.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return top


def _imports(module: Module) -> Iterator[tuple[ast.AST, str, str | None, bool]]:
    """(node, imported module, imported name or None, at the top of the file) for every msattn import."""
    top = _top_level(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("msattn"):
                    yield node, alias.name, None, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("msattn") and node.level == 0:
            for alias in node.names:
                yield node, node.module, alias.name, id(node) in top


def _target(module: str, name: str | None) -> str:
    """The module an import statement depends on (a submodule when the name is one)."""
    return f"{module}.{name}" if name is not None and f"{module}.{name}" in MODULES else module


def _layer(name: str) -> tuple[int, str]:
    best = (-1, "")
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if (name == package or name.startswith(package + ".")) and len(package) > len(best[1]):
                best = (level, package)
    return best


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES.values():
        for _, imported, name, _ in _imports(module):
            target = _target(imported, name)
            if target in MODULES and target != module.name:
                edges[module.name].add(target)
    return edges


def test_every_module_has_a_layer() -> None:
    assert [name for name in MODULES if _layer(name)[0] < 0] == []


def test_no_import_circles() -> None:
    edges, state, stack, cycles = _edges(), {}, [], []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
    assert cycles == []


def test_imports_only_run_down_the_layers() -> None:
    upward = []
    for module in MODULES.values():
        level, package = _layer(module.name)
        for target in _edges()[module.name]:
            t_level, t_package = _layer(target)
            if t_level > level or (t_level == level and t_package != package and level > 0):
                upward.append(f"{module.name} -> {target}")
    assert upward == []


def test_names_are_imported_from_the_module_that_defines_them() -> None:
    through = []
    for module in MODULES.values():
        for _, imported, name, _ in _imports(module):
            if name is None or imported not in MODULES or f"{imported}.{name}" in MODULES:
                continue
            if imported in ALIAS_FACES or name not in MODULES[imported].defined:
                through.append(f"{module.name}: {name} from {imported}")
    assert through == []


def test_no_module_getattr_and_no_reexport_lists_of_foreign_names() -> None:
    found = []
    for module in MODULES.values():
        if "__getattr__" in module.defined:
            found.append(f"{module.name}.__getattr__")
        if module.name in ALIAS_FACES:
            continue
        for node in module.tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names = {elt.value for elt in getattr(node.value, "elts", []) if isinstance(elt, ast.Constant)}
                found += [f"{module.name}.__all__ lists {n} (not defined there)" for n in sorted(names - module.defined)]
    assert found == []


def test_msattn_imports_are_at_the_top_of_the_file() -> None:
    inside = []
    for module in MODULES.values():
        if module.name.startswith(LAZY_ALLOWED):
            continue
        for node, imported, _, at_top in _imports(module):
            if not at_top:
                inside.append(f"{module.path.relative_to(PACKAGE.parent)}:{node.lineno} imports {imported}")
    assert inside == []


def _third_party_imports_inside_functions(module: Module) -> Iterator[tuple[int, str]]:
    top = _top_level(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if not name.startswith("msattn"):
                    yield node.lineno, name


def test_other_imports_inside_functions_are_optional_dependencies() -> None:
    lazy = []
    for module in MODULES.values():
        if module.name.startswith(LAZY_ALLOWED):
            continue
        for line, name in _third_party_imports_inside_functions(module):
            if not name.startswith(OPTIONAL):
                lazy.append(f"{module.path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert lazy == []


@pytest.mark.parametrize("limit", [MAX_FILE_LINES])
def test_files_stay_readable(limit: int) -> None:
    long = [f"{m.path.relative_to(PACKAGE.parent)}: {n}" for m in MODULES.values()
            if (n := len(m.path.read_text(encoding="utf-8").splitlines())) > limit]  # fmt: skip
    assert long == []


def test_functions_stay_readable() -> None:
    long = []
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES:
                long.append(f"{module.path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert long == []


def test_no_folder_holds_more_than_a_quarter_of_the_lines() -> None:
    lines: dict[str, int] = {}
    for module in MODULES.values():
        folder = module.path.parent.relative_to(PACKAGE.parent).as_posix()
        lines[folder] = lines.get(folder, 0) + len(module.path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    assert {f: n for f, n in lines.items() if n > total / 4} == {}
