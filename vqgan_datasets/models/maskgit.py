"""MaskGIT's VQGAN tokenizer (google-research/maskgit) in Flax, and loading its published weights.

A taming-like convolutional VQGAN without attention: bias-free 3x3 convs in the res blocks, 2x2
average pooling to downsample, nearest x2 plus a 3x3 conv to upsample, no quant_conv, an L2
argmin over 1,024 codes of dimension 256 at f16. Pixels go in as [0, 1] and `decode` clamps its
output to [0, 1], as the published PyTorch port's `decode` does. Two file layouts load: the
PyTorch port's state dict (bytedance/1d-tokenizer, `maskgit-vqgan-imagenet-f16-256.bin`) and the
original Flax checkpoint's tree (`encoder/ResBlock_0/Conv_0/kernel`, `quantizer/codebook`, ...).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import VQGANConfig
from .layers import (
    ConvWeights,
    Downsample,
    Dtype,
    norm_layer,
    per_backend,
    token_grid,
    upsample_accelerator,
    upsample_cpu,
)
from .params import CheckpointError, check_params, flatten, unflatten
from .quantizers import VectorQuantizer

FAMILY = "maskgit"


def _conv(x: jax.Array, kernel: jax.Array, *, dtype: Dtype) -> jax.Array:
    """Stride-1 "same" convolution, NHWC/HWIO (odd kernels, as the port's Conv2dSame pads)."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x.astype(dtype), kernel.astype(dtype), window_strides=(1, 1), padding=((pad, pad),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _one_image_at_a_time(fn, x: jax.Array, *weights: jax.Array) -> jax.Array:
    """`fn(x, *weights)` image by image: on one CPU core a 256x256x128 XLA convolution cost 27%
    more per image at batch 4 than at batch 1; looping keeps batch 1's speed at any batch."""
    if x.shape[0] == 1:
        return fn(x, *weights)
    return jax.lax.map(lambda image: fn(image[None], *weights)[0], x)


class MaskGITConv(nn.Module):
    """A stride-1 "same" conv, `kernel` (HWIO) and, unless `use_bias=False`, `bias`.

    On CPU it runs one image at a time (`_one_image_at_a_time`), elsewhere on the whole batch.
    """

    features: int
    kernel_size: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (size, size, x.shape[-1], self.features), jnp.float32)
        conv = functools.partial(_conv, dtype=self.dtype)
        y = per_backend(functools.partial(_one_image_at_a_time, conv), conv, x, kernel)
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return y + bias.astype(self.dtype)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (`conv/kernel`, `conv/bias`): on CPU `layers.upsample_cpu`
    one image at a time, elsewhere `layers.upsample_accelerator`."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel, bias = ConvWeights(channels, 3, channels, name="conv")()
        cpu = functools.partial(upsample_cpu, dtype=self.dtype)
        return per_backend(functools.partial(_one_image_at_a_time, cpu),
                           functools.partial(upsample_accelerator, dtype=self.dtype),
                           x, kernel, bias)


