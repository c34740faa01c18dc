"""Everything webdataset, in one public namespace: `from vqgan_datasets import wds as vqwds`.

- pipeline stages (stages.py): `encode(model)` / `decode(model)` for `DataPipeline(...)` and
  `WebDataset(...).compose(...)`, and the plain generators `encode_samples` / `decode_samples`;
- shard-to-shard jobs (shards.py, convert.py, manifest.py, storage.py): `tokenize_shards`,
  `convert_shard`, `read_shard`, `expand_urls`, `open_url`, `register_fsspec`, `Manifest`,
  `ShardReport`, `write_manifest`;
- the shared pieces (options.py): `EncodeOptions`, `SampleError`, `StageStats`.

This module only re-exports: it sits above the stages and the shard jobs (which never import
it), so the names keep their documented home without an import circle.
"""

from __future__ import annotations

from ..jobs.convert import ShardOptions, convert_shard
from ..jobs.manifest import Manifest, ShardReport, write_manifest
from ..jobs.shards import tokenize_shards
from ..options import EncodeOptions, SampleError, StageStats
from ..storage import ShardReadError, expand_urls, open_url, read_shard, register_fsspec
from ..streams import DEFAULT_IMAGE_KEY
from .stages import Stage, decode, decode_samples, encode, encode_samples

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "EncodeOptions",
    "Manifest",
    "SampleError",
    "ShardOptions",
    "ShardReadError",
    "ShardReport",
    "Stage",
    "StageStats",
    "convert_shard",
    "decode",
    "decode_samples",
    "encode",
    "encode_samples",
    "expand_urls",
    "open_url",
    "read_shard",
    "register_fsspec",
    "tokenize_shards",
    "write_manifest",
]
