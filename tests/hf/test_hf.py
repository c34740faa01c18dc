"""hf/__init__.py, the public face: the README's names, the ready instances (which resolve nothing
until used), and the layering of the hf/ modules (no import circles, no private names shared)."""

from __future__ import annotations

import ast
from pathlib import Path

import vqgan_datasets
from vqgan_datasets import hf

PACKAGE = Path(vqgan_datasets.__file__).parent / "hf"
# Low → high: each module may import only the ones before it.
LAYERS = ["arrow", "hub", "model", "tokenize", "detokenize", "__init__"]


def test_readme_names_keep_working():
    for name in ("VQGANTokenizer", "VQGANDetokenizer", "vqgan_tokenize", "vqgan_detokenize",
                 "write_metadata", "read_metadata", "write_hub_files", "update_dataset_card",
                 "DEFAULT_MODEL", "KEY_COLUMNS", "MapStats"):
        assert getattr(hf, name) is not None, name
    assert hf.DEFAULT_MODEL == "flax-community/vqgan_f16_16384"
    assert hf.KEY_COLUMNS == ("__key__", "key", "id")
    assert vqgan_datasets.VQGANTokenizer is hf.VQGANTokenizer
    assert vqgan_datasets.vqgan_tokenize is hf.vqgan_tokenize
    assert hf._read_column_metadata is hf.read_column_metadata  # old name, still used by jobs


def test_ready_instances_resolve_nothing_until_used():
    assert hf.vqgan_tokenize.loaded is False and hf.vqgan_tokenize._spec is None
    assert hf.vqgan_tokenize._source._described is None  # not even config.json
    assert hf.vqgan_detokenize._source._described is None


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(module imported from this package, names imported) for every import in `module`, lazy
    ones inside functions included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module, [a.name for a in node.names]))
            else:  # from . import x
                found.extend((a.name, []) for a in node.names)
    return found


def test_hf_modules_form_layers_without_private_imports():
    for position, module in enumerate(LAYERS):
        for target, names in _imports(module):
            if target in LAYERS:
                assert LAYERS.index(target) < position, f"{module} imports {target}, a higher layer"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private {private} from {target}"
        lines = (PACKAGE / f"{module}.py").read_text().count("\n")
        assert lines <= 500, f"{module}.py has {lines} lines"
