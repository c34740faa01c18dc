"""Published checkpoint files (.pt, .pth, .bin, .ckpt, .safetensors) read into numpy arrays.

Pickled files are loaded weights-only: the Lightning/omegaconf/argparse objects pickled around
the weights become inert stand-ins (their state is kept, for the hyper-parameters), and any other
global in the pickle is refused by name. What the file carries besides the tensors (its top-level
keys, Lightning's hyper-parameters) is returned for family detection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoints import CheckpointError
from .config import VQGANConfig

logger = logging.getLogger(__name__)

# Globals that Lightning checkpoints pickle around the weights (callbacks, hyper-parameters,
# numpy scalars). They are replaced by inert stand-ins, so nothing from the file is executed.
# Matched as whole top-level packages (their class names vary across versions) or exact names;
# never by string prefix, so "builtins.setattr" or "tamingx.y" are refused.
_STUBBED_PACKAGES = frozenset({
    "pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "pathlib",
    "argparse", "collections", "typing", "datetime", "taming",
})
_STUBBED_NAMES = frozenset({"builtins.set", "builtins.frozenset", "builtins.slice", "_codecs.encode"})
# Where a pickled checkpoint keeps its weights, in the order we look: Lightning's `state_dict`
# (taming, IBQ), then `{"model": ...}` (LlamaGen's files), then `{"ema": ...}` alone.
_CONTAINERS = ("state_dict", "model", "ema")
_MAX_PLAIN_DEPTH = 12


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """The tensors of a published checkpoint (float32 numpy, by their names in the file) and
    what else it carries: `extras` holds `top_level_keys`, `container` (the key the tensors
    were under, or None for a bare state dict), and `hyper_parameters` when the file has them."""

    path: str
    state: dict[str, np.ndarray]
    extras: dict[str, Any]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.state.items()}


def is_stubbed(name: str) -> bool:
    """Whether the pickled global `module.qualname` may be replaced by an inert stand-in."""
    return name in _STUBBED_NAMES or name.split(".", 1)[0] in _STUBBED_PACKAGES


class Inert:
    """Stand-in for a pickled object we neither trust nor need (only its state is kept)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return Inert(*args, **kwargs)


