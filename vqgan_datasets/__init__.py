"""vqgan-datasets: tokenize image datasets with a Flax/JAX VQGAN on every local device, and back.

The public API, imported lazily so that `import vqgan_datasets` stays cheap (no JAX, no datasets)
until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "VQGANConfig": "config",
    "VQModel": "modeling",
    "convert_taming_checkpoint": "checkpoints",
    "load_image": "images",
    "ImageDecodeError": "images",
    "Engine": "engine",
    "encode_iter": "engine",
    "decode_iter": "engine",
    "VQGANTokenizer": "hf",
    "VQGANDetokenizer": "hf",
    "vqgan_tokenize": "hf",
    "vqgan_detokenize": "hf",
}

__all__ = [
    "Engine",
    "ImageDecodeError",
    "VQGANConfig",
    "VQGANDetokenizer",
    "VQGANTokenizer",
    "VQModel",
    "__version__",
    "convert_taming_checkpoint",
    "decode_iter",
    "encode_iter",
    "load_image",
    "vqgan_detokenize",
    "vqgan_tokenize",
]

if TYPE_CHECKING:
    from .checkpoints import convert_taming_checkpoint
    from .config import VQGANConfig
    from .engine import Engine, decode_iter, encode_iter
    from .hf import VQGANDetokenizer, VQGANTokenizer, vqgan_detokenize, vqgan_tokenize
    from .images import ImageDecodeError, load_image
    from .modeling import VQModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vqgan_datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
