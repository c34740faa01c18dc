"""The taming-layout VQGAN in Flax (Encoder, Decoder, VQGAN), and the one place a config becomes
a Flax module (`module_from_config`, dispatching on the family), with its parameter shapes.

Parameter names follow vqgan-jax's tree exactly (`encoder/down_0/block_0/norm1/scale`, ...), so
its `flax_model.msgpack` files load unchanged. Layout is NHWC. Pixel values go in and come out in
the checkpoint's own range (no hidden scaling). taming, LlamaGen and IBQ share this layout and
differ in their quantizer kind (`quantizers`); MaskGIT's VQGAN has its own module (`maskgit`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import magvit2, maskgit
from .config import VQGANConfig
from .layers import Dtype, Level, MidBlock, conv_layer, norm_layer, token_grid
from .quantizers import VectorQuantizer


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
        x = conv_layer(self.channels, 3, "conv_in", self.dtype)(x.astype(self.dtype))
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
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return conv_layer(out, 3, "conv_out", self.dtype)(x)


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
        x = conv_layer(width, 3, "conv_in", self.dtype)(z.astype(self.dtype))
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
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        return conv_layer(self.out_channels, 3, "conv_out", self.dtype)(x)


class VQGAN(nn.Module):
    """Encoder → quant_conv → quantizer, and post_quant_conv → Decoder (taming's VQModel; also
    LlamaGen's and IBQ's, with their quantizer kinds)."""

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
    quantizer: str = "l2"
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
        self.quant_conv = conv_layer(self.embed_dim, 1, None, self.dtype)
        self.post_quant_conv = conv_layer(self.z_channels, 1, None, self.dtype)
        self.quantize = VectorQuantizer(self.codebook_size, self.embed_dim, self.quantizer)

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
        grid = token_grid(length, grid)
        quantized = self.quantize.lookup(indices).reshape(batch, *grid, self.embed_dim)
        return self.decode(quantized)

    def __call__(self, pixels: jax.Array, deterministic: bool = True):
        """Reconstruction: (pixels', quantized, latents, indices); used by training and init."""
        z = self.quant_conv(self.encoder(pixels, deterministic)).astype(jnp.float32)
        quantized, indices = self.quantize(z)
        # Straight-through estimator: the decoder sees the codes, the encoder gets its gradient.
        passed = z + jax.lax.stop_gradient(quantized - z)
        return self.decode(passed, deterministic), quantized, z, indices


def module_from_config(config: VQGANConfig, dtype: Dtype = jnp.float32) -> Any:
    """The Flax module for a config; the one place config fields become module fields.

    MaskGIT's VQGAN is its own module; every other family is this taming layout with the
    family's quantizer kind. Each has `encode`, `encode_latents`, `decode`, `decode_code`.
    """
    if config.family == "maskgit":
        return maskgit.module_from_config(config, dtype)
    if config.family == "open_magvit2":
        return magvit2.module_from_config(config, dtype)
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
        quantizer=config.quantizer,
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
    """The expected parameter tree as ShapeDtypeStructs, without allocating anything (traced
    once per config: conversion, loading and saving each need it)."""
    return jax.tree.map(lambda leaf: leaf, _traced_shapes(config))


@functools.lru_cache(maxsize=16)
def _traced_shapes(config: VQGANConfig) -> dict:
    module = module_from_config(config)
    size = config.resolution
    pixels = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), pixels)
    return dict(shapes["params"])
