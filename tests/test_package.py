"""The package's shape (issue 12): no import circles, even through imports inside functions;
no module over ~500 lines; no private name imported from another module; a cheap top import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqgan_datasets"
MAX_LINES = 520  # "about 500": a little slack for a docstring, never a second job


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, str | None]]:
    """(package module, imported name or None) for every import anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x
                found += [(a.name, None) for a in node.names if a.name in modules]
            elif node.level == 1 or (node.module or "").startswith("vqgan_datasets."):
                target = node.module.split(".")[-1] if node.module else None
                if target in modules:
                    found += [(target, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vqgan_datasets" and len(parts) > 1 and parts[1] in modules:
                    found.append((parts[1], None))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles_even_through_lazy_imports():
    modules = _modules()
    names = set(modules) - {"__init__"}
    graph = {m: {t for t, _ in _imports(tree, names) if t != m}
             for m, tree in modules.items() if m != "__init__"}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_no_private_names_imported_across_modules():
    modules = _modules()
    names = set(modules) - {"__init__"}
    private = sorted(f"{m} imports {t}.{n}" for m, tree in modules.items()
                     for t, n in _imports(tree, names)
                     if n is not None and n.startswith("_") and not n.startswith("__"))
    assert private == []


def test_every_module_is_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_importing_the_package_loads_neither_jax_nor_datasets():
    code = ("import sys, vqgan_datasets; "
            "print(sorted(m for m in ('jax', 'datasets', 'numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
