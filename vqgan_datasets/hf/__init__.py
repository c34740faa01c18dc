"""Hugging Face `datasets` adapters: images → token columns and back, with stable fingerprints.

    ds = ds.map(vqgan_tokenize, batched=True)          # image column → fixed-length uint16 tokens
    ds = write_metadata(ds, vqgan_tokenize.spec)       # or: ds = vqgan_tokenize.apply(ds)
    images = ds.with_transform(VQGANDetokenizer.from_dataset(ds))   # tokens → PIL, lazily

Settings are one `options.EncodeOptions` (`options=`, or its fields as keywords); models are
`handle.ModelHandle`s. This module is the public face; the work is done in layers, each using
only those before it: `hf_arrow` (batch kinds, Arrow in and out: every reliance on `datasets`
internals), `hf_hub` (the recorded metadata, dataset cards, Hub files), `hf_model` (the default
model, loading it where JAX can run), `hf_tokenize` (`VQGANTokenizer`), `hf_detokenize`
(`VQGANDetokenizer`).
"""

from __future__ import annotations

from .arrow import KEY_COLUMNS
from .detokenize import VQGANDetokenizer
from .hub import (
    RecordNotFound,
    read_column_metadata,
    read_metadata,
    update_dataset_card,
    write_hub_files,
    write_metadata,
)
from .model import DEFAULT_MODEL
from .tokenize import MapStats, VQGANTokenizer

__all__ = [
    "DEFAULT_MODEL",
    "KEY_COLUMNS",
    "MapStats",
    "RecordNotFound",
    "VQGANDetokenizer",
    "VQGANTokenizer",
    "read_column_metadata",
    "read_metadata",
    "update_dataset_card",
    "vqgan_detokenize",
    "vqgan_tokenize",
    "write_hub_files",
    "write_metadata",
]

# Old private name, still imported by jobs.py: use hf_hub.read_column_metadata.
_read_column_metadata = read_column_metadata

# Ready instances for the default checkpoint: nothing is resolved or loaded until first use.
vqgan_tokenize = VQGANTokenizer()
vqgan_detokenize = VQGANDetokenizer()
