"""The VQGAN's leaf building blocks in Flax, and the numerics that differ per backend.

Conv, GroupNorm, ResnetBlock, AttnBlock, Down-/Upsample, and the Level and MidBlock that stack
them, with vqgan-jax's parameter names (`norm1/scale`, `conv/kernel`, ...). `modeling` assembles
them into the Encoder, Decoder and VQGAN; the quantizer kinds live in `quantizers`.

Layers with one formulation per backend pick it while lowering in `per_backend` (a CPU program
holds only the CPU branch, a GPU/TPU program only the accelerator branch): GroupNorm (CPU:
two-pass statistics with the preceding conv's bias folded in; accelerators: one pass, output in
the compute dtype), nearest-neighbour upsampling (CPU: phase kernels; accelerators: nearest x2
then the 3x3 conv), and the quantizer (`quantizers`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# taming's Normalize: GroupNorm(32, eps=1e-6, affine). The two-pass variance matches PyTorch's
# to ~1e-6 on offset activations; the fast E[x²]-E[x]² variant drifts by ~1e-5 (see NOTES.md).
_GROUP_NORM_EPS = 1e-6


def per_backend(cpu: Callable[..., Any], accelerator: Callable[..., Any], *args: Any) -> Any:
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


def conv_layer(features: int, kernel: int, name: str | None, dtype: Dtype, stride: int = 1,
               pad: Any = None) -> Conv:
    """A `Conv` named as in vqgan-jax's tree (None: Flax's automatic name)."""
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
    offset activations (as accurate as `group_norm_cpu` against float64, tests/test_layers.py).
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
        return per_backend(functools.partial(group_norm_cpu, **static),
                            functools.partial(group_norm_accelerator, **static), *args)


def norm_layer(name: str, groups: int, dtype: Dtype) -> GroupNorm:
    """taming's Normalize under the parameter name `name`."""
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
        h = nn.swish(norm_layer("norm1", self.norm_groups, self.dtype)(x))
        h, conv1_bias = conv_layer(self.out_channels, 3, "conv1", self.dtype)(h, add_bias=False)
        h = nn.swish(norm_layer("norm2", self.norm_groups, self.dtype)(h, offset=conv1_bias))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv_layer(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            if self.use_conv_shortcut:
                x = conv_layer(self.out_channels, 3, "conv_shortcut", self.dtype)(x)
            else:
                x = conv_layer(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h×w positions, scale C^-1/2, with a residual."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = norm_layer("norm", self.norm_groups, self.dtype)(x)
        q = conv_layer(channels, 1, "q", self.dtype)(h).reshape(batch, height * width, channels)
        k = conv_layer(channels, 1, "k", self.dtype)(h).reshape(batch, height * width, channels)
        v = conv_layer(channels, 1, "v", self.dtype)(h).reshape(batch, height * width, channels)
        scores = jnp.einsum("bqc,bkc->bqk", q, k) * (channels**-0.5)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
        return x.astype(self.dtype) + conv_layer(channels, 1, "proj_out", self.dtype)(h)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3×3 stride-2 valid conv (or 2×2 average pooling)."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv_layer(x.shape[-1], 3, "conv", self.dtype, stride=2, pad="VALID")(x)


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
        return per_backend(functools.partial(upsample_cpu, dtype=self.dtype),
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


def token_grid(length: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) grid of `length` raster-order tokens: `grid` when given, else the square one."""
    if grid is not None:
        return grid
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"{length} tokens are not a square grid; pass grid=(h, w)")
    return side, side
