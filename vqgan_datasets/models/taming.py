"""The taming-transformers family: its checkpoints' names and layouts onto our parameter tree.

A family module (see `families`): `evidence` (signs that a file is taming's), `infer_config`
(the architecture off the tensor shapes, or a taming yaml), `to_flax` (renaming and transposing
into vqgan-jax's tree). `flax_tree` is the shared renaming machinery for the families whose
module is the taming layout (LlamaGen, IBQ). `convert_taming_checkpoint` stays the public entry
for taming files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoints
from .checkpoints import CheckpointError
from .config import VQGANConfig
from .sourcefiles import is_stubbed as _is_stubbed  # noqa: F401 - the allow-list, tested here
from .sourcefiles import read_source
from .vqgan import param_shapes

FAMILY = "taming"

_TOP_LEVEL = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
# Training-only parts of taming (and IBQ) Lightning checkpoints.
_IGNORED_PREFIXES = ("loss.", "discriminator.", "perceptual_loss.")

Rename = Callable[[str], "tuple[str, ...] | None"]


def evidence(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any]) -> list[str]:
    """Signs that a file holds a taming-layout VQGAN (taming's own module names)."""
    signs = []
    if any(name.startswith("encoder.down.") for name in names_to_shapes):
        signs.append("tensor names encoder.down.<level>.block.<i> (taming's Encoder)")
    if any(name.startswith("decoder.up.") for name in names_to_shapes):
        signs.append("tensor names decoder.up.<level>.block.<i> (taming's Decoder)")
    return signs


def infer_config(names_to_shapes: Mapping[str, tuple[int, ...]],
                 yaml_path: str | os.PathLike | None = None) -> VQGANConfig:
    """The architecture from a taming yaml when given, else off the tensor names and shapes."""
    if yaml_path is not None:
        return VQGANConfig.from_taming_yaml(yaml_path)
    return infer_taming_config(names_to_shapes)


def to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Rename and transpose a taming VQModel state dict into our tree, checked against `config`."""
    return flax_tree(state, config, _taming_path)


def _taming_path(name: str) -> tuple[str, ...] | None:
    if name.startswith(_IGNORED_PREFIXES):
        return None
    if name == "quantize.used" or name.startswith("quantize.re_embed"):
        raise CheckpointError(f"codebook remapping ({name}) is not supported")
    parts = tuple(re.sub(r"\.(\d+)", r"_\1", name).split("."))
    return parts if parts[0] in _TOP_LEVEL else ()


def flax_tree(state: Mapping[str, np.ndarray], config: VQGANConfig, rename: Rename) -> dict:
    """Our parameter tree from a PyTorch state dict, checked against `config`'s shapes.

    `rename(name)` gives the module path plus torch leaf ("weight"/"bias") in our tree, None
    for a tensor to skip, or () for one it does not know. Conv weights go OIHW → HWIO, norm
    weights become `scale`, embedding weights `embedding`. A tensor whose shape differs from
    what the config expects is named with both shapes (in the file's layout).
    """
    expected = {k: tuple(v.shape) for k, v in checkpoints.flatten(param_shapes(config)).items()}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    for name, value in state.items():
        path = rename(name)
        if path is None:
            continue
        key = _leaf_key(path, value) if path else None
        if key is None:
            unexpected.append(name)
            continue
        converted = value.transpose(2, 3, 1, 0) if key[-1] == "kernel" else value
        want = expected.get(key)
        if want is not None and tuple(converted.shape) != want:
            in_file = (want[3], want[2], want[0], want[1]) if key[-1] == "kernel" else want
            misshaped.append(f"{name}: the config expects {in_file}, the file has "
                             f"{tuple(value.shape)}")
            continue
        flat[key] = converted
    if misshaped:
        raise CheckpointError(
            f"tensor shapes do not match the {config.family} config "
            f"({len(misshaped)} tensors): " + "; ".join(misshaped[:8])
            + (f"; ... and {len(misshaped) - 8} more" if len(misshaped) > 8 else "")
        )
    checkpoints.check_params(flat, expected, f"{config.family} checkpoint", unexpected=unexpected)
    return checkpoints.unflatten(flat)


def _leaf_key(path: tuple[str, ...], value: np.ndarray) -> tuple[str, ...] | None:
    *modules, leaf = path
    if leaf == "bias":
        return (*modules, "bias")
    if leaf != "weight":
        return None
    if value.ndim == 4:
        return (*modules, "kernel")
    if modules and modules[-1] == "embedding":
        return (*modules, "embedding")
    if value.ndim == 1:
        return (*modules, "scale")
    return None


def infer_taming_config(state: Mapping[str, Any], resolution: int = 256) -> VQGANConfig:
    """Read the architecture off a taming state dict's names and shapes (arrays or shape
    tuples); attention placement is relative to `resolution`, which the weights cannot tell."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"cannot infer the config: no {key!r} in the checkpoint")
        value = state[key]
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError("cannot infer the config: no encoder.down.<level> tensors (taming's "
                              f"names); first names: {sorted(state)[:5]}")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    attn = tuple(
        resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state
    )
    z_out = shape("encoder.conv_out.weight")[0]
    n_embed, embed_dim = shape("quantize.embedding.weight")
    z_channels = shape("post_quant_conv.weight")[0]
    return VQGANConfig(
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        in_channels=shape("encoder.conv_in.weight")[1],
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn,
        resolution=resolution,
        z_channels=z_channels,
        double_z=z_out == 2 * z_channels,
        embed_dim=embed_dim,
        n_embed=n_embed,
        resamp_with_conv="encoder.down.0.downsample.conv.weight" in state or len(levels) == 1,
    )


def load_taming_state_dict(ckpt_path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict:
    """The `state_dict` of a taming .ckpt/.pt file as numpy arrays (weights-only unpickling;
    see `sourcefiles.read_source`)."""
    return read_source(ckpt_path, unsafe_pickle=unsafe_pickle).state


def taming_to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig, origin: str) -> dict:
    """`to_flax` with `origin` (a file name) in front of any error."""
    try:
        return to_flax(state, config)
    except CheckpointError as err:
        raise CheckpointError(f"{origin}: {err}") from err


def convert_taming_checkpoint(
    ckpt_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: VQGANConfig | str | os.PathLike | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    unsafe_pickle: bool = False,
) -> Path:
    """Convert a taming-transformers checkpoint into a directory `VQModel.from_pretrained` loads.

    `config`: a VQGANConfig, a taming yaml path, or None to read the architecture off the
    weights. `value_range`: taming trains on [-1, 1]; change it only if you know otherwise.
    """
    source = read_source(ckpt_path, unsafe_pickle=unsafe_pickle)
    origin = os.fspath(ckpt_path)
    try:
        if config is None:
            config = infer_taming_config(source.shapes)
        elif not isinstance(config, VQGANConfig):
            config = VQGANConfig.from_taming_yaml(config)
    except CheckpointError as err:
        raise CheckpointError(f"{origin}: {err}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{origin}: {err}; pass config= (a taming yaml)") from err
    config = config.replace(family=FAMILY, value_range=tuple(value_range))
    params = taming_to_flax(source.state, config, origin)
    return checkpoints.save(output_dir, config, params, param_shapes(config))
