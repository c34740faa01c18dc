"""vqgan-datasets: tokenize image datasets with a Flax/JAX VQGAN on every local device, and back.

The public API, imported lazily so that `import vqgan_datasets` stays cheap (no JAX, no datasets)
until a name is used. Folders in the order data flows, each importing only the ones before it (tests/test_package.py):
storage, tarsamples (files and tar members) → models/ (configs, Flax layers, checkpoints, the
VQModel) → pipeline/ (images, worker processes, the engine) → metadata, options, handle,
streams (shared by every adapter) → hf/, wds/ (the adapters) → report/ → jobs/ (claims,
manifests, shard conversion, Ray, multi-host, the CLI's commands) → cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Registered at import, before any fork: a DataLoader/WebLoader worker forked after JAX started
# in the parent must fail at once instead of hanging (forks.py is standard library only).
from .pipeline import forks as _forks  # noqa: E402, F401

_EXPORTS = {
    "VQGANConfig": "models.config",
    "VQModel": "models.modeling",
    "convert_taming_checkpoint": "models.taming",
    "convert_checkpoint": "models.conversion",
    "load_image": "pipeline.images",
    "ImageDecodeError": "pipeline.images",
    "Engine": "pipeline.engine",
    "encode_iter": "pipeline.engine",
    "decode_iter": "pipeline.engine",
    "VQGANTokenizer": "hf",
    "VQGANDetokenizer": "hf",
    "vqgan_tokenize": "hf",
    "vqgan_detokenize": "hf",
    "EncodeOptions": "options",
    "ModelHandle": "handle",
    "tokenize_shards": "jobs.shards",
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
    "convert_checkpoint",
    "convert_taming_checkpoint",
    "decode_iter",
    "encode_iter",
    "load_image",
    "tokenize_shards",
    "vqgan_detokenize",
    "vqgan_tokenize",
]

if TYPE_CHECKING:
    from .handle import ModelHandle
    from .hf import VQGANDetokenizer, VQGANTokenizer, vqgan_detokenize, vqgan_tokenize
    from .jobs.shards import tokenize_shards
    from .models.config import VQGANConfig
    from .models.conversion import convert_checkpoint
    from .models.modeling import VQModel
    from .models.taming import convert_taming_checkpoint
    from .options import EncodeOptions
    from .pipeline.engine import Engine, decode_iter, encode_iter
    from .pipeline.images import ImageDecodeError, load_image


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vqgan_datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
