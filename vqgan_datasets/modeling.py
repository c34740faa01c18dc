"""The VQGAN of taming-transformers in Flax: leaf modules, Encoder/Decoder/VectorQuantizer, VQGAN.

Parameter names follow vqgan-jax's tree exactly (`encoder/down_0/block_0/norm1/scale`, ...), so
its `flax_model.msgpack` files load unchanged. Layout is NHWC. Pixel values go in and come out in
the checkpoint's own range (no hidden scaling); `VQModel`'s uint8 helpers apply the range.

Three layers have one formulation per backend, picked while lowering in `_per_backend` (a CPU
program holds only the CPU branch, a GPU/TPU program only the accelerator branch): GroupNorm
(CPU: two-pass statistics with the preceding conv's bias folded in; accelerators: one pass,
output in the compute dtype), nearest-neighbour upsampling (CPU: phase kernels; accelerators:
nearest x2 then the 3x3 conv) and the quantizer (CPU: one float32 matmul at "highest";
accelerators: a bfloat16 pass for candidates, then exact float32 rescoring).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import VQGANConfig

Dtype = Any

# taming's Normalize: GroupNorm(32, eps=1e-6, affine). The two-pass variance matches PyTorch's
# to ~1e-6 on offset activations; the fast E[x²]-E[x]² variant drifts by ~1e-5 (see NOTES.md).
_GROUP_NORM_EPS = 1e-6
# Quantizer candidates rescored exactly per position on accelerators (XLA's GPU TopK kernel
# takes k <= 16). The bfloat16 pass ranks the true nearest code first for all but a few % of
# positions (2.4% on a trained model's latents of real photos) and never below third in what we
# measured, so 8 leaves a wide margin (BENCHMARKS.md).
_CANDIDATES = 8


def _per_backend(cpu: Callable[..., Any], accelerator: Callable[..., Any], *args: Any) -> Any:
    """`cpu(*args)` in programs lowered for CPU, `accelerator(*args)` for GPU/TPU.

    The one place where the formulation depends on the backend. The choice is made while
    lowering (`platform_dependent`), so each compiled program holds one branch only, and jit,
    pmap, grad and `jax.export` for another platform all see the right one.
    """
    return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)


def _conv_params(module: nn.Module, in_features: int, features: int, size: int):
    """Declare `kernel` [size,size,in,out] and `bias` [out] as nn.Conv does (same initialisers,
    same order, hence the same random init for a given seed)."""
    shape = (size, size, in_features, features)
    kernel = module.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
    bias = module.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32)
    return kernel, bias


class Conv(nn.Module):
    """`nn.Conv` with the same parameters (`kernel` HWIO, `bias`), initialisers and result.

    `add_bias=False` returns `(y, bias)` instead of `y + bias`, so that a GroupNorm reading y
    can fold the bias in (`GroupNorm(offset=bias)`) rather than have y + bias written out.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: Any = None  # default: "same" for odd kernels, as ((k//2, k//2),) * 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, add_bias: bool = True):
        size = self.kernel_size
        kernel, bias = _conv_params(self, x.shape[-1], self.features, size)
        padding = self.padding if self.padding is not None else ((size // 2, size // 2),) * 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if not add_bias:
            return y, bias
        return y + bias.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, pad: Any = None):
    return Conv(features, kernel, stride=stride, padding=pad, dtype=dtype, name=name)


def group_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, offset: jax.Array | None = None,
                   *, num_groups: int, epsilon: float, dtype: Dtype) -> jax.Array:
    """GroupNorm of `x + offset` for CPU: float32 two-pass moments, `offset` folded in.

    Per-channel two-pass moments merged into group moments (Chan et al.), reducing over the
    spatial axes with C contiguous: as accurate as PyTorch's GroupNorm against a float64
    reference and ~1.5x faster on CPU than a [B,H*W,G,C/G] reduction. `offset` [C] (a preceding
    conv's bias) shifts the channel means and leaves the centred moments alone, so x + offset is
    never written out.
    """
    batch, channels = x.shape[0], x.shape[-1]
    per_group = channels // num_groups
    axes = tuple(range(1, x.ndim - 1))
    expand = (slice(None),) + (None,) * len(axes) + (slice(None),)  # [B,C] → [B,1..,C]
    x = x.astype(jnp.float32)
    count = math.prod(x.shape[a] for a in axes)
    mean_c = jnp.mean(x, axis=axes)  # [B,C], of x (without offset)
    m2_c = jnp.sum(jnp.square(x - mean_c[expand]), axis=axes)  # [B,C]
    if offset is not None:
        offset = offset.astype(jnp.float32)
        mean_c = mean_c + offset
    grouped = mean_c.reshape(batch, num_groups, per_group)
    mean_g = jnp.mean(grouped, axis=-1)  # [B,G]
    spread = jnp.sum(jnp.square(grouped - mean_g[..., None]), axis=-1)
    var_g = (m2_c.reshape(grouped.shape).sum(-1) + count * spread) / (count * per_group)
    gain = jnp.repeat(jax.lax.rsqrt(var_g + epsilon), per_group, axis=1) * scale  # [B,C]
    shift = bias - jnp.repeat(mean_g, per_group, axis=1) * gain
    if offset is not None:
        shift = shift + offset * gain
    return (x * gain[expand] + shift[expand]).astype(dtype)


