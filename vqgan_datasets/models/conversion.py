"""Published tokenizer checkpoints of any family → a model directory `VQModel.from_pretrained`
loads (config.json naming the family and which weights, model.safetensors, flax_model.msgpack).

`convert_checkpoint` reads the file weights-only (`sourcefiles`), detects the family
(`families.detect`, or `family=`), takes the family's weights (`select_weights`, e.g. IBQ's EMA
copies), reads the architecture off the tensors or the given config, and renames the tensors
into our tree. `converted_directory` does the same once per source file into a cache, for
`VQModel.from_pretrained` on a published file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import checkpoints, families
from .checkpoints import CheckpointError
from .config import VQGANConfig
from .sourcefiles import SourceFile, read_source
from .vqgan import param_shapes

logger = logging.getLogger(__name__)

# Bumped when a conversion would write different parameters for the same file: cached
# conversions of an older format are redone.
_FORMAT = 1


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    family: str | None = None,
    config: VQGANConfig | str | os.PathLike | None = None,
    *,
    value_range: tuple[float, float] | None = None,
    unsafe_pickle: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a published checkpoint (.pt/.pth/.bin/.ckpt/.safetensors) into a directory that
    `VQModel.from_pretrained` loads; returns the directory.

    `family`: "taming", "llamagen", "ibq", "maskgit" or "open_magvit2"; None detects it from the file.
    `config`: a VQGANConfig, or the family's yaml file; None reads the architecture off the
    tensors. `value_range`: the pixel range the model was trained on (default: the family's).
    `source`: where the file came from ({"repo_id": ..., "filename": ...}), a detection hint.
    """
    loaded = read_source(src, unsafe_pickle=unsafe_pickle)
    chosen, params = _convert(loaded, family, config, value_range, source)
    return checkpoints.save(out, chosen, params, param_shapes(chosen))


def converted_directory(src: str | os.PathLike, cache_dir: str | os.PathLike, digest: str, *,
                        family: str | None = None, source: Mapping[str, Any] | None = None,
                        unsafe_pickle: bool = False) -> Path:
    """A model directory for a published file, converted once into `cache_dir` under the
    file's digest ("sha256:<hex>") and the family asked for; later calls reuse it."""
    key = f"{digest.split(':')[-1]}-{family or 'auto'}-v{_FORMAT}"
    target = Path(cache_dir) / key
    if (target / checkpoints.CONFIG_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        convert_checkpoint(src, staging, family, source=source, unsafe_pickle=unsafe_pickle)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted the same file first
            if not (target / checkpoints.CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s into %s", os.fspath(src), target)
    return target


def _convert(loaded: SourceFile, family: str | None, config: Any, value_range: Any,
             source: Mapping[str, Any] | None) -> tuple[VQGANConfig, dict]:
    origin = loaded.path
    extras = dict(loaded.extras)
    extras["source"] = dict(source) if source else {"repo_id": None,
                                                    "filename": os.path.basename(origin)}
    if family is None and isinstance(config, VQGANConfig) and config.family != "taming":
        family = config.family
    if family is None:
        family, signs = families.detect(loaded.shapes, extras, origin)
        logger.info("%s: %s checkpoint (%s)", origin, family, "; ".join(signs))
    module = families.family_module(family)
    state, weights = loaded.state, None
    if hasattr(module, "select_weights"):
        state, weights = module.select_weights(state)
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    try:
        if isinstance(config, VQGANConfig):
            chosen = config
        else:
            chosen = module.infer_config(shapes, None if config is None else os.fspath(config))
        changes: dict[str, Any] = {"family": family, "weights": weights}
        if value_range is not None:
            changes["value_range"] = tuple(value_range)
        chosen = chosen.replace(**changes)
    except CheckpointError as err:
        raise CheckpointError(f"{origin}: {err}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{origin}: {err}; pass config= (the model's yaml)") from err
    try:
        params = module.to_flax(state, chosen)
    except CheckpointError as err:
        raise CheckpointError(f"{origin}: {err}") from err
    return chosen, params
