"""VQModel: a tokenizer's Flax module with its parameters, vqgan-jax's `VQModel` surface
(`from_pretrained`, `encode`, `decode`, `decode_code`) and the uint8 helpers.

Every family goes through it: the module comes from `vqgan.module_from_config` (dispatching on
the config's family). Pixel values go in and come out in the checkpoint's own range (no hidden
scaling); `encode_images`/`decode_images` apply the range.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoints, conversion
from .config import VQGANConfig
from .layers import Dtype
from .quantizers import nearest_codes as nearest_codes  # re-exported: model/train_demo.py
from .vqgan import VQGAN as VQGAN  # re-exported, with the module helpers, for callers here
from .vqgan import Decoder as Decoder
from .vqgan import Encoder as Encoder
from .vqgan import init_params, module_from_config, param_shapes

__all__ = ["VQGAN", "Decoder", "Encoder", "VQModel", "check_codes", "decode_uint8",
           "encode_uint8", "init_params", "module_from_config", "nearest_codes", "param_shapes",
           "to_model_range", "to_uint8"]


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


def encode_uint8(module: Any, value_range, params, images: jax.Array) -> jax.Array:
    """uint8 [B,H,W,C] → int32 codes [B,h*w]: scaling and encoding in one device program."""
    _, indices = module.apply({"params": params}, to_model_range(images, value_range),
                              method="encode")
    return indices


def decode_uint8(module: Any, value_range, grid, params, codes: jax.Array) -> jax.Array:
    """int codes [B,h*w] → uint8 [B,H,W,C]."""
    pixels = module.apply({"params": params}, codes.astype(jnp.int32), grid,
                          method="decode_code")
    return to_uint8(pixels, value_range)


class VQModel:
    """A VQGAN with its parameters: `from_pretrained`, `encode`, `decode`, `decode_code`.

    Same calls as vqgan-jax's `VQModel` (its scripts work with only the import changed);
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
        self._encode = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method="encode"))
        self._decode = jax.jit(lambda p, z: self.module.apply({"params": p}, z, method="decode"))
        self._decode_code = jax.jit(
            lambda p, c: self.module.apply({"params": p}, c, method="decode_code")
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
        filename: str | None = None,
        family: str | None = None,
        **unused: Any,
    ) -> VQModel | tuple[VQModel, dict]:
        """Load a Hub repo id (e.g. "flax-community/vqgan_f16_16384") or a local directory, or a
        published checkpoint file: a local path, or a Hub repo id with `filename=` (e.g.
        "FoundationVision/LlamaGen", filename="vq_ds16_c2i.pt"), converted once into a cache
        (`family=` forces the family; see `convert_checkpoint`). The weights digest of a
        published file is the file's own sha256.

        `_do_init=False` returns `(model, params)` as vqgan-jax/transformers do.
        """
        if unused:
            import logging

            logging.getLogger(__name__).debug("ignoring from_pretrained arguments %s", sorted(unused))
        directory, source = locate_pretrained(
            name_or_path, revision=revision, filename=filename, family=family,
            cache_dir=cache_dir, token=token, local_files_only=local_files_only,
        )
        config = checkpoints.load_config(directory, name=source.name)
        if value_range is not None:
            config = config.replace(value_range=tuple(value_range))
        weights = checkpoints.weights_file(directory)
        params = checkpoints.read_params(weights, functools.partial(param_shapes, config),
                                         config=config)
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
        return (f"VQModel({self.name or 'in-memory'}, {self.config.family}, "
                f"codebook={self.config.n_embed}, "
                f"f={self.config.downsample_factor}, dtype={self.dtype.name})")


# File name endings of the published checkpoints that from_pretrained converts.
_PUBLISHED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def locate_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    filename: str | None = None,
    family: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, checkpoints.CheckpointSource]:
    """The model directory `from_pretrained` reads for a Hub repo, a local directory or a
    published checkpoint file (converted once into a cache), and where its weights came from
    (name, Hub commit, the file read, its digest: for a published file, the file's own)."""
    hub = dict(revision=revision, cache_dir=cache_dir, token=token,
               local_files_only=local_files_only)
    published = _published_file(name_or_path, filename, **hub)
    if published is None:
        directory, commit = checkpoints.resolve(name_or_path, **hub)
        file = checkpoints.weights_file(directory)
        name, digest = str(name_or_path), checkpoints.file_digest(file)
    else:
        name, file, commit, origin = published
        digest = checkpoints.file_digest(file)
        root = (Path(cache_dir) / "vqgan_datasets-converted" if cache_dir is not None
                else _default_conversion_cache())
        directory = conversion.converted_directory(file, root, digest, family=family,
                                                   source=origin)
    return directory, checkpoints.CheckpointSource(
        name=name, revision=commit, weights_file=str(file.resolve()), weights_digest=digest)


def _published_file(name_or_path: Any, filename: str | None, **hub: Any
                    ) -> tuple[str, Path, str | None, dict] | None:
    """(name to record, local file, Hub commit, origin) when `from_pretrained` was given a
    published checkpoint file; None for a model directory or repo."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if filename is None:
        if path.is_file() and name.endswith(_PUBLISHED_SUFFIXES):
            return name, path, None, {"repo_id": None, "filename": path.name}
        parts = name.split("/")
        if (len(parts) < 3 or not name.endswith(_PUBLISHED_SUFFIXES) or path.exists()
                or name.startswith(("/", ".", "~"))):
            return None
        name, filename = "/".join(parts[:2]), "/".join(parts[2:])  # "org/repo/file.pt"
    if path.is_dir():
        file = path / filename
        if not file.is_file():
            raise checkpoints.CheckpointError(f"{path}: no file {filename!r}")
        return str(file), file, None, {"repo_id": None, "filename": filename}
    file, commit = checkpoints.fetch_file(name, filename, **hub)
    return f"{name}/{filename}", file, commit, {"repo_id": name, "filename": filename}


def _default_conversion_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "vqgan_datasets" / "converted"


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
