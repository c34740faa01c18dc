"""The quantizer kinds of the tokenizer families: which codebook row each latent vector takes.

- "l2": the nearest code in squared Euclidean distance (taming, MaskGIT);
- "cosine": z and the codes L2-normalised first, then the nearest code (LlamaGen), whose
  decoder reads the normalised codes;
- "dot": the code with the largest dot product z·e (IBQ's index propagation at inference).

Each kind is exact per backend (`layers.per_backend`): on CPU one float32 matmul at "highest";
on GPU/TPU a bfloat16 matmul ranks candidates that are then rescored exactly in float32. Ties go
to the lowest index.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import layers
from .layers import Dtype

KINDS = ("l2", "cosine", "dot")

# Candidates rescored exactly per position on accelerators (XLA's GPU TopK kernel takes k <= 16).
# The bfloat16 pass ranks the true nearest code first for all but a few % of positions (2.4% on
# a trained model's latents of real photos) and never below third in what we measured, so 8
# leaves a wide margin.
_CANDIDATES = 8
# F.normalize's epsilon: a zero vector stays zero instead of dividing by zero.
_NORM_EPS = 1e-12


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown quantizer kind {kind!r}; expected one of {KINDS}")


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(|x|, 1e-12) along the last axis, in float32 (PyTorch's F.normalize)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


def nearest_codes(z: jax.Array, codebook: jax.Array, kind: str = "l2") -> jax.Array:
    """The code index for each row of z [N,D] against codebook [K,D], int32 [N].

    The exact float32 result on every backend (ties to the lowest index): on CPU by
    `nearest_codes_exact`, on GPU/TPU by `nearest_codes_rescored` at the cost of a bfloat16 matmul.
    """
    _check_kind(kind)
    return layers.per_backend(functools.partial(nearest_codes_exact, kind=kind),
                       functools.partial(nearest_codes_rescored, kind=kind), z, codebook)


def nearest_codes_exact(z: jax.Array, codebook: jax.Array, kind: str = "l2") -> jax.Array:
    """One [N,D]×[D,K] float32 matmul at "highest", in the reference's own form: argmin of
    |z|²+|e|²−2z·e ("l2"; "cosine" on normalised z and e), argmax of z·e ("dot").

    Near-ties flip under TF32/bfloat16, hence "highest"; on CPU that is native float32 anyway.
    """
    _check_kind(kind)
    z, codebook = _prepared(z, codebook, kind)
    dots = jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    if kind == "dot":
        return jnp.argmax(dots, axis=1).astype(jnp.int32)
    distance = (
        jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)[None, :] - 2 * dots
    )
    return jnp.argmin(distance, axis=1).astype(jnp.int32)


def nearest_codes_rescored(z: jax.Array, codebook: jax.Array, kind: str = "l2",
                           candidates: int = _CANDIDATES) -> jax.Array:
    """The exact code at the cost of a bfloat16 matmul (for GPU/TPU).

    A bfloat16 pass (float32 accumulation) ranks the codes by z·e - |e|²/2 ("l2", "cosine") or
    z·e ("dot"); the best `candidates` per row are rescored in float32 elementwise (|z - e|², no
    cancellation; or the dot product), and the best wins, ties to the lowest index. Only a code
    that the fast pass ranks below `candidates` others can be missed, which needs that many codes
    within the fast pass's error (~2^-8 |z||e|) of the best one.
    """
    _check_kind(kind)
    z, codebook = _prepared(z, codebook, kind)
    size = codebook.shape[0]
    scores = jnp.dot(z.astype(jnp.bfloat16), codebook.astype(jnp.bfloat16).T,
                     preferred_element_type=jnp.float32)
    if kind != "dot":
        scores = scores - 0.5 * jnp.sum(jnp.square(codebook), axis=1)
    _, chosen = jax.lax.top_k(scores, min(candidates, size))  # [N,k]
    picked = codebook[chosen]  # [N,k,D]
    if kind == "dot":
        cost = -jnp.sum(z[:, None, :] * picked, axis=-1)
    else:
        cost = jnp.sum(jnp.square(z[:, None, :] - picked), axis=-1)
    best = jnp.min(cost, axis=1, keepdims=True)
    return jnp.min(jnp.where(cost == best, chosen, size), axis=1).astype(jnp.int32)


def _prepared(z: jax.Array, codebook: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    if kind == "cosine":
        return l2_normalize(z), l2_normalize(codebook)
    return z.astype(jnp.float32), codebook.astype(jnp.float32)


class VectorQuantizer(nn.Module):
    """A codebook quantizer of one kind; `embedding/embedding` is the [codebook_size, embed_dim]
    codebook as the checkpoint stores it ("cosine" normalises it when used, as LlamaGen does)."""

    codebook_size: int
    embed_dim: int
    kind: str = "l2"

    def setup(self) -> None:
        _check_kind(self.kind)
        self.embedding = nn.Embed(
            self.codebook_size,
            self.embed_dim,
            embedding_init=_uniform_init(1.0 / self.codebook_size),
        )

    def codes(self) -> jax.Array:
        """The code vectors the decoder reads, float32 [K,D] (normalised for "cosine")."""
        table = self.embedding.embedding
        return l2_normalize(table) if self.kind == "cosine" else table.astype(jnp.float32)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z [B,h,w,D] → (quantized [B,h,w,D] float32, indices [B,h*w] int32, raster order)."""
        batch = z.shape[0]
        indices = nearest_codes(z.reshape(-1, self.embed_dim), self.embedding.embedding, self.kind)
        quantized = self.codes()[indices].reshape(z.shape[:-1] + (self.embed_dim,))
        return quantized, indices.reshape(batch, -1)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [B,N] → code vectors [B,N,D]; out-of-range ids give NaN (validate first)."""
        # take() wraps negative ids (numpy indexing): send them past the end, where it fills.
        indices = jnp.where(indices < 0, self.codebook_size, indices)
        return jnp.take(self.codes(), indices, axis=0, mode="fill", fill_value=jnp.nan)


def _uniform_init(limit: float):
    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init