def group_norm_accelerator(x: jax.Array, scale: jax.Array, bias: jax.Array,
                           offset: jax.Array | None = None, *, num_groups: int, epsilon: float,
                           dtype: Dtype) -> jax.Array:
    """GroupNorm of `x + offset` for GPU/TPU: one read of x, output in the compute dtype.

    `offset` is added in x's dtype first (as the seed's conv adds its bias; XLA can fuse it with
    the conv). Sums of x - s and (x - s)² in one pass, float32, with s the group's mean at the
    first position: shifting by a value near the mean keeps E[x²]-E[x]² from cancelling on
    offset activations (as accurate as `group_norm_cpu` against float64, tests/test_modeling.py).
    """
    if offset is not None:
        x = x + offset.astype(x.dtype)
    batch, channels = x.shape[0], x.shape[-1]
    per_group = channels // num_groups
    flat = x.astype(jnp.float32).reshape(batch, -1, channels)  # [B,HW,C], C contiguous

    def per_channel_to_group(values: jax.Array) -> jax.Array:  # [B,C] → [B,C/G summed]
        return values.reshape(batch, num_groups, per_group).sum(-1)

    def group_to_channel(values: jax.Array) -> jax.Array:  # [B,G] → [B,C]
        return jnp.repeat(values, per_group, axis=1)

    shift = per_channel_to_group(flat[:, 0]) / per_group  # [B,G]
    centred = flat - group_to_channel(shift)[:, None, :]
    count = flat.shape[1] * per_group
    # Two column reductions over H·W that XLA fuses into one read of x, then tiny group sums.
    mean_shifted = per_channel_to_group(jnp.sum(centred, axis=1)) / count  # [B,G]
    var = jnp.maximum(per_channel_to_group(jnp.sum(jnp.square(centred), axis=1)) / count
                      - jnp.square(mean_shifted), 0.0)
    gain = group_to_channel(jax.lax.rsqrt(var + epsilon)) * scale  # [B,C]
    out_shift = bias - group_to_channel(shift + mean_shifted) * gain
    out = flat * gain[:, None, :] + out_shift[:, None, :]
    return out.astype(dtype).reshape(x.shape)


class GroupNorm(nn.Module):
    """taming's Normalize: GroupNorm with affine `scale`/`bias` [C] (Flax GroupNorm's names).

    Statistics in float32 whatever the compute dtype; returns the compute dtype. `offset` [C]
    normalises x + offset (a preceding conv's bias). Formulation per backend: `group_norm_cpu`
    or `group_norm_accelerator`.
    """

    num_groups: int = 32
    epsilon: float = _GROUP_NORM_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        static = dict(num_groups=self.num_groups, epsilon=self.epsilon, dtype=self.dtype)
        args = (x, scale, bias) if offset is None else (x, scale, bias, offset)
        return _per_backend(functools.partial(group_norm_cpu, **static),
                            functools.partial(group_norm_accelerator, **static), *args)


