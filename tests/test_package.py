"""The package's shape: folders in the order data flows, each importing only the folders before
it; no import circles, even through imports inside functions; no module over ~500 lines; no
private name imported from another module; a cheap top import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vqgan_datasets"
MAX_LINES = 520  # "about 500": a little slack for a docstring, never a second job

# Each layer may import itself and the layers before it. A unit is a subpackage or a top module.
LAYERS = [
    {"storage", "tarsamples"},
    {"models"},
    {"pipeline"},
    {"metadata", "options", "handle", "streams"},
    {"hf", "wds"},
    {"report"},
    {"jobs"},
    {"cli"},
]
# Public namespaces that only re-export names from below (they sit above everything they name).
NAMESPACES = {"", "wds", "ray"}


def _name(path: Path) -> str:
    """'models.config' for models/config.py, 'hf' for hf/__init__.py, '' for the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(name: str, path: Path) -> list[str]:
    parts = name.split(".") if name else []
    return parts if path.name == "__init__.py" else parts[:-1]


def _imports(name: str, path: Path, tree: ast.Module, modules: set[str]):
    """(imported module, imported name or None) for every import anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif (node.module or "").startswith("vqgan_datasets"):
                target = node.module.removeprefix("vqgan_datasets").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in modules:
                    found.append((sub, None))
                elif target in modules and alias.name != "__version__":
                    found.append((target, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vqgan_datasets."):
                    target = alias.name.removeprefix("vqgan_datasets.")
                    if target in modules:
                        found.append((target, None))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {m: {t for t, _ in _imports(m, p, tree, names) if t != m}
            for m, (p, tree) in modules.items()}


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


def _layer(module: str) -> int:
    unit = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_no_import_circles_even_through_lazy_imports():
    graph = _graph()
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_every_folder_imports_only_the_folders_before_it():
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() if m not in NAMESPACES
                    for t in targets if t not in NAMESPACES and _layer(t) > _layer(m))
    assert upward == []


def test_every_unit_has_a_layer():
    units = {m.split(".")[0] for m in _modules()} - NAMESPACES
    assert units <= set().union(*LAYERS)


def test_no_private_names_imported_across_modules():
    modules = _modules()
    names = set(modules)
    private = sorted(f"{m} imports {t}.{n}" for m, (p, tree) in modules.items()
                     for t, n in _imports(m, p, tree, names)
                     if n is not None and n.startswith("_") and not n.startswith("__"))
    assert private == []


def test_every_module_is_small():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_importing_the_package_loads_neither_jax_nor_datasets():
    code = ("import sys, vqgan_datasets; "
            "print(sorted(m for m in ('jax', 'datasets', 'numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_import_paths():
    code = ("import vqgan_datasets as v, vqgan_datasets.hf as h, vqgan_datasets.wds as w, "
            "vqgan_datasets.ray as r; "
            "[getattr(v, n) for n in v.__all__]; [getattr(h, n) for n in h.__all__]; "
            "[getattr(w, n) for n in w.__all__]; [getattr(r, n) for n in r.__all__]")
    subprocess.run([sys.executable, "-c", code], check=True)