def read_source(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> SourceFile:
    """Read a checkpoint file's tensors as float32 numpy arrays, weights-only.

    Full unpickling (which can run code from the file) happens only with `unsafe_pickle=True`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    torch = _torch()
    if unsafe_pickle:
        logger.warning("%s: full unpickling requested; this runs any code the file contains", path)
        blob = torch.load(path, map_location="cpu", weights_only=False)
    else:
        blob = _load_weights_only(torch, path)
    if not isinstance(blob, Mapping) or not blob:
        raise CheckpointError(
            f"{path}: expected a dict of tensors, a Lightning checkpoint with 'state_dict' or a "
            f"{{'model': state_dict}} file, got {type(blob).__name__}"
        )
    container = None
    state = blob
    if not all(isinstance(v, torch.Tensor) for v in blob.values()):
        container = next((key for key in _CONTAINERS if isinstance(blob.get(key), Mapping)), None)
        if container is None:
            raise CheckpointError(
                f"{path}: no weights found: top-level keys {sorted(map(str, blob))[:12]} hold no "
                f"tensors and none of {list(_CONTAINERS)} is there"
            )
        state = blob[container]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            where = f"{container}[{key!r}]" if container else f"[{key!r}]"
            raise CheckpointError(f"{path}: {where} is {type(value).__name__}, not a tensor")
        out[str(key)] = value.detach().to(torch.float32).cpu().numpy()
    if not out:
        raise CheckpointError(f"{path}: the state dict under {container!r} is empty")
    extras: dict[str, Any] = {"top_level_keys": sorted(map(str, blob)), "container": container}
    if "hyper_parameters" in blob:
        extras["hyper_parameters"] = plain(blob["hyper_parameters"])
    return SourceFile(path, out, extras)


def plain(value: Any, depth: int = 0) -> Any:
    """Pickled hyper-parameters as plain dicts, lists, strings and numbers (inert stand-ins
    become their kept state), so that detection can read them."""
    if depth > _MAX_PLAIN_DEPTH:
        return None
    if isinstance(value, Inert):
        inner = getattr(value, "state", None)
        if inner is None:
            inner = value.kwargs or list(value.args)
        return plain(inner, depth + 1)
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "converting PyTorch checkpoints needs PyTorch: pip install 'vqgan-datasets[torch]'"
        ) from err
    return torch


def _read_safetensors(path: str) -> SourceFile:
    from safetensors import safe_open

    def read(framework: str, convert) -> tuple[dict[str, np.ndarray], dict]:
        with safe_open(path, framework=framework) as f:
            names = list(f.keys())
            return {name: convert(f.get_tensor(name)) for name in names}, dict(f.metadata() or {})

    try:
        state, metadata = read("np", lambda t: np.asarray(t, dtype=np.float32))
    except Exception:  # noqa: BLE001 - bfloat16 has no numpy dtype: read through torch
        try:
            torch = _torch()
            state, metadata = read("pt", lambda t: t.to(torch.float32).numpy())
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file raises many kinds
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if not state:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors")
    extras = {"top_level_keys": sorted(state), "container": None, "metadata": metadata}
    return SourceFile(path, state, extras)


def _load_weights_only(torch, path: str):
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: let torch.load report it
        unsafe = []
    refused = [g for g in unsafe if not is_stubbed(g)]
    if refused:
        raise CheckpointError(
            f"{path}: the pickle references {refused}, which a weights-only load will not "
            "construct. If you trust this file, pass unsafe_pickle=True (CLI: --unsafe-pickle); "
            "that runs whatever code the file contains."
        )
    stubs = [(type(name.rsplit(".", 1)[-1], (Inert,), {}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - turn any unpickling failure into one message
        raise CheckpointError(
            f"{path}: could not be loaded weights-only ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). If you trust this file, pass "
            "unsafe_pickle=True (CLI: --unsafe-pickle); that runs code from the file."
        ) from err


def config_from_seed_voken_yaml(path: str | os.PathLike, what: str,
                                **fields: Any) -> VQGANConfig:
    """A VQGANConfig from a SEED-Voken model yaml (`model.init_args.ddconfig` plus `n_embed`,
    `embed_dim`), with `fields` set on top; errors name the file. `what` names the expected
    yaml in the error (e.g. "IBQ yaml, configs/IBQ/gpu/*.yaml")."""
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    model = doc.get("model", doc) if isinstance(doc, Mapping) else {}
    args = model.get("init_args", model.get("params", model)) if isinstance(model, Mapping) else {}
    if not isinstance(args, Mapping) or not isinstance(args.get("ddconfig"), Mapping):
        raise CheckpointError(
            f"{os.fspath(path)}: no model.init_args.ddconfig section (is it a SEED-Voken {what}?)"
        )
    data = {k: v for k, v in args["ddconfig"].items() if k != "num_down"}
    data.update({key: args[key] for key in ("n_embed", "embed_dim") if key in args})
    data.update(fields)
    try:
        return VQGANConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{os.fspath(path)}: {err}") from err


LIT_EMA_PREFIX = "model_ema."  # where SEED-Voken's LitEma keeps its copies in a checkpoint


def lit_ema_weights(state: Mapping[str, np.ndarray], model_prefixes: tuple[str, ...],
                    family: str) -> tuple[dict[str, np.ndarray], str | None]:
    """The weights SEED-Voken's inference runs (`ema_scope`): each parameter under
    `model_prefixes` replaced by its LitEma copy when the file has copies ("ema"), else the live
    weights (None). The copies themselves are dropped; other tensors stay."""
    live = {k: v for k, v in state.items() if not k.startswith(LIT_EMA_PREFIX)}
    if not any(k.startswith(LIT_EMA_PREFIX) for k in state):
        return live, None
    if not any(k.startswith(model_prefixes) for k in live):
        raise CheckpointError(
            f"the file holds EMA copies ({LIT_EMA_PREFIX}*) but no {'/'.join(model_prefixes)} "
            "tensors to name them by; load the full Lightning checkpoint SEED-Voken saves"
        )
    missing = []
    for name in list(live):
        if not name.startswith(model_prefixes):
            continue
        copy = LIT_EMA_PREFIX + name.replace(".", "")  # LitEma's buffer names have no dots
        if copy in state:
            live[name] = state[copy]
        else:
            missing.append(f"{name} (no {copy})")
    if missing:
        raise CheckpointError(
            f"the file has EMA copies ({LIT_EMA_PREFIX}*) but not of every parameter: "
            f"{'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    logger.info("%s checkpoint: using its EMA weights (%s*), as SEED-Voken's inference does",
                family, LIT_EMA_PREFIX)
    return live, "ema"
