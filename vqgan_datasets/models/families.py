"""Tokenizer families: the module of each (imported when first needed), and which family a
published file belongs to.

Detection reads what a file carries: tensor names and shapes, top-level keys, Lightning
hyper-parameters, and the Hub repo / file name it came from. A file with signs of a family other
than taming is never taken for taming silently: one such family wins, several are an error that
asks for `family=`. A file with only taming's signs is taming's; IBQ shares taming's tensor
names, so the log says how to choose it instead.

What a family's `evidence(names_to_shapes, extras)` receives in `extras`: "top_level_keys" (the
file's, sorted), "container" (the key its tensors were under: "state_dict", "model", "ema", or
None for a bare state dict), "hyper_parameters" (Lightning's, as plain dicts/lists/strings) when
saved, and "source": {"repo_id": Hub repo id or None, "filename": the file's name}.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .checkpoints import CheckpointError
from .config import FAMILIES

logger = logging.getLogger(__name__)

# Families whose published files share taming's tensor names (detected only by other signs).
_TAMING_NAMED = ("ibq",)
# Module names that differ from the family's name.
_MODULES = {"open_magvit2": "magvit2"}


def family_module(name: str) -> ModuleType:
    """The module implementing `name` (evidence, infer_config, to_flax, ...)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {name!r}; known families: {sorted(FAMILIES)}")
    return importlib.import_module(f"{__package__}.{_MODULES.get(name, name)}")


def detect(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any],
           origin: str = "checkpoint") -> tuple[str, list[str]]:
    """(family, the signs it was chosen on) for a file's tensors and extras; raises
    CheckpointError when no family fits or several non-taming families do."""
    found = {}
    for name in sorted(FAMILIES):
        signs = family_module(name).evidence(names_to_shapes, extras)
        if signs:
            found[name] = list(signs)
    others = {name: signs for name, signs in found.items() if name != "taming"}
    if len(others) > 1:  # signs of several: keep those whose architecture reads off the file
        fitting = {name: signs for name, signs in others.items() if _fits(name, names_to_shapes)}
        others = fitting or others
    if len(others) == 1:
        (name, signs), = others.items()
        return name, signs
    if len(others) > 1:
        listed = "; ".join(f"{name}: {', '.join(signs)}" for name, signs in sorted(others.items()))
        raise CheckpointError(
            f"{origin}: signs of several tokenizer families ({listed}); choose one with "
            "family= (CLI: --family)"
        )
    if "taming" in found:
        logger.info(
            "%s: taken for a taming VQGAN (%s). %s checkpoints have the same tensor names; "
            "if this is one, convert with family=%r (CLI: --family %s)", origin,
            "; ".join(found["taming"]), "/".join(n.upper() for n in _TAMING_NAMED),
            _TAMING_NAMED[0], _TAMING_NAMED[0],
        )
        return "taming", found["taming"]
    raise CheckpointError(unknown_message(names_to_shapes, extras, origin))


def _fits(name: str, names_to_shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether family `name` can read an architecture off these tensors."""
    try:
        family_module(name).infer_config(names_to_shapes)
    except (CheckpointError, ValueError, TypeError, KeyError, IndexError):
        return False
    return True


def unknown_message(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any],
                    origin: str) -> str:
    """What a file of no known family holds, and the families we know."""
    names = sorted(names_to_shapes)
    top = [str(k) for k in extras.get("top_level_keys", [])]
    shown = ", ".join(f"{n} {tuple(names_to_shapes[n])}" for n in names[:6])
    return (
        f"{origin}: not a checkpoint of a known tokenizer family. Top-level keys: "
        f"{top[:10]}{' ...' if len(top) > 10 else ''}; {len(names)} tensors, e.g. {shown}. "
        f"Known families: {', '.join(sorted(FAMILIES))}; if this is one of them, pass "
        "family= (CLI: --family)"
    )