class ResBlock(nn.Module):
    """norm → swish → conv → norm → swish → conv, plus the input (or a 1x1 projection).

    When the width changes, MaskGIT's block adds a 1x1 projection of the second conv's *output*,
    not of its input (so `nin_shortcut` is [1,1,out,out]); the published weights were trained so.
    """

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(norm_layer("norm1", self.norm_groups, self.dtype)(x))
        h = MaskGITConv(self.out_channels, 3, False, self.dtype, name="conv1")(h)
        h = nn.swish(norm_layer("norm2", self.norm_groups, self.dtype)(h))
        h = MaskGITConv(self.out_channels, 3, False, self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            return h + MaskGITConv(self.out_channels, 1, False, self.dtype, name="nin_shortcut")(h)
        return h + x.astype(self.dtype)


class Stage(nn.Module):
    """`num_blocks` res blocks (`block_{j}`), then 2x2 average pooling or an `upsample`."""

    out_channels: int
    num_blocks: int
    resample: str | None = None  # "down", "up" or None
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            x = ResBlock(self.out_channels, self.norm_groups, self.dtype, name=f"block_{j}")(x)
        if self.resample == "down":
            # torch's avg_pool2d(2, 2): floor on odd sizes (the original's TF "same" pooling
            # differs there only; f16 models see even sizes at every level).
            x = Downsample(with_conv=False, dtype=self.dtype)(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """Pixels [B,H,W,in] in [0, 1] → latents [B,H/f,W/f,z]."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    z_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = MaskGITConv(self.channels, 3, False, self.dtype, name="conv_in")(x)
        last = len(self.channel_multipliers) - 1
        for i, mult in enumerate(self.channel_multipliers):
            x = Stage(self.channels * mult, self.num_res_blocks, "down" if i != last else None,
                      self.norm_groups, self.dtype, name=f"down_{i}")(x)
        x = Stage(x.shape[-1], self.num_res_blocks, None, self.norm_groups, self.dtype,
                  name="mid")(x)
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        return MaskGITConv(self.z_channels, 1, True, self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents [B,h,w,z] → pixels [B,h*f,w*f,out] (not clamped)."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        width = self.channels * self.channel_multipliers[-1]
        x = MaskGITConv(width, 3, True, self.dtype, name="conv_in")(z.astype(self.dtype))
        x = Stage(width, self.num_res_blocks, None, self.norm_groups, self.dtype, name="mid")(x)
        for i in reversed(range(len(self.channel_multipliers))):
            x = Stage(self.channels * self.channel_multipliers[i], self.num_res_blocks,
                      "up" if i != 0 else None, self.norm_groups, self.dtype, name=f"up_{i}")(x)
        x = nn.swish(norm_layer("norm_out", self.norm_groups, self.dtype)(x))
        return MaskGITConv(self.out_channels, 3, True, self.dtype, name="conv_out")(x)


class MaskGITVQGAN(nn.Module):
    """Encoder → L2 quantizer, and Decoder; the same methods as `modeling.VQGAN`."""

    channels: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    z_channels: int
    codebook_size: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        shared = dict(channels=self.channels, channel_multipliers=tuple(self.channel_multipliers),
                      num_res_blocks=self.num_res_blocks, norm_groups=self.norm_groups,
                      dtype=self.dtype)
        self.encoder = Encoder(z_channels=self.z_channels, **shared)
        self.decoder = Decoder(out_channels=self.out_channels, **shared)
        self.quantize = VectorQuantizer(self.codebook_size, self.z_channels, kind="l2")

    def encode(self, pixels: jax.Array, deterministic: bool = True):
        """pixels [B,H,W,C] in [0, 1] → (quantized [B,h,w,D], indices [B,h*w], raster order)."""
        return self.quantize(self.encoder(pixels))

    def encode_latents(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
        """pixels → pre-quantization latents [B,h,w,D] (what the quantizer sees)."""
        return self.encoder(pixels).astype(jnp.float32)

    def decode(self, quantized: jax.Array, deterministic: bool = True) -> jax.Array:
        """quantized latents [B,h,w,D] → pixels [B,H,W,C] clamped to [0, 1], float32."""
        return jnp.clip(self.decoder(quantized).astype(jnp.float32), 0.0, 1.0)

    def decode_code(self, indices: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """indices [B,h*w] (raster order) → pixels; a square grid unless `grid` says otherwise."""
        batch, length = indices.shape
        grid = token_grid(length, grid)
        return self.decode(self.quantize.lookup(indices).reshape(batch, *grid, self.z_channels))

    def __call__(self, pixels: jax.Array, deterministic: bool = True):
        """Reconstruction: (pixels', quantized, latents, indices); used by init."""
        z = self.encode_latents(pixels)
        quantized, indices = self.quantize(z)
        passed = z + jax.lax.stop_gradient(quantized - z)  # straight-through
        return self.decode(passed), quantized, z, indices


def module_from_config(config: VQGANConfig, dtype: Dtype = jnp.float32) -> MaskGITVQGAN:
    """The Flax module for a MaskGIT config (no attention, codes of dimension z_channels)."""
    if config.attn_resolutions or config.embed_dim != config.z_channels or config.double_z:
        raise ValueError(
            f"a MaskGIT VQGAN has no attention, no double_z and embed_dim == z_channels; the "
            f"config has attn_resolutions={list(config.attn_resolutions)}, double_z="
            f"{config.double_z}, embed_dim={config.embed_dim}, z_channels={config.z_channels}"
        )
    return MaskGITVQGAN(
        channels=config.ch, channel_multipliers=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks, z_channels=config.z_channels,
        codebook_size=config.n_embed, out_channels=config.out_ch,
        norm_groups=config.norm_groups, dtype=dtype,
    )


def _param_shapes(config: VQGANConfig) -> dict:
    """The expected parameter tree of a MaskGIT config as ShapeDtypeStructs (nothing allocated)."""
    size = config.downsample_factor
    pixels = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(module_from_config(config).init, jax.random.PRNGKey(0), pixels)
    return dict(shapes["params"])


# ---------------------------------------------------------------------------------------------
# Published files. The PyTorch port's state dict ("torch") and the original Flax tree ("flax")
# name the same tensors differently; both map onto the tree above.

_TORCH_SIGNS = (re.compile(r"decoder/up/\d+/upsample_conv/weight"),
                re.compile(r"(en|de)coder/mid/\d+/norm1/weight"))
_FLAX_SIGNS = (re.compile(r"(en|de)coder/ResBlock_\d+/Conv_0/kernel"),
               re.compile(r"quantizer/codebook"))
_RES_BLOCK_PARTS = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "GroupNorm_1": "norm2",
                    "Conv_1": "conv2", "Conv_2": "nin_shortcut"}


def _normalised(name: str) -> str:
    """A tree path with "/" separators and no leading "params" (msgpack trees flatten either way)."""
    parts = re.split(r"[./]", name)
    return "/".join(parts[1:] if parts[0] == "params" else parts)


def _layout(names: Any) -> str | None:
    """"torch", "flax" or None: which MaskGIT file layout the tensor names follow."""
    normalised = [_normalised(n) for n in names]
    for layout, signs in (("torch", _TORCH_SIGNS), ("flax", _FLAX_SIGNS)):
        if any(p.fullmatch(n) for p in signs for n in normalised):
            return layout
    return None


def evidence(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any]) -> list[str]:
    """Signs that a file holds MaskGIT VQGAN weights ([] for none)."""
    names = list(names_to_shapes)
    signs = []
    torch_names = sorted(n for n in names if any(p.fullmatch(_normalised(n)) for p in _TORCH_SIGNS))
    if torch_names:
        signs.append(f"tensors named as in MaskGIT's PyTorch port (e.g. {torch_names[0]!r}; "
                     "taming names them 'upsample.conv' and 'mid.block_N')")
    flax_names = sorted(n for n in names if any(p.fullmatch(_normalised(n)) for p in _FLAX_SIGNS))
    if flax_names:
        signs.append(f"tensors named as in MaskGIT's Flax checkpoints (e.g. {flax_names[0]!r})")
    if signs and "encoder.conv_in.weight" in names_to_shapes \
            and "encoder.conv_in.bias" not in names_to_shapes:
        signs.append("a bias-free 'encoder.conv_in' (taming's has a bias)")
    source = extras.get("source") or ""
    if isinstance(source, Mapping):  # {"repo_id": ..., "filename": ...}
        source = "/".join(str(v) for v in source.values() if v)
    if "maskgit" in str(source).lower():
        signs.append(f"the file's name or repository mentions MaskGIT ({source})")
    return signs


def infer_config(names_to_shapes: Mapping[str, tuple[int, ...]],
                 yaml_path: str | None = None) -> VQGANConfig:
    """The architecture read off a MaskGIT file's tensor shapes (either layout), or from a yaml
    holding the PyTorch port's `hidden_channels`/`channel_mult`/... or the original's `vqvae`."""
    shapes = {_normalised(k): tuple(v) for k, v in names_to_shapes.items()}
    layout = _layout(names_to_shapes)
    if layout is None:
        raise CheckpointError(
            "no MaskGIT VQGAN tensors found (expected e.g. 'decoder.up.1.upsample_conv.weight' or "
            f"'encoder/ResBlock_0/Conv_0/kernel'); first names: {sorted(names_to_shapes)[:5]}")
    fields = (_fields_from_torch if layout == "torch" else _fields_from_flax)(shapes)
    if yaml_path is not None:
        fields.update(_fields_from_yaml(yaml_path))
    fields["embed_dim"] = fields["z_channels"]
    return VQGANConfig(attn_resolutions=(), value_range=(0.0, 1.0), family=FAMILY, **fields)


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"cannot read the MaskGIT architecture: no tensor {name!r}")
    return shapes[name]


