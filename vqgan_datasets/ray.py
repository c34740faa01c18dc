"""Ray Data: `vqgan_datasets.ray.tokenize` (shards across a cluster) and `RayTokenizer`
(for `Dataset.map_batches`). The implementation lives in `jobs/ray.py`."""

from __future__ import annotations

from .jobs.ray import RayTokenizer, tokenize

__all__ = ["RayTokenizer", "tokenize"]
