"""The VQGAN of taming-transformers in Flax: Encoder, Decoder, VQGAN, and the VQModel wrapper.

Parameter names follow vqgan-jax's tree exactly (`encoder/down_0/block_0/norm1/scale`, ...), so
its `flax_model.msgpack` files load unchanged. Layout is NHWC. Pixel values go in and come out in
the checkpoint's own range (no hidden scaling); `VQModel`'s uint8 helpers apply the range. The
leaf blocks and their per-backend numerics live in `layers`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints
from .config import VQGANConfig
from .layers import Dtype, Level, MidBlock, VectorQuantizer, conv_layer, norm_layer
from .layers import nearest_codes as nearest_codes  # re-exported: model/train_demo.py imports it


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
        self.quant_conv = conv_layer(self.embed_dim, 1, None, self.dtype)
        self.post_quant_conv = conv_layer(self.z_channels, 1, None, self.dtype)
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
        self._weights = params if params is not None else init_params(config, seed)
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
        params = checkpoints.read_params(file, param_shapes(config))
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
        checkpoints.save(save_directory, self.config, params if params is not None else self.params,
                         param_shapes(self.config), formats=formats)

    @property
    def params(self) -> dict:
        """The parameter tree (what the methods use when not given `params=`)."""
        return self._weights

    @params.setter
    def params(self, params: dict) -> None:
        """Replace the weights (vqgan-jax's `model.params = state`): they are no longer the
        checkpoint's, so the digest is recomputed and the model counts as in-memory (a stale
        digest would give other weights' tokens their fingerprint and cache entries)."""
        if params is not self._weights:
            self._weights = params
            self._digest = None
            self.source = None

    @property
    def weights_digest(self) -> str:
        """A content hash of the weights, computed once (from the file when loaded from one)."""
        if self._digest is None:
            self._digest = checkpoints.params_digest(self.params)
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
                             f"{images.shape}; see vqgan_datasets.pipeline.images.load_image")
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