def _multipliers(widths: list[int], ch: int, names: list[str]) -> tuple[int, ...]:
    for width, name in zip(widths, names, strict=True):
        if width % ch:
            raise CheckpointError(f"{name}: {width} channels is not a multiple of conv_in's {ch}")
    return tuple(w // ch for w in widths)


def _fields_from_torch(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    ch, in_channels = _shape(shapes, "encoder/conv_in/weight")[:2]
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder/down/(\d+)/", k))})
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"encoder/down/0/block/(\d+)/", k))}
    names = [f"encoder/down/{i}/block/0/conv1/weight" for i in levels]
    n_embed, _ = _shape(shapes, "quantize/embedding/weight")
    return dict(ch=ch, in_channels=in_channels, num_res_blocks=len(blocks),
                ch_mult=_multipliers([_shape(shapes, n)[0] for n in names], ch, names),
                z_channels=_shape(shapes, "encoder/conv_out/weight")[0], n_embed=n_embed,
                out_ch=_shape(shapes, "decoder/conv_out/weight")[0])


def _fields_from_flax(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    *_, in_channels, ch = _shape(shapes, "encoder/Conv_0/kernel")
    res_blocks = {int(m[1]) for k in shapes if (m := re.match(r"encoder/ResBlock_(\d+)/", k))}
    convs = {int(m[1]) for k in shapes if (m := re.match(r"decoder/Conv_(\d+)/", k))}
    levels = max(convs, default=0)  # decoder: conv_in, one conv per upsampling, conv_out
    if levels < 1 or len(res_blocks) % (levels + 1):
        raise CheckpointError(
            f"cannot read the MaskGIT architecture: {len(res_blocks)} encoder ResBlocks and "
            f"{len(convs)} decoder convs do not make (levels + 1) x blocks")
    per_level = len(res_blocks) // (levels + 1)
    names = [f"encoder/ResBlock_{i * per_level}/Conv_0/kernel" for i in range(levels)]
    n_embed, _ = _shape(shapes, "quantizer/codebook")
    return dict(ch=ch, in_channels=in_channels, num_res_blocks=per_level,
                ch_mult=_multipliers([_shape(shapes, n)[-1] for n in names], ch, names),
                z_channels=_shape(shapes, "encoder/Conv_1/kernel")[-1], n_embed=n_embed,
                out_ch=_shape(shapes, f"decoder/Conv_{levels}/kernel")[-1])


# yaml keys of the PyTorch port's config and of the original's `vqvae` section → config fields.
_YAML_KEYS = {"hidden_channels": "ch", "filters": "ch", "channel_mult": "ch_mult",
              "channel_multipliers": "ch_mult", "num_res_blocks": "num_res_blocks",
              "z_channels": "z_channels", "embedding_dim": "z_channels",
              "num_channels": "in_channels", "resolution": "resolution",
              "image_size": "resolution", "num_embeddings": "n_embed", "codebook_size": "n_embed"}


def _fields_from_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    sections = [doc, doc.get("vqvae") or {}, (doc.get("model") or {}).get("vq_model") or {}]
    fields = {_YAML_KEYS[k]: v for section in sections if isinstance(section, Mapping)
              for k, v in section.items() if k in _YAML_KEYS}
    if not fields:
        raise CheckpointError(f"{path}: no MaskGIT VQGAN settings found (expected some of "
                              f"{sorted(_YAML_KEYS)})")
    if "in_channels" in fields:
        fields["out_ch"] = fields["in_channels"]
    if "ch_mult" in fields:
        fields["ch_mult"] = tuple(fields["ch_mult"])
    return fields


def to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Our parameter tree from a MaskGIT state dict (PyTorch port) or flattened Flax tree
    (original), checked against `config`; errors name the file's tensor and both shapes."""
    layout = _layout(state)
    if layout is None:
        raise CheckpointError("no MaskGIT VQGAN tensors found (expected the PyTorch port's "
                              "'decoder.up.N.upsample_conv.weight' or the Flax 'ResBlock_N' names)")
    expected = {k: tuple(v.shape) for k, v in flatten(_param_shapes(config)).items()}
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, value in state.items():
        array = np.asarray(value, dtype=np.float32)
        if layout == "torch":
            path = _torch_path(_normalised(name), array.ndim)
            if array.ndim == 4:
                array = array.transpose(2, 3, 1, 0)  # OIHW → HWIO
        else:
            path = _flax_path(_normalised(name), levels, blocks)
        if path not in expected:
            unexpected.append(name)
            continue
        if array.shape != expected[path]:
            want = expected[path]
            if layout == "torch" and len(want) == 4:
                want = (want[3], want[2], want[0], want[1])
            raise CheckpointError(
                f"{name}: the config expects shape {want}, the file holds {tuple(np.shape(value))} "
                f"(config: ch={config.ch}, ch_mult={list(config.ch_mult)}, num_res_blocks="
                f"{blocks}, z_channels={config.z_channels}, n_embed={config.n_embed})")
        flat[path] = array
    check_params(flat, expected, f"MaskGIT weights ({layout} layout)", unexpected=unexpected)
    return unflatten(flat)


def _torch_path(name: str, ndim: int) -> tuple[str, ...] | None:
    """'encoder/down/0/block/1/conv1/weight' → ('encoder','down_0','block_1','conv1','kernel')."""
    name = re.sub(r"^(en|de)coder/mid/(\d+)/", r"\1coder/mid/block_\2/", name)
    name = re.sub(r"/(down|up|block)/(\d+)(?=/)", r"/\1_\2", name)
    name = name.replace("/upsample_conv/", "/upsample/conv/")
    *path, leaf = name.split("/")
    if leaf == "weight":
        leaf = {4: "kernel", 2: "embedding", 1: "scale"}.get(ndim, leaf)
    elif leaf != "bias":
        return None
    return (*path, leaf)


def _flax_path(name: str, levels: int, blocks: int) -> tuple[str, ...] | None:
    """The original Flax tree's auto-numbered names (`ResBlock_7`, `Conv_2`) → our path."""
    parts = name.split("/")
    if parts[:2] == ["quantizer", "codebook"] and len(parts) == 2:
        return ("quantize", "embedding", "embedding")
    if len(parts) < 3 or parts[0] not in ("encoder", "decoder"):
        return None
    top, module, rest = parts[0], parts[1], parts[2:]
    kind, _, number = module.rpartition("_")
    if not number.isdigit():
        return None
    k = int(number)
    if kind == "ResBlock" and len(rest) == 2 and rest[0] in _RES_BLOCK_PARTS:
        if top == "encoder":
            stage = (f"down_{k // blocks}", f"block_{k % blocks}") if k < levels * blocks \
                else ("mid", f"block_{k - levels * blocks}")
        else:
            stage = ("mid", f"block_{k}") if k < blocks \
                else (f"up_{levels - 1 - (k - blocks) // blocks}", f"block_{(k - blocks) % blocks}")
        return (top, *stage, _RES_BLOCK_PARTS[rest[0]], rest[1])
    if len(rest) != 1:
        return None
    if module == "GroupNorm_0":
        return (top, "norm_out", rest[0])
    if kind == "Conv":
        last = 1 if top == "encoder" else levels
        if k in (0, last):
            return (top, "conv_in" if k == 0 else "conv_out", rest[0])
        if top == "decoder" and 0 < k < levels:
            return (top, f"up_{levels - k}", "upsample", "conv", rest[0])
    return None
