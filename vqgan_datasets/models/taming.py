"""taming-transformers PyTorch checkpoints → a model directory `VQModel.from_pretrained` loads.

Above modeling (it needs `param_shapes` to check the converted tree) and above checkpoints (it
writes through `checkpoints.save`). Loading is weights-only: the Lightning objects pickled
around the weights become inert stand-ins, and anything else in the pickle is refused by name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoints
from .checkpoints import CheckpointError
from .config import VQGANConfig
from .modeling import param_shapes

logger = logging.getLogger(__name__)

_TOP_LEVEL = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")

# Globals that Lightning checkpoints pickle around the weights (callbacks, hyper-parameters,
# numpy scalars). They are replaced by inert stand-ins, so nothing from the file is executed.
# Matched as whole top-level packages (their class names vary across versions) or exact names;
# never by string prefix, so "builtins.setattr" or "tamingx.y" are refused.
_STUBBED_PACKAGES = frozenset({
    "pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "pathlib",
    "argparse", "collections", "typing", "datetime", "taming",
})
_STUBBED_NAMES = frozenset({"builtins.set", "builtins.frozenset", "builtins.slice", "_codecs.encode"})


def _is_stubbed(name: str) -> bool:
    """Whether the pickled global `module.qualname` may be replaced by an inert stand-in."""
    return name in _STUBBED_NAMES or name.split(".", 1)[0] in _STUBBED_PACKAGES


class _Inert:
    """Stand-in for a pickled object we neither trust nor need (only its state is kept)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(*args, **kwargs)


def load_taming_state_dict(ckpt_path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict:
    """The `state_dict` of a taming .ckpt/.pt file as numpy arrays.

    Loads with `torch.load(weights_only=True)`; the Lightning objects around the weights are
    replaced by inert stand-ins. Full unpickling (which can run code from the file) happens only
    with `unsafe_pickle=True`.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "converting taming checkpoints needs PyTorch: pip install 'vqgan-datasets[torch]'"
        ) from err
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if unsafe_pickle:
        logger.warning("%s: full unpickling requested; this runs any code the file contains", path)
        blob = torch.load(path, map_location="cpu", weights_only=False)
    else:
        blob = _load_weights_only(torch, path)
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(
            f"{path}: expected a dict of tensors or a Lightning checkpoint with 'state_dict', "
            f"got {type(blob).__name__}"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict[{key!r}] is {type(value).__name__}, not a tensor")
        out[str(key)] = value.detach().to(torch.float32).cpu().numpy()
    return out


def _load_weights_only(torch, path: str):
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: let torch.load report it
        unsafe = []
    refused = [g for g in unsafe if not _is_stubbed(g)]
    if refused:
        raise CheckpointError(
            f"{path}: the pickle references {refused}, which a weights-only load will not "
            "construct. If you trust this file, pass unsafe_pickle=True (CLI: --unsafe-pickle); "
            "that runs whatever code the file contains."
        )
    stubs = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - turn any unpickling failure into one message
        raise CheckpointError(
            f"{path}: could not be loaded weights-only ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). If you trust this file, pass "
            "unsafe_pickle=True (CLI: --unsafe-pickle); that runs code from the file."
        ) from err


_IGNORED_TAMING_PREFIXES = ("loss.", "discriminator.", "perceptual_loss.")


def taming_to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig, origin: str) -> dict:
    """Rename and transpose a taming VQModel state_dict into vqgan-jax's parameter tree, checked
    against `config` (one diff naming what is missing, unexpected or mis-shaped)."""
    return _to_flax(state, param_shapes(config), origin)


def _to_flax(state: Mapping[str, np.ndarray], shapes: Mapping, origin: str) -> dict:
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith(_IGNORED_TAMING_PREFIXES):
            continue
        if key == "quantize.used" or key.startswith("quantize.re_embed"):
            raise CheckpointError(f"{origin}: codebook remapping ({key}) is not supported")
        parts = re.sub(r"\.(\d+)", r"_\1", key).split(".")
        if parts[0] not in _TOP_LEVEL:
            unexpected.append(key)
            continue
        *path, leaf = parts
        if leaf == "bias":
            flat[(*path, "bias")] = value
        elif leaf == "weight" and value.ndim == 4:
            flat[(*path, "kernel")] = value.transpose(2, 3, 1, 0)  # OIHW → HWIO
        elif leaf == "weight" and path[-1] == "embedding":
            flat[(*path, "embedding")] = value
        elif leaf == "weight" and value.ndim == 1:
            flat[(*path, "scale")] = value
        else:
            unexpected.append(key)
    checkpoints.check_params(flat, shapes, origin, unexpected=unexpected)
    return checkpoints.unflatten(flat)


def infer_taming_config(state: Mapping[str, np.ndarray], resolution: int = 256) -> VQGANConfig:
    """Read the architecture off a taming state_dict's names and shapes (attention placement is
    relative to `resolution`, which the weights cannot tell)."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"cannot infer the config: no {key!r} in the checkpoint")
        return tuple(state[key].shape)

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
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
    state = load_taming_state_dict(ckpt_path, unsafe_pickle=unsafe_pickle)
    if config is None:
        try:
            config = infer_taming_config(state)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{os.fspath(ckpt_path)}: {err}; pass config= (a taming yaml)") from err
    elif not isinstance(config, VQGANConfig):
        config = VQGANConfig.from_taming_yaml(config)
    config = config.replace(value_range=tuple(value_range))
    shapes = param_shapes(config)
    params = _to_flax(state, shapes, origin=os.fspath(ckpt_path))
    return checkpoints.save(output_dir, config, params, shapes)