def _norm(name: str, groups: int, dtype: Dtype) -> GroupNorm:
    return GroupNorm(num_groups=groups, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → dropout → conv, plus a 1×1 (or 3×3) shortcut."""

    out_channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    use_conv_shortcut: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = nn.swish(_norm("norm1", self.norm_groups, self.dtype)(x))
        h, conv1_bias = _conv(self.out_channels, 3, "conv1", self.dtype)(h, add_bias=False)
        h = nn.swish(_norm("norm2", self.norm_groups, self.dtype)(h, offset=conv1_bias))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            if self.use_conv_shortcut:
                x = _conv(self.out_channels, 3, "conv_shortcut", self.dtype)(x)
            else:
                x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h×w positions, scale C^-1/2, with a residual."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _norm("norm", self.norm_groups, self.dtype)(x)
        q = _conv(channels, 1, "q", self.dtype)(h).reshape(batch, height * width, channels)
        k = _conv(channels, 1, "k", self.dtype)(h).reshape(batch, height * width, channels)
        v = _conv(channels, 1, "v", self.dtype)(h).reshape(batch, height * width, channels)
        scores = jnp.einsum("bqc,bkc->bqk", q, k) * (channels**-0.5)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
        return x.astype(self.dtype) + _conv(channels, 1, "proj_out", self.dtype)(h)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3×3 stride-2 valid conv (or 2×2 average pooling)."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, pad="VALID")(x)


class ConvWeights(nn.Module):
    """The `kernel` (HWIO) and `bias` of an `nn.Conv`, same names, shapes and initialisers,
    for layers that use their weights in another form."""

    features: int
    kernel_size: int
    in_features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return _conv_params(self, self.in_features, self.features, self.kernel_size)


def _phase_kernels(kernel: jax.Array) -> jax.Array:
    """A 3×3 kernel applied after nearest ×2 upsampling, as four 2×2 kernels on the input.

    Output row 2i reads input rows (i-1, i, i) through kernel rows (0, 1, 2), so its 2-tap kernel
    is (k0, k1+k2); row 2i+1 reads (i, i, i+1): (k0+k1, k2). Same for columns. Returns [2,2,I,4·O],
    phases (row, col) = (0,0), (0,1), (1,0), (1,1) along the output axis.
    """
    k = kernel.astype(jnp.float32)
    rows = (jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]]))
    phases = [
        jnp.stack(cols, axis=1)
        for r in rows
        for cols in ((r[:, 0], r[:, 1] + r[:, 2]), (r[:, 0] + r[:, 1], r[:, 2]))
    ]
    return jnp.concatenate(phases, axis=-1)


def _nearest_x2(x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


def upsample_cpu(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, dtype: Dtype) -> jax.Array:
    """Nearest ×2 then a 3×3 conv, for CPU, without materialising the upsampled map.

    One 2×2 conv on the input (padded by one) gives all four output phases (`_phase_kernels`),
    4/9 of the multiply-adds of the 3×3 conv at the doubled resolution; then the phases are
    interleaved. Equal to upsample-then-conv up to float rounding (kernel taps summed first).
    """
    batch, height, width, channels = x.shape
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        _phase_kernels(kernel).astype(dtype),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # [B,H+1,W+1,4·C]: phase (a,b) of output (2i+a, 2j+b) sits at (i+a, j+b)
    phases = [
        y[:, a : a + height, b : b + width, p * channels : (p + 1) * channels]
        for p, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))
    ]
    y = jnp.stack(phases, axis=3).reshape(batch, height, width, 2, 2, channels)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, channels)
    return y + bias.astype(dtype)


def upsample_accelerator(x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                         dtype: Dtype) -> jax.Array:
    """Nearest ×2 then a 3×3 "same" conv, as taming and the seed's Flax modules write it.

    The phase form saves multiply-adds, which bound CPUs, but adds an interleaving pass over
    memory; on GPUs this is the seed's form at the seed's speed (benchmarks/gpu_check.py).
    """
    y = jax.lax.conv_general_dilated(
        _nearest_x2(x.astype(dtype)),
        kernel.astype(dtype),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(dtype)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv (`conv/kernel`, `conv/bias`, as taming's).

    Formulation per backend: `upsample_cpu` (phase kernels) or `upsample_accelerator`.
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return _nearest_x2(x)
        channels = x.shape[-1]
        kernel, bias = ConvWeights(channels, 3, channels, name="conv")()
        return _per_backend(functools.partial(upsample_cpu, dtype=self.dtype),
                            functools.partial(upsample_accelerator, dtype=self.dtype),
                            x, kernel, bias)


class Level(nn.Module):
    """One resolution level: res blocks, each followed by its attention block when the level has
    attention (taming's order: attn[i] after block[i]), then an optional resampler."""

    out_channels: int
    num_blocks: int
    with_attention: bool
    resample: str | None  # "down", "up" or None
    resamp_with_conv: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.num_blocks):
            x = ResnetBlock(
                self.out_channels, self.norm_groups, self.dropout, dtype=self.dtype,
                name=f"block_{i}",
            )(x, deterministic)
            if self.with_attention:
                x = AttnBlock(self.norm_groups, self.dtype, name=f"attn_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.resamp_with_conv, self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.resamp_with_conv, self.dtype, name="upsample")(x)
        return x


class MidBlock(nn.Module):
    """block_1 → attn_1 → block_2 at the lowest resolution."""

    channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block = functools.partial(ResnetBlock, self.channels, self.norm_groups, self.dropout,
                                  dtype=self.dtype)
        x = block(name="block_1")(x, deterministic)
        x = AttnBlock(self.norm_groups, self.dtype, name="attn_1")(x)
        return block(name="block_2")(x, deterministic)


class Encoder(nn.Module):
    """Pixels [B,H,W,in] → latents [B,H/f,W/f,z] (2z channels when `double_z`)."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    double_z: bool = False
    resamp_with_conv: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = _conv(self.channels, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        # Attention placement follows the configured resolution, as in taming (not the input size).
        res = self.resolution
        last = len(self.channel_multipliers) - 1
        for i, mult in enumerate(self.channel_multipliers):
            x = Level(
                self.channels * mult, self.num_res_blocks, res in self.attn_resolutions,
                "down" if i != last else None, self.resamp_with_conv, self.norm_groups,
                self.dropout, self.dtype, name=f"down_{i}",
            )(x, deterministic)
            if i != last:
                res //= 2
        x = MidBlock(x.shape[-1], self.norm_groups, self.dropout, self.dtype, name="mid")(
            x, deterministic
        )
        x = nn.swish(_norm("norm_out", self.norm_groups, self.dtype)(x))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv(out, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """Latents [B,h,w,z] → pixels [B,h*f,w*f,out]."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    out_channels: int = 3
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        levels = len(self.channel_multipliers)
        width = self.channels * self.channel_multipliers[-1]
        res = self.resolution // 2 ** (levels - 1)
        x = _conv(width, 3, "conv_in", self.dtype)(z.astype(self.dtype))
        x = MidBlock(width, self.norm_groups, self.dropout, self.dtype, name="mid")(
            x, deterministic
        )
        for i in reversed(range(levels)):
            x = Level(
                self.channels * self.channel_multipliers[i], self.num_res_blocks + 1,
                res in self.attn_resolutions, "up" if i != 0 else None, self.resamp_with_conv,
                self.norm_groups, self.dropout, self.dtype, name=f"up_{i}",
            )(x, deterministic)
            if i != 0:
                res *= 2
        if self.give_pre_end:
            return x
        x = nn.swish(_norm("norm_out", self.norm_groups, self.dtype)(x))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared Euclidean) for each row of z [N,D], int32 [N].

    The exact float32 argmin on every backend (ties to the lowest index, as argmin): on CPU by
    `nearest_codes_exact`, on GPU/TPU by `nearest_codes_rescored` at the cost of a bfloat16
    matmul.
    """
    return _per_backend(nearest_codes_exact, nearest_codes_rescored, z, codebook)


def nearest_codes_exact(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin |z|²+|e|²−2z·e (taming's form), one [N,D]×[D,K] float32 matmul at "highest".

    Near-ties flip under TF32/bfloat16, hence "highest"; on CPU that is native float32 anyway.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dots = jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distance = (
        jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)[None, :] - 2 * dots
    )
    return jnp.argmin(distance, axis=1).astype(jnp.int32)


def nearest_codes_rescored(z: jax.Array, codebook: jax.Array,
                           candidates: int = _CANDIDATES) -> jax.Array:
    """The exact nearest code at the cost of a bfloat16 matmul (for GPU/TPU).

    z·e - |e|²/2 from bfloat16 inputs (float32 accumulation) ranks the codes; the best
    `candidates` per row are rescored with exact float32 squared distances |z - e|² (elementwise,
    no cancellation), and the smallest wins, ties to the lowest index. Only a code that the fast
    pass ranks below `candidates` others can be missed, which needs that many codes within the
    fast pass's error (~2^-8 |z||e|) of the nearest one.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    size = codebook.shape[0]
    half_norms = 0.5 * jnp.sum(jnp.square(codebook), axis=1)
    scores = jnp.dot(z.astype(jnp.bfloat16), codebook.astype(jnp.bfloat16).T,
                     preferred_element_type=jnp.float32) - half_norms
    _, chosen = jax.lax.top_k(scores, min(candidates, size))  # [N,k]
    distance = jnp.sum(jnp.square(z[:, None, :] - codebook[chosen]), axis=-1)  # [N,k]
    best = jnp.min(distance, axis=1, keepdims=True)
    return jnp.min(jnp.where(distance == best, chosen, size), axis=1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer; `embedding/embedding` is the [n_embed, embed_dim] codebook."""

    codebook_size: int
    embed_dim: int

    def setup(self) -> None:
        self.embedding = nn.Embed(
            self.codebook_size,
            self.embed_dim,
            embedding_init=_uniform_init(1.0 / self.codebook_size),
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z [B,h,w,D] → (quantized [B,h,w,D] float32, indices [B,h*w] int32, raster order)."""
        batch = z.shape[0]
        indices = nearest_codes(z.reshape(-1, self.embed_dim), self.embedding.embedding)
        quantized = self.embedding.embedding[indices].reshape(z.shape[:-1] + (self.embed_dim,))
        return quantized, indices.reshape(batch, -1)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """indices [B,N] → codebook rows [B,N,D]; out-of-range ids give NaN (validate first)."""
        return jnp.take(self.embedding.embedding, indices, axis=0, mode="fill", fill_value=jnp.nan)


def _uniform_init(limit: float):
    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


class VQGAN(nn.Module):
    """Encoder → quant_conv → quantizer, and post_quant_conv → Decoder (taming's VQModel)."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    embed_dim: int
    codebook_size: int
    in_channels: int = 3
    out_channels: int = 3
    double_z: bool = False
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        shared = dict(
            channels=self.channels,
            channel_multipliers=tuple(self.channel_multipliers),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            resolution=self.resolution,
            resamp_with_conv=self.resamp_with_conv,
            norm_groups=self.norm_groups,
            dropout=self.dropout,
            dtype=self.dtype,
        )
        self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **shared)
        self.decoder = Decoder(
            out_channels=self.out_channels, give_pre_end=self.give_pre_end, **shared
        )
        self.quant_conv = _conv(self.embed_dim, 1, None, self.dtype)
        self.post_quant_conv = _conv(self.z_channels, 1, None, self.dtype)
        self.quantize = VectorQuantizer(self.codebook_size, self.embed_dim)

    def encode(self, pixels: jax.Array, deterministic: bool = True):
        """pixels [B,H,W,C] in the model's range → (quantized [B,h,w,D], indices [B,h*w])."""
        z = self.quant_conv(self.encoder(pixels, deterministic))
        return self.quantize(z)

    def encode_latents(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
        """pixels → pre-quantization latents [B,h,w,D] (what the quantizer sees)."""
        return self.quant_conv(self.encoder(pixels, deterministic)).astype(jnp.float32)

    def decode(self, quantized: jax.Array, deterministic: bool = True) -> jax.Array:
        """quantized latents [B,h,w,D] → pixels [B,H,W,C] in the model's range, float32."""
        out = self.decoder(self.post_quant_conv(quantized.astype(self.dtype)), deterministic)
        return out.astype(jnp.float32)

    def decode_code(self, indices: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """indices [B,h*w] (raster order) → pixels; a square grid unless `grid` says otherwise."""
        batch, length = indices.shape
        if grid is None:
            side = int(round(length**0.5))
            if side * side != length:
                raise ValueError(f"{length} tokens are not a square grid; pass grid=(h, w)")
            grid = (side, side)
        quantized = self.quantize.lookup(indices).reshape(batch, *grid, self.embed_dim)
        return self.decode(quantized)

    def __call__(self, pixels: jax.Array, deterministic: bool = True):
        """Reconstruction: (pixels', quantized, latents, indices); used by training and init."""
        z = self.quant_conv(self.encoder(pixels, deterministic)).astype(jnp.float32)
        quantized, indices = self.quantize(z)
        # Straight-through estimator: the decoder sees the codes, the encoder gets its gradient.
        passed = z + jax.lax.stop_gradient(quantized - z)
        return self.decode(passed, deterministic), quantized, z, indices


def module_from_config(config: VQGANConfig, dtype: Dtype = jnp.float32) -> VQGAN:
    """The Flax module for a config; the one place config fields become module fields."""
    return VQGAN(
        channels=config.ch,
        channel_multipliers=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=tuple(config.attn_resolutions),
        resolution=config.resolution,
        z_channels=config.z_channels,
        embed_dim=config.embed_dim,
        codebook_size=config.n_embed,
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        double_z=config.double_z,
        resamp_with_conv=config.resamp_with_conv,
        give_pre_end=config.give_pre_end,
        norm_groups=config.norm_groups,
        dropout=config.dropout,
        dtype=dtype,
    )


def init_params(config: VQGANConfig, seed: int = 0) -> dict:
    """Random parameters in vqgan-jax's tree layout (numpy float32, deterministic per seed).

    Shapes come from an abstract trace; values are drawn leaf by leaf with numpy (conv kernels
    LeCun-normal, biases 0, norm scales 1, codebook uniform ±1/n_embed), which avoids compiling
    the whole network just to initialise it (seconds per tiny model in the tests).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = path[-1].key
        shape = tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "embedding":
            limit = 1.0 / shape[0]
            return rng.uniform(-limit, limit, shape).astype(np.float32)
        return np.zeros(shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


def param_shapes(config: VQGANConfig) -> dict:
    """The expected parameter tree as ShapeDtypeStructs, without allocating anything."""
    module = module_from_config(config)
    size = config.resolution
    pixels = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
    return dict(shapes["params"])


# ---------------------------------------------------------------------------------------------
# VQModel: the drop-in for vqgan-jax's VQModel (parameters, jitted methods, checkpoint I/O).


def to_model_range(images: jax.Array, value_range: tuple[float, float]) -> jax.Array:
    """uint8 pixels → float32 in the checkpoint's range (x/127.5 - 1 for [-1, 1], as taming)."""
    low, high = value_range
    return images.astype(jnp.float32) / (255.0 / (high - low)) + low


def to_uint8(pixels: jax.Array, value_range: tuple[float, float]) -> jax.Array:
    """Model-range floats → uint8, clipped and rounded."""
    low, high = value_range
    unit = jnp.clip((pixels.astype(jnp.float32) - low) / (high - low), 0.0, 1.0)
    return jnp.round(unit * 255.0).astype(jnp.uint8)


def encode_uint8(module: VQGAN, value_range, params, images: jax.Array) -> jax.Array:
    """uint8 [B,H,W,C] → int32 codes [B,h*w]: scaling and encoding in one device program."""
    _, indices = module.apply({"params": params}, to_model_range(images, value_range),
                              method=VQGAN.encode)
    return indices


def decode_uint8(module: VQGAN, value_range, grid, params, codes: jax.Array) -> jax.Array:
    """int codes [B,h*w] → uint8 [B,H,W,C]."""
    pixels = module.apply({"params": params}, codes.astype(jnp.int32), grid,
                          method=VQGAN.decode_code)
    return to_uint8(pixels, value_range)


class VQModel:
    """A VQGAN with its parameters: `from_pretrained`, `encode`, `decode`, `decode_code`.

    Same calls as vqgan-jax's `VQModel` (the seed's scripts work with only the import changed);
    methods accept `params=` for use inside the caller's own jit/pmap. `encode_images` and
    `decode_images` are the uint8-in/uint8-out helpers that apply `config.value_range`.
    """

    def __init__(
        self,
        config: VQGANConfig,
        params: dict | None = None,
        *,
        dtype: Dtype = jnp.float32,
        seed: int = 0,
        source: Any = None,
    ) -> None:
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.module = module_from_config(config, self.dtype)
        self.params = params if params is not None else init_params(config, seed)
        self.source = source  # checkpoints.CheckpointSource, or None for in-memory weights
        self._digest: str | None = source.weights_digest if source is not None else None
        self._encode = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=VQGAN.encode))
        self._decode = jax.jit(lambda p, z: self.module.apply({"params": p}, z, method=VQGAN.decode))
        self._decode_code = jax.jit(
            lambda p, c: self.module.apply({"params": p}, c, method=VQGAN.decode_code)
        )
        self._encode_images = jax.jit(functools.partial(encode_uint8, self.module,
                                                        config.value_range))
        self._decode_images: dict[tuple[int, int] | None, Any] = {}
        self._warned_pixels = False  # encode's out-of-range warning, once per model
        self._checked_values = False

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        dtype: Dtype = jnp.float32,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        value_range: tuple[float, float] | None = None,
        _do_init: bool = True,
        **unused: Any,
    ) -> VQModel | tuple[VQModel, dict]:
        """Load a Hub repo id (e.g. "flax-community/vqgan_f16_16384") or a local directory.

        `_do_init=False` returns `(model, params)` as vqgan-jax/transformers do.
        """
        from . import checkpoints

        if unused:
            import logging

            logging.getLogger(__name__).debug("ignoring from_pretrained arguments %s", sorted(unused))
        directory, commit = checkpoints.resolve(
            name_or_path, revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only,
        )
        config = checkpoints.load_config(directory, name=str(name_or_path))
        if value_range is not None:
            config = config.replace(value_range=tuple(value_range))
        file = checkpoints.weights_file(directory)
        params = checkpoints.read_params(file, config)
        source = checkpoints.CheckpointSource(
            name=str(name_or_path),
            revision=commit,
            weights_file=str(file.resolve()),
            weights_digest=checkpoints.file_digest(file),
        )
        model = cls(config, params, dtype=dtype, source=source)
        return (model, model.params) if not _do_init else model

    def save_pretrained(self, save_directory: str, params: dict | None = None, *,
                        formats: tuple[str, ...] = ("safetensors", "msgpack")) -> None:
        """Write config.json, model.safetensors and flax_model.msgpack (vqgan-jax reads the latter)."""
        from . import checkpoints

        checkpoints.save(save_directory, self.config, params if params is not None else self.params,
                         formats=formats)

    @property
    def weights_digest(self) -> str:
        """A content hash of the weights, computed once (from the file when loaded from one)."""
        if self._digest is None:
            from .checkpoints import params_digest

            self._digest = params_digest(self.params)
        return self._digest

    @property
    def name(self) -> str | None:
        return self.source.name if self.source is not None else None

    @property
    def revision(self) -> str | None:
        return self.source.revision if self.source is not None else None

    # -- vqgan-jax's surface ----------------------------------------------------------------

    def encode(self, pixel_values, params: dict | None = None, dropout_rng=None, train: bool = False):
        """pixel_values [B,H,W,C] in the model's range → (quant_states [B,h,w,D], indices [B,h*w]).

        Scales nothing (as vqgan-jax): integer pixels, or floats far outside `config.value_range`,
        get one warning per model that points to `encode_images`.
        """
        if not self._warned_pixels:
            self._check_pixels(pixel_values)
        return self._encode(self._params(params), jnp.asarray(pixel_values))

    def decode(self, hidden_states, params: dict | None = None, dropout_rng=None,
               train: bool = False):
        """quant_states [B,h,w,D] → pixels [B,H,W,C] in the model's range."""
        return self._decode(self._params(params), jnp.asarray(hidden_states))

    def decode_code(self, indices, params: dict | None = None):
        """Token ids [B,h*w] (raster order) → pixels in the model's range.

        Ids outside [0, n_embed) raise, naming the first bad position. Under a caller's own
        jit/pmap the ids are not concrete; there the bad rows decode to NaN instead.
        """
        if not isinstance(indices, jax.core.Tracer):
            check_codes(indices, self.config.n_embed)
        return self._decode_code(self._params(params), jnp.asarray(indices))

    def __call__(self, pixel_values, params: dict | None = None):
        quant, _ = self.encode(pixel_values, params)
        return self.decode(quant, params)

    # -- uint8 helpers --------------------------------------------------------------------------

    def encode_images(self, images) -> np.ndarray:
        """uint8 images [B,H,W,3] → int32 codes [B,h*w], with `config.value_range` applied."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"encode_images expects uint8 [B,H,W,C], got {images.dtype} "
                             f"{images.shape}; see vqgan_datasets.images.load_image")
        return np.asarray(self._encode_images(self.params, images))

    def decode_images(self, codes, grid: tuple[int, int] | None = None) -> np.ndarray:
        """Token ids [B,h*w] → uint8 images [B,H,W,3], with `config.value_range` applied."""
        codes = np.asarray(codes)
        check_codes(codes, self.config.n_embed)
        fn = self._decode_images.get(grid)
        if fn is None:  # one compiled program per grid, reused across calls
            fn = jax.jit(functools.partial(decode_uint8, self.module, self.config.value_range, grid))
            self._decode_images[grid] = fn
        return np.asarray(fn(self.params, codes.astype(np.int32, copy=False)))

    def _params(self, params: dict | None) -> dict:
        return self.params if params is None else params

    def _check_pixels(self, pixels: Any) -> None:
        """Warn (once per model) when `encode` gets what looks like uint8 images, not model-range
        floats. The dtype is checked on every call, tracers included; the values of numpy inputs
        on every call from a strided sample, those of a jax array on the first call only (reading
        them back waits for the device)."""
        first, self._checked_values = not self._checked_values, True
        problem = _pixel_problem(pixels, self.config.value_range, device_values=first)
        if problem is None:
            return
        self._warned_pixels = True
        low, high = self.config.value_range
        scaled = f"pixels / {255 / (high - low):g}" + (f" {'-' if low < 0 else '+'} {abs(low):g}"
                                                      if low else "")
        warnings.warn(
            f"VQModel.encode got {problem}, but this model expects float pixels in its value range "
            f"[{low:g}, {high:g}] (config.value_range) and scales nothing, as vqgan-jax did. For "
            f"uint8 images use encode_images(), which applies the range, or pass {scaled}.",
            UserWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        return (f"VQModel({self.name or 'in-memory'}, codebook={self.config.n_embed}, "
                f"f={self.config.downsample_factor}, dtype={self.dtype.name})")


_PIXEL_SAMPLE = 65_536  # values read per input to check its range


def _pixel_problem(pixels: Any, value_range: tuple[float, float], *,
                   device_values: bool) -> str | None:
    """What is wrong with `encode`'s input for a model of `value_range`, or None.

    Integer dtypes always; floats when a strided sample reaches beyond the range by more than its
    width (0-255 pixels for a [-1, 1] or [0, 1] model). Values of tracers are never read, those of
    jax arrays only if `device_values`.
    """
    dtype = getattr(pixels, "dtype", None)
    if dtype is None:  # lists and scalars
        pixels = np.asarray(pixels)
        dtype = pixels.dtype
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        return f"{jnp.dtype(dtype).name} pixels"
    if isinstance(pixels, jax.core.Tracer) or not jnp.issubdtype(dtype, jnp.floating):
        return None
    if isinstance(pixels, jax.Array) and not (device_values and pixels.is_fully_addressable):
        return None
    flat = pixels.reshape(-1)
    sample = np.asarray(flat[:: max(1, flat.size // _PIXEL_SAMPLE)], dtype=np.float32)
    sample = sample[~np.isnan(sample)]
    if sample.size == 0:
        return None
    low, high = value_range
    width = high - low
    seen_low, seen_high = float(sample.min()), float(sample.max())
    if seen_high > high + width or seen_low < low - width:
        return f"values from {seen_low:g} to {seen_high:g}"
    return None


def check_codes(codes: Any, codebook_size: int) -> None:
    """Raise ValueError naming the first token id outside [0, codebook_size)."""
    array = np.asarray(codes)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
    bad = (array < 0) | (array >= codebook_size)
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"token id {int(array[position])} at position {position} is outside "
            f"[0, {codebook_size}) ({int(bad.sum())} bad ids in all)"
        )
