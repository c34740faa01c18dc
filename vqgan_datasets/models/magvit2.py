"""The Open-MAGVIT2 family (TencentARC/SEED-Voken, `src/Open_MAGVIT2/`) in Flax, and loading
its published Lightning checkpoints.

A MAGVIT2 CNN without attention: bias-free 3x3 convs in the res blocks, stride-2 3x3 convs to
downsample, a 3x3 conv to 4x the channels then depth-to-space to upsample, and before each
decoder level an adaptive GroupNorm whose scale and shift are linear maps of the per-channel
standard deviation and mean of the quantized latents. The quantizer is lookup-free: each of
the `z_channels` latent channels gives one bit (set where the channel is > 0), bit d weighing
2**d, so channel 0 is the least significant; a token decodes to the ±1 vector of its bits.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints
from .checkpoints import CheckpointError
from .config import VQGANConfig
from .layers import (
    Dtype,
    conv_layer,
    group_norm_accelerator,
    group_norm_cpu,
    norm_layer,
    per_backend,
    token_grid,
)
from .sourcefiles import config_from_seed_voken_yaml, lit_ema_weights

logger = logging.getLogger(__name__)

FAMILY = "open_magvit2"
_GROUP_NORM_EPS = 1e-6  # every GroupNorm of the reference, adaptive ones included


# ---------------------------------------------------------------------------------------------
# Lookup-free quantization.


def lfq_indices(z: jax.Array) -> jax.Array:
    """Latents [..., D] → int32 tokens [...]: bit d set where z[..., d] > 0 (channel 0 = 2**0)."""
    weights = jnp.left_shift(1, jnp.arange(z.shape[-1], dtype=jnp.int32))
    return jnp.sum(jnp.where(z > 0, weights, 0), axis=-1, dtype=jnp.int32)


def lfq_codes(indices: jax.Array, bits: int) -> jax.Array:
    """int tokens [...] → float32 codes [..., bits]: +1 where bit d is set, else -1."""
    shifts = jnp.arange(bits, dtype=jnp.int32)
    set_bits = jnp.bitwise_and(jnp.right_shift(indices.astype(jnp.int32)[..., None], shifts), 1)
    return jnp.where(set_bits == 1, 1.0, -1.0).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# The network.


class _BiasFreeConv(nn.Module):
    """A stride-1 "same" conv with a `kernel` (HWIO) and no bias."""

    features: int
    kernel_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (size, size, x.shape[-1], self.features), jnp.float32)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1, 1),
            padding=((size // 2, size // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class ResBlock(nn.Module):
    """norm → swish → conv → norm → swish → conv, plus the input (1x1 bias-free projection of
    the input when the width changes)."""

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(norm_layer("norm1", self.norm_groups, self.dtype)(x))
        h = _BiasFreeConv(self.out_channels, 3, self.dtype, name="conv1")(h)
        h = nn.swish(norm_layer("norm2", self.norm_groups, self.dtype)(h))
        h = _BiasFreeConv(self.out_channels, 3, self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _BiasFreeConv(self.out_channels, 1, self.dtype, name="nin_shortcut")(x)
        return h + x.astype(self.dtype)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then scale·x + shift with scale = `gamma`(std of `style` over
    positions) and shift = `beta`(mean of `style`); the variance is the unbiased one (N - 1),
    as torch's `var` computes it."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        flat = style.astype(jnp.float32).reshape(style.shape[0], -1, style.shape[-1])
        std = jnp.sqrt(jnp.var(flat, axis=1, ddof=1) + _GROUP_NORM_EPS)  # [B, D]
        scale = nn.Dense(channels, name="gamma", dtype=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)(std)
        shift = nn.Dense(channels, name="beta", dtype=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)(jnp.mean(flat, axis=1))
        static = dict(num_groups=self.norm_groups, epsilon=_GROUP_NORM_EPS, dtype=self.dtype)
        return per_backend(functools.partial(group_norm_cpu, **static),
                           functools.partial(group_norm_accelerator, **static), x, scale, shift)


def _depth_to_space(x: jax.Array) -> jax.Array:
    """[B,h,w,4C] → [B,2h,2w,C]; channel (i*2 + j)*C + c lands at row offset i, column j
    (the reference's DCR order on NCHW)."""
    batch, height, width, channels = x.shape
    c = channels // 4
    x = x.reshape(batch, height, width, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, 2 * height, 2 * width, c)


class Upsampler(nn.Module):
    """A 3x3 conv `conv1` to 4x the channels, then depth-to-space (x2 each side)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _depth_to_space(conv_layer(4 * x.shape[-1], 3, "conv1", self.dtype)(x))


class Encoder(nn.Module):
    """Pixels [B,H,W,in] in [-1, 1] → latents [B,H/f,W/f,z]."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    z_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _BiasFreeConv(self.channels, 3, self.dtype, name="conv_in")(x)
        last = len(self.channel_multipliers) - 1
        for i, mult in enumerate(self.channel_multipliers):
            for j in range(self.num_res_blocks):
                x = ResBlock(self.channels * mult, self.norm_groups, self.dtype,
                             name=f"down_{i}_block_{j}")(x)
            if i != last:
                x = conv_layer(x.shape[-1], 3, f"down_{i}_downsample", self.dtype, stride=2,
                               pad=((1, 1), (1, 1)))(x)
        for j in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], self.norm_groups, self.dtype, name=f"mid_block_{j}")(x)
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        return conv_layer(self.z_channels, 1, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """Quantized latents [B,h,w,z] → pixels [B,h*f,w*f,out] (not clamped)."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        style = z
        x = conv_layer(self.channels * self.channel_multipliers[-1], 3, "conv_in",
                       self.dtype)(z.astype(self.dtype))
        for j in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], self.norm_groups, self.dtype, name=f"mid_block_{j}")(x)
        for i in reversed(range(len(self.channel_multipliers))):
            x = AdaptiveGroupNorm(self.norm_groups, self.dtype, name=f"adaptive_{i}")(x, style)
            for j in range(self.num_res_blocks):
                x = ResBlock(self.channels * self.channel_multipliers[i], self.norm_groups,
                             self.dtype, name=f"up_{i}_block_{j}")(x)
            if i > 0:
                x = Upsampler(self.dtype, name=f"up_{i}_upsample")(x)
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        return conv_layer(self.out_channels, 3, "conv_out", self.dtype)(x)


class OpenMAGVIT2(nn.Module):
    """Encoder → lookup-free quantizer, and Decoder; the same methods as `modeling.VQGAN`."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    z_channels: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        shared = dict(channels=self.channels, channel_multipliers=tuple(self.channel_multipliers),
                      num_res_blocks=self.num_res_blocks, norm_groups=self.norm_groups,
                      dtype=self.dtype)
        self.encoder = Encoder(z_channels=self.z_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """latents [B,h,w,D] → (±1 codes [B,h,w,D] float32, tokens [B,h*w] int32, raster)."""
        z = z.astype(jnp.float32)
        quantized = jnp.where(z > 0, 1.0, -1.0).astype(jnp.float32)
        return quantized, lfq_indices(z).reshape(z.shape[0], -1)

    def encode(self, pixels: jax.Array, deterministic: bool = True):
        """pixels [B,H,W,C] in [-1, 1] → (quantized [B,h,w,D], indices [B,h*w], raster order)."""
        return self.quantize(self.encoder(pixels))

    def encode_latents(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
        """pixels → pre-quantization latents [B,h,w,D] (what the quantizer sees)."""
        return self.encoder(pixels).astype(jnp.float32)

    def decode(self, quantized: jax.Array, deterministic: bool = True) -> jax.Array:
        """quantized latents [B,h,w,D] → pixels [B,H,W,C] in [-1, 1] (not clamped), float32."""
        return self.decoder(quantized).astype(jnp.float32)

    def decode_code(self, indices: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """indices [B,h*w] (raster order) → pixels; a square grid unless `grid` says otherwise."""
        batch, length = indices.shape
        grid = token_grid(length, grid)
        codes = lfq_codes(indices, self.z_channels)
        return self.decode(codes.reshape(batch, *grid, self.z_channels))

    def __call__(self, pixels: jax.Array, deterministic: bool = True):
        """Reconstruction: (pixels', quantized, latents, indices); used by init."""
        z = self.encode_latents(pixels)
        quantized, indices = self.quantize(z)
        passed = z + jax.lax.stop_gradient(quantized - z)  # straight-through
        return self.decode(passed), quantized, z, indices


def module_from_config(config: VQGANConfig, dtype: Dtype = jnp.float32) -> OpenMAGVIT2:
    """The Flax module for an Open-MAGVIT2 config: no attention, codes of dimension z_channels,
    n_embed = 2 ** z_channels."""
    if (config.attn_resolutions or config.double_z or config.embed_dim != config.z_channels
            or config.n_embed != 2**config.z_channels):
        raise ValueError(
            "an Open-MAGVIT2 model has no attention, no double_z, embed_dim == z_channels and "
            f"n_embed == 2 ** z_channels; the config has attn_resolutions="
            f"{list(config.attn_resolutions)}, double_z={config.double_z}, embed_dim="
            f"{config.embed_dim}, z_channels={config.z_channels}, n_embed={config.n_embed}"
        )
    return OpenMAGVIT2(
        channels=config.ch, channel_multipliers=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks, z_channels=config.z_channels,
        out_channels=config.out_ch, norm_groups=config.norm_groups, dtype=dtype,
    )


def param_shapes(config: VQGANConfig) -> dict:
    """The expected parameter tree as ShapeDtypeStructs (nothing allocated)."""
    size = 2 * config.downsample_factor  # the adaptive norms' variance needs 2+ positions
    pixels = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(module_from_config(config).init, jax.random.PRNGKey(0), pixels)
    return dict(shapes["params"])


# ---------------------------------------------------------------------------------------------
# Published files: SEED-Voken's Lightning `.ckpt` (`state_dict`), with LitEma copies
# `model_ema.<name without dots>` for models trained with `use_ema`.

_EMA_PREFIX = "model_ema."
_EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
_MODEL_PREFIXES = ("encoder.", "decoder.")
# Tensor names only Open-MAGVIT2's network has (taming's names mid blocks `mid.block_1`).
_SIGNS = (re.compile(r"decoder\.adaptive\.\d+\.(gamma|beta)\.weight"),
          re.compile(r"(en|de)coder\.mid_block\.\d+\.conv1\.weight"))
_HUB_REPO = re.compile(r"^tencentarc/open-magvit2-tokenizer-", re.IGNORECASE)
_FILENAME = re.compile(r"^(pretrain256_\d+|imagenet_(128|256)_[a-z]+)\.ckpt$", re.IGNORECASE)


def evidence(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any]) -> list[str]:
    """Signs that a file holds Open-MAGVIT2 weights ([] for none)."""
    signs = []
    named = sorted(n for n in names_to_shapes if any(p.fullmatch(n) for p in _SIGNS))
    if named:
        signs.append(f"tensors named as in Open-MAGVIT2's network (e.g. {named[0]!r}: adaptive "
                     "GroupNorm, mid_block)")
    hyper = extras.get("hyper_parameters")
    if hyper and "Open_MAGVIT2" in repr(hyper):
        signs.append("hyper-parameters naming Open_MAGVIT2")
    source = extras.get("source") or {}
    repo = str(source.get("repo_id") or "")
    if _HUB_REPO.match(repo):
        signs.append(f"published in the Hub repo {repo}")
    filename = os.path.basename(str(source.get("filename") or ""))
    if named and _FILENAME.match(filename):
        signs.append(f"file name {filename} (SEED-Voken's Open-MAGVIT2 tokenizers)")
    return signs


def select_weights(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
    """The weights SEED-Voken's evaluation runs (`ema_scope` when the model has `use_ema`): each
    network parameter's EMA copy when the file has them ("ema"), else the live weights (None)."""
    return lit_ema_weights(state, _MODEL_PREFIXES, "Open-MAGVIT2")


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"cannot read the Open-MAGVIT2 architecture: no tensor {name!r}")
    return tuple(shapes[name])


def infer_config(names_to_shapes: Mapping[str, tuple[int, ...]],
                 yaml_path: str | os.PathLike | None = None) -> VQGANConfig:
    """The architecture read off the tensor shapes, or from a SEED-Voken yaml
    (`model.init_args.ddconfig`, `n_embed`, `embed_dim`: configs/Open-MAGVIT2/gpu/*.yaml)."""
    if yaml_path is not None:
        return _from_yaml(yaml_path)
    shapes = {k: v for k, v in names_to_shapes.items() if not k.startswith(_EMA_PREFIX)}
    ch, in_channels = _shape(shapes, "encoder.conv_in.weight")[:2]
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise CheckpointError("cannot read the Open-MAGVIT2 architecture: no encoder.down.N.block"
                              ".M tensors numbered from 0")
    mults = []
    for i in levels:
        name = f"encoder.down.{i}.block.0.conv1.weight"
        width = _shape(shapes, name)[0]
        if width % ch:
            raise CheckpointError(f"{name}: {width} channels is not a multiple of conv_in's {ch}")
        mults.append(width // ch)
    z_channels = _shape(shapes, "encoder.conv_out.weight")[0]
    return VQGANConfig(
        ch=ch, in_channels=in_channels, out_ch=_shape(shapes, "decoder.conv_out.weight")[0],
        ch_mult=tuple(mults), num_res_blocks=len(blocks), attn_resolutions=(),
        z_channels=z_channels, embed_dim=z_channels, n_embed=2**z_channels, family=FAMILY,
    )


def _from_yaml(path: str | os.PathLike) -> VQGANConfig:
    return config_from_seed_voken_yaml(path, "Open-MAGVIT2 yaml, configs/Open-MAGVIT2/gpu/*.yaml",
                                       attn_resolutions=[], family=FAMILY)


def _flax_path(name: str, ndim: int) -> tuple[str, ...] | None:
    """'decoder.up.1.block.0.conv1.weight' → ('decoder', 'up_1_block_0', 'conv1', 'kernel')."""
    name = re.sub(r"\b(down|up)\.(\d+)\.(block)\.(\d+)\.", r"\1_\2_\3_\4.", name)
    name = re.sub(r"\b(down|up)\.(\d+)\.(downsample|upsample)\.", r"\1_\2_\3.", name)
    name = re.sub(r"\b(mid_block|adaptive)\.(\d+)\.", r"\1_\2.", name)
    *path, leaf = name.split(".")
    if leaf == "weight":
        leaf = {4: "kernel", 2: "kernel", 1: "scale"}.get(ndim, leaf)
    elif leaf != "bias":
        return None
    return (*path, leaf)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our leaf shape as the reference's tensor has it (HWIO → OIHW, [in, out] → [out, in])."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Our parameter tree from an Open-MAGVIT2 state dict, checked against `config`; errors name
    the file's tensor and both shapes. Training-only tensors (`loss.*`) are skipped; an EMA copy
    still in `state` (not passed through `select_weights`) is reported as unexpected."""
    expected = {k: tuple(v.shape) for k, v in checkpoints.flatten(param_shapes(config)).items()}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, value in state.items():
        if name.startswith("loss.") or name in _EMA_BUFFERS:
            continue
        array = np.asarray(value, dtype=np.float32)
        path = _flax_path(name, array.ndim)
        if path not in expected:
            unexpected.append(name)
            continue
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW → HWIO
        elif array.ndim == 2:
            array = array.T  # Linear [out, in] → Dense [in, out]
        if array.shape != expected[path]:
            want = _torch_shape(expected[path])
            raise CheckpointError(
                f"{name}: the config expects shape {tuple(want)}, the file holds "
                f"{tuple(np.shape(value))} (config: ch={config.ch}, ch_mult="
                f"{list(config.ch_mult)}, num_res_blocks={config.num_res_blocks}, "
                f"z_channels={config.z_channels})")
        flat[path] = array
    checkpoints.check_params(flat, expected, "Open-MAGVIT2 weights", unexpected=unexpected)
    return checkpoints.unflatten(flat)
