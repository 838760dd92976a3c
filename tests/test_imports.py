"""The house's rules, checked on the source (ast, nothing imported): imports only go down the layers,
no circles, no private names of another module."""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set, Tuple

import lymph_cv

PACKAGE = Path(lymph_cv.__file__).parent
#: Bottom to top (DESIGN.md, "Layers"); a module may import its own layer and those below.
LAYERS = ("errors", "core", "formats", "workdir", "net", "stages", "cluster", "pipeline", "pycaffe", "commands",
          "cli")
#: The package itself (``DEFAULT_CLASSES``, the version) is importable from anywhere; ``__main__`` is above all.
RANKS = {"lymph_cv": -1, "lymph_cv.__main__": len(LAYERS)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def _modules() -> Dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8"), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _rank(module: str) -> int:
    if module in RANKS:
        return RANKS[module]
    return LAYERS.index(module.split(".")[1])


def _is_package(name: str, modules: Dict[str, ast.Module]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def _imports(name: str, tree: ast.Module, modules: Dict[str, ast.Module]) -> List[Tuple[str, int, List[str]]]:
    """(imported lymph_cv module, line, names taken from it) of every import, at any depth (lazy ones too)."""
    found = []
    package = name if _is_package(name, modules) else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "lymph_cv"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lymph_cv":
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # `from package import module`
                    found.append((f"{base}.{alias.name}", node.lineno, []))
                else:
                    names.append(alias.name)
            if names:
                found.append((base, node.lineno, names))
    return found


def test_imports_go_down_the_layers_and_take_no_private_names():
    modules = _modules()
    problems = []
    for name, tree in modules.items():
        for target, line, names in _imports(name, tree, modules):
            if target not in modules:
                problems.append(f"{name}:{line}: imports {target}, which is not a module of the package")
                continue
            if _rank(target) > _rank(name):
                problems.append(f"{name}:{line}: imports {target}, a higher layer")
            private = [n for n in names if n.startswith("_") and not n.startswith("__") and target != name]
            if private:
                problems.append(f"{name}:{line}: imports private {', '.join(private)} of {target}")
    assert not problems, "\n".join(problems)


def test_no_private_attribute_of_an_imported_module():
    modules = _modules()
    problems = []
    for name, tree in modules.items():
        bound = {}  # local name → lymph_cv module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
            elif isinstance(node, ast.ImportFrom) and node.module:
                bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                              if f"{node.module}.{a.name}" in modules})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{name}:{node.lineno}: uses private {node.attr} of {bound[node.value.id]}")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    modules = _modules()
    graph: Dict[str, Set[str]] = {
        name: {target for target, _line, _names in _imports(name, tree, modules) if target in modules and target != name}
        for name, tree in modules.items()
    }
    # A package's __init__ importing its own modules (to register them) is how registries fill, not a circle.
    for name in graph:
        if _is_package(name, modules):
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: Dict[str, int] = {}
    stack: List[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)
