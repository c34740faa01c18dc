"""Parameter trees and the checks a weights file must pass before it becomes a model.

Flattening to tuple keys and back; float tensors only (integer or boolean weights are refused by
name); `check_fits`, enough tensors for the config, counted before any model is built;
`check_params`, one readable diff against the expected shapes, then finite values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import VQGANConfig


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, or does not match its config."""


def check_fits(flat: Mapping[tuple[str, ...], Any], config: VQGANConfig, origin: str) -> None:
    """Raise unless the tensors are enough for the model `config` describes, counted off the
    file alone, before any model is built: building the expected shapes costs time in proportion
    to the config's blocks, so a config asking for more blocks than the file holds fails here.
    Every family has two 3x3 convolutions per res block in encoder and decoder: at least
    4 * num_res_blocks * len(ch_mult) kernels. (Shapes are compared name by name afterwards.)"""
    kernels = sum(1 for value in flat.values() if np.ndim(value) == 4)
    needed = 4 * config.num_res_blocks * len(config.ch_mult)
    if kernels < needed:
        raise CheckpointError(
            f"{origin}: the weights do not fit the config (config.json): "
            f"num_res_blocks={config.num_res_blocks} over {len(config.ch_mult)} levels (ch_mult) "
            f"needs at least {needed:,} convolution kernels, the file holds {kernels:,}"
        )


def float_tensor(value: Any, file: Path, key: tuple[str, ...]) -> np.ndarray:
    """A tensor of `file` as float32; integer, boolean or non-numeric ones refused by name."""
    array = None
    with contextlib.suppress(TypeError, ValueError):  # refused below, by type
        array = np.asarray(value)
    # Integer or boolean weights would be cast without a word and encode every image to the
    # same tokens: a file holding them is not a trained model's weights.
    if array is not None and array.dtype.kind in "biu":
        raise CheckpointError(
            f"{file}: tensor {_tensor_name(file, key)!r} holds {array.dtype} values, expected "
            "floating point weights (float16, bfloat16, float32 or float64)"
        )
    if array is None or (array.dtype.kind != "f" and "float" not in array.dtype.name):
        raise CheckpointError(  # bfloat16 (ml_dtypes) has kind "V"
            f"{file}: {'/'.join(key)}: expected a float array, got {type(value).__name__}"
        )
    return array.astype(np.float32, copy=False)


def _tensor_name(file: Path, key: tuple[str, ...]) -> str:
    """A tensor's name as its file spells it ("." in safetensors, "/" in a msgpack tree)."""
    return ("." if file.name.endswith(".safetensors") else "/").join(key)


def check_params(flat: Mapping[tuple[str, ...], Any], expected_shapes: Mapping, origin: str, *,
                 unexpected: Iterable[str] = ()) -> None:
    """Raise one readable diff of missing, unexpected and mis-shaped parameter names (plus the
    names in `unexpected` that a converter could not map), then refuse non-finite values.

    `expected_shapes`: a parameter tree whose leaves have a `.shape` (as `modeling.param_shapes`
    returns) or are shape tuples, or the same flattened to tuple keys.
    """
    expected = _shape_table(expected_shapes)
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    missing = sorted("/".join(k) for k in expected.keys() - got.keys())
    unexpected = [*unexpected, *sorted("/".join(k) for k in got.keys() - expected.keys())]
    misshaped = sorted(
        f"{'/'.join(k)}: expected {expected[k]}, got {got[k]}"
        for k in expected.keys() & got.keys()
        if expected[k] != got[k]
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(_diff_message(origin, missing, unexpected, misshaped))
    _check_finite(flat, origin)


def _shape_table(shapes: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = shapes if all(isinstance(k, tuple) for k in shapes) else flatten(shapes)
    return {tuple(k): tuple(getattr(v, "shape", v)) for k, v in flat.items()}


def _check_finite(flat: Mapping[tuple[str, ...], Any], origin: str) -> None:
    # NaN/Inf weights load and run, then give the same (garbage) token for every image: refuse
    # them once, here. One np.isfinite pass per tensor (measured cost in the README).
    bad = ["/".join(k) for k, v in sorted(flat.items()) if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{origin}: non-finite values (NaN or Inf) in {bad[0]}"
            + (f" and {len(bad) - 1} more ({len(bad)} tensors: {', '.join(bad[:12])})" if bad[1:] else "")
            + "; such weights encode every image to the same garbage tokens, so they are refused"
        )


def _diff_message(origin: str, missing, unexpected, misshaped, limit: int = 12) -> str:
    lines = [f"{origin}: parameters do not match the config"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    return "\n".join(lines)


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested parameter tree as {("encoder", "conv_in", "kernel"): leaf, ...}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The inverse of flatten: tuple keys back to nested dicts."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out
