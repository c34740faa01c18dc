"""The VQGAN of taming-transformers in Flax: leaf modules, Encoder/Decoder/VectorQuantizer, VQGAN.

Parameter names follow vqgan-jax's tree exactly (`encoder/down_0/block_0/norm1/scale`, ...), so
its `flax_model.msgpack` files load unchanged. Layout is NHWC. Pixel values go in and come out in
the checkpoint's own range (no hidden scaling); `VQModel`'s uint8 helpers apply the range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
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


class GroupNorm(nn.Module):
    """taming's Normalize: GroupNorm with affine `scale`/`bias` [C] (Flax GroupNorm's names).

    Statistics in float32 whatever the compute dtype, from per-channel two-pass moments merged
    into group moments (Chan et al.), reducing over the spatial axes with C contiguous. Against
    a float64 reference this is as accurate as PyTorch's GroupNorm (Flax's reduction over a
    [B,H*W,G,C/G] view drifted ~10x more on offset activations) and on CPU ~1.5x faster.
    `offset` [C] normalises x + offset without materialising it (a preceding conv's bias: it
    shifts the channel means and leaves the centred moments alone). Returns float32.
    """

    num_groups: int = 32
    epsilon: float = _GROUP_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, offset: jax.Array | None = None) -> jax.Array:
        batch, channels = x.shape[0], x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        per_group = channels // self.num_groups
        axes = tuple(range(1, x.ndim - 1))
        expand = (slice(None),) + (None,) * len(axes) + (slice(None),)  # [B,C] → [B,1..,C]
        x = x.astype(jnp.float32)
        count = math.prod(x.shape[a] for a in axes)
        mean_c = jnp.mean(x, axis=axes)  # [B,C], of x (without offset)
        m2_c = jnp.sum(jnp.square(x - mean_c[expand]), axis=axes)  # [B,C]
        if offset is not None:
            offset = offset.astype(jnp.float32)
            mean_c = mean_c + offset
        grouped = mean_c.reshape(batch, self.num_groups, per_group)
        mean_g = jnp.mean(grouped, axis=-1)  # [B,G]
        spread = jnp.sum(jnp.square(grouped - mean_g[..., None]), axis=-1)
        var_g = (m2_c.reshape(grouped.shape).sum(-1) + count * spread) / (count * per_group)
        gain = jnp.repeat(jax.lax.rsqrt(var_g + self.epsilon), per_group, axis=1) * scale  # [B,C]
        shift = bias - jnp.repeat(mean_g, per_group, axis=1) * gain
        if offset is not None:
            shift = shift + offset * gain
        return x * gain[expand] + shift[expand]


def _norm(name: str, groups: int) -> GroupNorm:
    return GroupNorm(num_groups=groups, name=name)


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → dropout → conv, plus a 1×1 (or 3×3) shortcut."""

    out_channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    use_conv_shortcut: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = nn.swish(_norm("norm1", self.norm_groups)(x).astype(self.dtype))
        h, conv1_bias = _conv(self.out_channels, 3, "conv1", self.dtype)(h, add_bias=False)
        h = nn.swish(_norm("norm2", self.norm_groups)(h, offset=conv1_bias).astype(self.dtype))
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
        h = _norm("norm", self.norm_groups)(x).astype(self.dtype)
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


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv.

    Computed without materialising the upsampled map: one 2×2 conv on the input (padded by one)
    gives all four output phases (see `_phase_kernels`), 4/9 of the multiply-adds of the 3×3 conv
    at the doubled resolution; then the phases are interleaved. Equal to taming's upsample-then-
    conv up to float rounding (the kernel taps are summed first); `conv/kernel` keeps its shape.
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if not self.with_conv:
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
            return x.reshape(batch, 2 * height, 2 * width, channels)
        kernel, bias = ConvWeights(channels, 3, channels, name="conv")()
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            _phase_kernels(kernel).astype(self.dtype),
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
        return y + bias.astype(self.dtype)


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
        x = nn.swish(_norm("norm_out", self.norm_groups)(x).astype(self.dtype))
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
        x = nn.swish(_norm("norm_out", self.norm_groups)(x).astype(self.dtype))
        return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row for each row of z: argmin |z|²+|e|²−2z·e (taming's form).

    One [N,D]×[D,K] matmul; never a broadcast of N×K×D. Always float32 at "highest" precision,
    since near-ties flip under TF32/bf16 and the cost is ~1.5% of the encoder's FLOPs.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dots = jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distance = (
        jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)[None, :] - 2 * dots
    )
    return jnp.argmin(distance, axis=1).astype(jnp.int32)


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
        """pixel_values [B,H,W,C] in the model's range → (quant_states [B,h,w,D], indices [B,h*w])."""
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

    def __repr__(self) -> str:
        return (f"VQModel({self.name or 'in-memory'}, codebook={self.config.n_embed}, "
                f"f={self.config.downsample_factor}, dtype={self.dtype.name})")


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
