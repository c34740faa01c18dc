"""vqgan-datasets: tokenize image datasets with a Flax/JAX VQGAN on every local device, and back.

The public API, imported lazily so that `import vqgan_datasets` stays cheap (no JAX, no datasets)
until a name is used. Layers, each importing only the ones below it (tests/test_package.py):
leaves (forks, storage, tarsamples, claims) → images → config → checkpoints → layers, modeling
→ taming, metadata → batches, workerproc, workers, engine_settings, engine → options, handle,
streams (shared by every adapter) → hf_*, hf, stages (the adapters) → convert, manifest,
shards, ray, distributed (jobs) → wds (the webdataset namespace) → inputs, jobs → cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Registered at import, before any fork: a DataLoader/WebLoader worker forked after JAX started
# in the parent must fail at once instead of hanging (forks.py is standard library only).
from . import forks as _forks  # noqa: E402, F401

_EXPORTS = {
    "VQGANConfig": "config",
    "VQModel": "modeling",
    "convert_taming_checkpoint": "taming",
    "load_image": "images",
    "ImageDecodeError": "images",
    "Engine": "engine",
    "encode_iter": "engine",
    "decode_iter": "engine",
    "VQGANTokenizer": "hf",
    "VQGANDetokenizer": "hf",
    "vqgan_tokenize": "hf",
    "vqgan_detokenize": "hf",
    "EncodeOptions": "options",
    "ModelHandle": "handle",
    "tokenize_shards": "shards",
}

__all__ = [
    "EncodeOptions",
    "Engine",
    "ImageDecodeError",
    "ModelHandle",
    "VQGANConfig",
    "VQGANDetokenizer",
    "VQGANTokenizer",
    "VQModel",
    "__version__",
    "convert_taming_checkpoint",
    "decode_iter",
    "encode_iter",
    "load_image",
    "tokenize_shards",
    "vqgan_detokenize",
    "vqgan_tokenize",
]

if TYPE_CHECKING:
    from .config import VQGANConfig
    from .engine import Engine, decode_iter, encode_iter
    from .handle import ModelHandle
    from .hf import VQGANDetokenizer, VQGANTokenizer, vqgan_detokenize, vqgan_tokenize
    from .images import ImageDecodeError, load_image
    from .modeling import VQModel
    from .options import EncodeOptions
    from .shards import tokenize_shards
    from .taming import convert_taming_checkpoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vqgan_datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
