"""webdataset: encode/decode pipeline stages, and resumable shard-to-shard tokenization.

Four parts, each a few functions:

- stages: `encode_samples` / `decode_samples` are plain generators over webdataset samples (dicts
  with `__key__`, `__url__` and one field per file extension); `encode(...)` / `decode(...)`
  wrap them in small picklable callables for `DataPipeline(...)` and `WebDataset(...).compose`.
  Batching, padding and prefetch across all local devices are the engine's; a stage only maps
  samples to images and keys and puts every other field back, in input order.
- failures: one policy for every bad sample (`on_error="raise" | "skip" | "null"`, or a
  webdataset `handler=`); every message names the sample's key and shard, and `StageStats`
  counts what happened.
- reading shards: `open_url` opens local paths, `pipe:` commands and gopen's schemes through
  webdataset, and any other `scheme://` URL through fsspec.
- `tokenize_shards`: one output tar per input shard, written to a temporary name and renamed;
  then a `<shard>.stats.json` written last, which is the completion marker a rerun looks for.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from .images import ImageDecodeError, OnError
from .metadata import METADATA_KEY, TokenizerSpec
from .modeling import VQModel

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "Manifest",
    "SampleError",
    "ShardReadError",
    "ShardReport",
    "Stage",
    "StageStats",
    "decode",
    "decode_samples",
    "encode",
    "encode_samples",
    "expand_urls",
    "open_url",
    "read_shard",
    "register_fsspec",
    "tokenize_shards",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp;ppm;bmp;tif;tiff"
STATS_SUFFIX = ".stats.json"
MANIFEST_NAME = "manifest.json"
MAX_REPORTED_ERRORS = 100  # per shard / per stage; the counts stay exact beyond it
_ON_ERROR = ("raise", "skip", "null")
_IMAGE_FORMATS = ("pil", "numpy", "png", "jpeg", "webp")

# Called as hook(url, samples_written) after every sample tokenize_shards writes. Tests use it to
# slow a run down and kill it mid-shard; nothing in the library sets it.
_after_sample_hook: Callable[[str, int], None] | None = None


# ------------------------------------------------------------------------------ errors, stats


class SampleError(ImageDecodeError):
    """One webdataset sample could not be encoded or decoded: `.key`, `.url` (shard), `.reason`."""

    def __init__(self, reason: str, key: object = None, url: str | None = None):
        self.reason = reason
        self.key = key
        self.url = url
        where = f"sample {key!r}" if key is not None else "sample"
        if url:
            where += f" of shard {url}"
        ValueError.__init__(self, f"{where}: {reason}")

    def __reduce__(self):
        return type(self), (self.reason, self.key, self.url)


class ShardReadError(OSError):
    """A shard could not be opened or read as a tar stream (missing, truncated, not a tar)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"cannot read shard {url}: {reason}")

    def __reduce__(self):
        return type(self), (self.url, self.reason)


@dataclasses.dataclass
class StageStats:
    """What a stage did with its samples; `errors` keeps the first MAX_REPORTED_ERRORS failures."""

    samples_in: int = 0
    encoded: int = 0
    decoded: int = 0
    skipped: int = 0  # dropped: on_error="skip", or a handler that returned True
    failed: int = 0  # kept as nulls (on_error="null"), raised, or stopped the stream
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors_not_listed: int = 0

    def record(self, error: SampleError) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"key": _jsonable_key(error.key), "reason": error.reason})
        else:
            self.errors_not_listed += 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _jsonable_key(key: object) -> object:
    return key if isinstance(key, (str, int, float)) or key is None else repr(key)


_KEEP, _DROP, _STOP = "keep", "drop", "stop"


@dataclasses.dataclass(frozen=True)
class _Policy:
    on_error: str = "raise"
    handler: Callable[[Exception], bool] | None = None

    def __post_init__(self) -> None:
        if self.on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {self.on_error!r}")
        if self.handler is not None and not callable(self.handler):
            raise TypeError(f"handler must be callable, got {type(self.handler).__name__}")

    def apply(self, error: SampleError, stats: StageStats) -> str:
        """Count the failure and decide: keep the sample as a null, drop it, or stop; or raise.

        A webdataset handler, when given, decides instead of on_error: True drops the sample
        and goes on, False stops the stream, an exception propagates.
        """
        stats.record(error)
        if self.handler is not None:
            try:
                go_on = self.handler(error)
            except BaseException:
                stats.failed += 1
                raise
            if go_on:
                stats.skipped += 1
                return _DROP
            stats.failed += 1
            return _STOP
        if self.on_error == "skip":
            stats.skipped += 1
            logger.debug("skipping %s", error)
            return _DROP
        stats.failed += 1
        if self.on_error == "raise":
            raise error
        return _KEEP


def _log_stream_summary(stats: StageStats, what: str) -> None:
    if stats.skipped or stats.failed:
        first = stats.errors[0]["reason"] if stats.errors else "?"
        logger.warning(
            "%s: %d of %d samples skipped, %d failed (first: %s); StageStats.errors lists them",
            what, stats.skipped, stats.samples_in, stats.failed, first,
        )


# ------------------------------------------------------------------------------ model handles


class _ModelRef:
    """A VQModel that pickles as a small reference to its checkpoint, not as jitted functions.

    Stages travel to DataLoader workers by pickle; VQModel holds jax.jit objects that cannot be
    pickled. A model loaded from a checkpoint pickles as (directory, dtype, value range, weights
    digest) and is reloaded once per process; an in-memory model pickles its config and
    parameters as numpy arrays.
    """

    def __init__(self, model: VQModel | str | os.PathLike):
        if isinstance(model, VQModel):
            self._model: VQModel | None = model
            self._ref: dict[str, Any] | None = None
        elif isinstance(model, (str, os.PathLike)):
            self._model = None
            self._ref = {"path": os.fspath(model)}
        else:
            raise TypeError(
                f"model must be a VQModel or a checkpoint path / Hub id, got {type(model).__name__}"
            )

    @property
    def model(self) -> VQModel:
        if self._model is None:
            self._model = _load_model(self._ref)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": self._ref if self._ref is not None else _model_reference(self._model)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._ref = state["ref"]
        self._model = None


def _model_reference(model: VQModel) -> dict[str, Any]:
    source = model.source
    common = {
        "dtype": model.dtype.name,
        "value_range": list(model.config.value_range),
        "digest": model.weights_digest,
    }
    if source is not None and source.weights_file:
        return {"path": os.path.dirname(source.weights_file), **common}
    import jax

    params = jax.tree_util.tree_map(np.asarray, model.params)
    return {"config": model.config.to_dict(), "params": params, **common}


_LOADED: dict[str, VQModel] = {}
_LOADED_LOCK = threading.Lock()


def _load_model(ref: dict[str, Any]) -> VQModel:
    from .config import VQGANConfig

    cache_key = json.dumps({k: v for k, v in ref.items() if k != "params"}, sort_keys=True)
    with _LOADED_LOCK:
        model = _LOADED.get(cache_key)
        if model is not None:
            return model
        if "params" in ref:
            model = VQModel(VQGANConfig.from_dict(ref["config"]), ref["params"], dtype=ref["dtype"])
        else:
            kwargs = {k: ref[k] for k in ("dtype",) if k in ref}
            if "value_range" in ref:
                kwargs["value_range"] = tuple(ref["value_range"])
            model = VQModel.from_pretrained(ref["path"], **kwargs)
        digest = ref.get("digest")
        if digest is not None and model.weights_digest != digest:
            raise ValueError(
                f"the weights at {ref.get('path', 'the pickled parameters')} changed since this "
                f"stage was made ({digest} then, {model.weights_digest} now)"
            )
        _LOADED[cache_key] = model
        return model


def _as_model(model: VQModel | str | os.PathLike) -> VQModel:
    return _ModelRef(model).model


# ------------------------------------------------------------------------------ sample fields


def _parse_keys(keys: str | Sequence[str], what: str) -> tuple[str, ...]:
    parts = keys.split(";") if isinstance(keys, str) else list(keys)
    parts = tuple(p.strip().lstrip(".") for p in parts if p and p.strip())
    if not parts:
        raise ValueError(f"{what} names no field")
    return parts


def _find_field(sample: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if sample.get(name) is not None:
            return name
    lowered = {k.lower(): k for k in sample if isinstance(k, str) and not k.startswith("__")}
    for name in names:
        actual = lowered.get(name.lower())
        if actual is not None and sample[actual] is not None:
            return actual
    return None


def _fields(sample: dict) -> str:
    names = sorted(k for k in sample if isinstance(k, str) and not k.startswith("__"))
    return ", ".join(names) if names else "none"


def _sample_key(sample: dict, index: int) -> object:
    key = sample.get("__key__")
    return key if key is not None else index


def _check_sample(sample: object, index: int, stage: str) -> dict:
    if not isinstance(sample, dict):
        raise TypeError(
            f"the {stage} stage expects webdataset samples (dicts of fields), got "
            f"{type(sample).__name__} at position {index}; put it before to_tuple/batched"
        )
    return sample


class _NoImage:
    """Goes to the engine in place of a sample without an image, so that the failure keeps its
    place in the stream (the engine reports it as unreadable; our own reason replaces that)."""

    __slots__ = ()


_NO_IMAGE = _NoImage()


# ------------------------------------------------------------------------------ encode stage


@dataclasses.dataclass(frozen=True)
class _EncodeOptions:
    image_keys: tuple[str, ...]
    output_key: str
    image_size: int | None
    keep_image: bool
    error_key: str
    token_dtype: str | None
    draft: bool
    policy: _Policy


def encode_samples(
    src: Iterable[dict],
    model: VQModel | str,
    *,
    image_key: str | Sequence[str] = DEFAULT_IMAGE_KEY,
    output_key: str = "vqgan.npy",
    image_size: int | None = None,
    on_error: OnError = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int = 8,
    keep_image: bool = True,
    error_key: str = "vqgan_error",
    token_dtype: str | None = None,
    draft: bool = True,
    stats: StageStats | None = None,
) -> Iterator[dict]:
    """Samples with an image field (encoded bytes, PIL or array) → the same samples plus tokens.

    The first field of `image_key` ("jpg;png;...") present is the image. `output_key` gets the
    tokens (1-D, h*w, raster order, the smallest unsigned dtype holding the codebook unless
    `token_dtype` says otherwise). Every other field, `__key__` and `__url__` are kept;
    `keep_image=False` drops the image fields. Order is kept and the last, incomplete batch is
    encoded too. `batch_size` is per device. Bad samples follow `on_error` (or `handler`).
    """
    model = _as_model(model)
    from .engine import get_engine

    options = _EncodeOptions(
        image_keys=_parse_keys(image_key, "image_key"),
        output_key=output_key,
        image_size=image_size,
        keep_image=keep_image,
        error_key=error_key,
        token_dtype=token_dtype,
        draft=draft,
        policy=_Policy(on_error, handler),
    )
    own = StageStats() if stats is None else stats
    engine = get_engine(model, batch_size=batch_size)
    try:
        yield from _encode_stream(src, engine, options, own)
    finally:
        _log_stream_summary(own, "vqgan encode stage")


def _encode_stream(src: Iterable[dict], engine, opts: _EncodeOptions, stats: StageStats):
    size = opts.image_size or engine.config.resolution
    dtype = np.dtype(opts.token_dtype or engine.config.token_dtype)
    if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < engine.config.n_embed - 1:
        raise ValueError(f"token_dtype {dtype} cannot hold ids up to {engine.config.n_embed - 1}")
    image_fields = {k.lower() for k in opts.image_keys}
    looked_for = ", ".join("." + k for k in opts.image_keys)
    # (sample, index, error reason or None), in input order; the engine reads at most a few
    # batches ahead of us, so this stays short.
    pending: collections.deque = collections.deque()

    def images():
        for index, sample in enumerate(src):
            _check_sample(sample, index, "encode")
            field = _find_field(sample, opts.image_keys)
            if field is None:
                reason = f"no image field; looked for {looked_for} (fields: {_fields(sample)})"
                pending.append((sample, index, reason))
                yield _NO_IMAGE
            else:
                pending.append((sample, index, None))
                yield sample[field]

    results = engine.encode_iter(images(), image_size=size, on_error="null", draft=opts.draft)
    try:
        for result in results:
            sample, index, reason = pending.popleft()
            stats.samples_in += 1
            if reason is None and result.tokens is not None:
                stats.encoded += 1
                out = _without(sample, image_fields if not opts.keep_image else (), opts.error_key)
                out[opts.output_key] = result.tokens.astype(dtype)
                yield out
                continue
            error = SampleError(reason or result.error or "unknown error",
                                _sample_key(sample, index), sample.get("__url__"))
            action = opts.policy.apply(error, stats)
            if action == _STOP:
                return
            if action == _KEEP:
                out = _without(sample, image_fields if not opts.keep_image else (),
                               opts.output_key)
                out[opts.error_key] = error.reason
                yield out
    finally:
        results.close()


def _without(sample: dict, fields: Iterable[str], *extra: str) -> dict:
    drop = set(fields)
    return {
        k: v for k, v in sample.items()
        if k not in extra and not (isinstance(k, str) and k.lower() in drop)
    }


class Stage:
    """A picklable pipeline stage: `stage(samples)` runs `function(samples, model, **kwargs)`.

    Made by `encode(...)` and `decode(...)`. The model pickles as a reference to its checkpoint
    (see _ModelRef), so a stage can go to DataLoader workers; start those with the "spawn"
    method, since a process forked after JAX started can deadlock. `stats` accumulates over
    every stream the stage has processed in this process.
    """

    def __init__(self, function: Callable[..., Iterator[dict]], model: VQModel | str,
                 **kwargs: Any) -> None:
        self.function = function
        self._model = _ModelRef(model)
        self.kwargs = kwargs
        self.stats = StageStats()

    @property
    def model(self) -> VQModel:
        return self._model.model

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return self.function(src, self.model, stats=self.stats, **self.kwargs)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"Stage({self.function.__name__}, {options})"


def encode(
    model: VQModel | str,
    *,
    image_key: str | Sequence[str] = DEFAULT_IMAGE_KEY,
    output_key: str = "vqgan.npy",
    image_size: int | None = None,
    on_error: OnError = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int = 8,
    keep_image: bool = True,
    error_key: str = "vqgan_error",
    token_dtype: str | None = None,
    draft: bool = True,
) -> Stage:
    """The encode stage for `DataPipeline(..., encode(model))` or `WebDataset(url).compose(...)`."""
    _Policy(on_error, handler)  # fail now, not at the first sample of the first epoch
    _parse_keys(image_key, "image_key")
    return Stage(
        encode_samples, model, image_key=image_key, output_key=output_key, image_size=image_size,
        on_error=on_error, handler=handler, batch_size=batch_size, keep_image=keep_image,
        error_key=error_key, token_dtype=token_dtype, draft=draft,
    )


# ------------------------------------------------------------------------------ decode stage


@dataclasses.dataclass(frozen=True)
class _DecodeOptions:
    input_key: str
    output_key: str
    output_format: str
    keep_tokens: bool
    grid: tuple[int, int] | None
    error_key: str
    policy: _Policy


def decode_samples(
    src: Iterable[dict],
    model: VQModel | str,
    *,
    input_key: str = "vqgan.npy",
    output_key: str = "png",
    output_format: str = "pil",
    keep_tokens: bool = True,
    grid: tuple[int, int] | None = None,
    on_error: OnError = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int = 8,
    error_key: str = "vqgan_error",
    stats: StageStats | None = None,
) -> Iterator[dict]:
    """Samples with tokens (an integer array, or undecoded .npy bytes) → the same plus an image.

    `output_format`: "pil" (PIL image), "numpy" (uint8 HWC), or "png" / "jpeg" / "webp"
    (encoded bytes, written unchanged by TarWriter). One token grid per stream: square unless
    `grid=(h, w)`. Bad token arrays (wrong dtype, length or ids) follow `on_error`.
    """
    model = _as_model(model)
    from .engine import get_engine

    if output_format not in _IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {_IMAGE_FORMATS}, got {output_format!r}")
    options = _DecodeOptions(
        input_key=input_key,
        output_key=output_key,
        output_format=output_format,
        keep_tokens=keep_tokens,
        grid=None if grid is None else (int(grid[0]), int(grid[1])),
        error_key=error_key,
        policy=_Policy(on_error, handler),
    )
    own = StageStats() if stats is None else stats
    engine = get_engine(model, batch_size=batch_size)
    try:
        yield from _decode_stream(src, engine, options, own)
    finally:
        _log_stream_summary(own, "vqgan decode stage")


def _read_tokens(sample: dict, key: str, length: int | None, codebook: int):
    """(int32 tokens, None) or (None, why not)."""
    value = sample.get(key)
    if value is None:
        return None, f"no token field .{key} (fields: {_fields(sample)})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
        except Exception as e:
            return None, f"cannot read .{key} as a .npy array: {type(e).__name__}: {e}"
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2) or not array.size:
        return None, f".{key} holds {array.dtype} {array.shape}, not integer token ids [h*w]"
    array = array.reshape(-1)
    if length is not None and array.size != length:
        return None, f".{key} holds {array.size} tokens, expected {length} (one grid per stream)"
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= codebook:
        bad = low if low < 0 else high
        return None, f".{key} holds token id {bad}, outside the codebook [0, {codebook})"
    return array.astype(np.int32, copy=False), None


def _decode_stream(src: Iterable[dict], engine, opts: _DecodeOptions, stats: StageStats):
    codebook = engine.config.n_embed
    length = None if opts.grid is None else opts.grid[0] * opts.grid[1]
    source = enumerate(src)

    def fail(sample: dict, index: int, reason: str):
        stats.samples_in += 1
        error = SampleError(reason, _sample_key(sample, index), sample.get("__url__"))
        action = opts.policy.apply(error, stats)
        if action == _KEEP:
            out = _without(sample, (), opts.output_key)
            if not opts.keep_tokens:
                out.pop(opts.input_key, None)
            out[opts.error_key] = error.reason
            return action, out
        return action, None

    # Failures before the first good sample go out at once: until then the token length, and so
    # the placeholder that keeps later failures in their place, is unknown.
    first = None
    for index, sample in source:
        _check_sample(sample, index, "decode")
        tokens, reason = _read_tokens(sample, opts.input_key, length, codebook)
        if reason is None:
            first = (index, sample, tokens)
            length = tokens.size
            break
        action, out = fail(sample, index, reason)
        if action == _STOP:
            return
        if out is not None:
            yield out
    if first is None:
        return
    placeholder = np.zeros(length, np.int32)  # decoded and thrown away: keeps the order simple
    pending: collections.deque = collections.deque()

    def codes():
        index, sample, tokens = first
        pending.append((sample, index, None))
        yield tokens
        for index, sample in source:
            _check_sample(sample, index, "decode")
            tokens, reason = _read_tokens(sample, opts.input_key, length, codebook)
            pending.append((sample, index, reason))
            yield placeholder if reason is not None else tokens

    results = engine.decode_iter(codes(), grid=opts.grid)
    try:
        for result in results:
            sample, index, reason = pending.popleft()
            if reason is not None:
                action, out = fail(sample, index, reason)
                if action == _STOP:
                    return
                if out is not None:
                    yield out
                continue
            stats.samples_in += 1
            stats.decoded += 1
            out = _without(sample, (), opts.error_key)
            if not opts.keep_tokens:
                out.pop(opts.input_key, None)
            out[opts.output_key] = _convert_image(result.image, opts.output_format)
            yield out
    finally:
        results.close()


def _convert_image(image: np.ndarray, output_format: str):
    if output_format == "numpy":
        return image
    from PIL import Image

    pil = Image.fromarray(image)
    if output_format == "pil":
        return pil
    buffer = io.BytesIO()
    options = {"quality": 95} if output_format in ("jpeg", "webp") else {}
    pil.save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


def decode(
    model: VQModel | str,
    *,
    input_key: str = "vqgan.npy",
    output_key: str = "png",
    output_format: str = "pil",
    keep_tokens: bool = True,
    grid: tuple[int, int] | None = None,
    on_error: OnError = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int = 8,
    error_key: str = "vqgan_error",
) -> Stage:
    """The decode stage (tokens → images) for `DataPipeline` or `WebDataset(...).compose(...)`."""
    _Policy(on_error, handler)
    if output_format not in _IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {_IMAGE_FORMATS}, got {output_format!r}")
    return Stage(
        decode_samples, model, input_key=input_key, output_key=output_key, output_format=output_format,
        keep_tokens=keep_tokens, grid=grid, on_error=on_error, handler=handler,
        batch_size=batch_size, error_key=error_key,
    )


# ------------------------------------------------------------------------------ reading shards


def expand_urls(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from brace patterns ("a/{000..009}.tar"), "::"-joined lists, or a list."""
    import braceexpand

    if isinstance(inputs, (str, os.PathLike)):
        parts = os.fspath(inputs).split("::")
    else:
        parts = [os.fspath(p) for p in inputs]
    urls = [url for part in parts if part for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"no input shards in {inputs!r}")
    return urls


def _scheme(url: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


def _gopen_handles(url: str) -> bool:
    from webdataset.gopen import gopen_schemes

    if url.startswith("pipe:") or url == "-":
        return True
    scheme = _scheme(url)
    return scheme in ("", "file") or scheme in gopen_schemes


def open_url(url: str) -> BinaryIO:
    """A readable binary stream: local paths, file://, pipe:, webdataset's schemes, else fsspec."""
    try:
        if _gopen_handles(url):
            from webdataset.gopen import gopen

            return gopen(url, "rb")
        import fsspec

        return fsspec.open(url, "rb").open()
    except Exception as e:
        raise ShardReadError(url, f"{type(e).__name__}: {e}") from e


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec(*schemes: str) -> None:
    """Let webdataset's own readers (WebDataset, tarfile_to_samples) open these URL schemes
    through fsspec, e.g. register_fsspec("s3", "memory"). Changes webdataset's global table, so
    it is the caller's explicit choice; tokenize_shards does not need it."""
    from webdataset.gopen import gopen_schemes

    for scheme in schemes:
        gopen_schemes[scheme.rstrip(":/")] = _gopen_fsspec


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one tar shard (raw bytes per field, `__key__`, `__url__`), in tar order.

    Any failure to open or read the tar stream raises ShardReadError naming the url.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_url(url)

    def reraise(exn: Exception) -> bool:
        raise exn

    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise)
        yield from group_by_keys(files, handler=reraise)
    except ShardReadError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:
        reason = str(e.args[0]) if e.args else type(e).__name__
        raise ShardReadError(url, f"{type(e).__name__}: {reason}") from e
    finally:
        with contextlib.suppress(Exception):
            stream.close()


# ------------------------------------------------------------------------------ output files
# Output paths are local paths (file:// already stripped) or fsspec URLs (s3://, memory://...).


def _is_local(path: str) -> bool:
    return not _scheme(path)


def _fs(path: str):
    import fsspec.core

    return fsspec.core.url_to_fs(path)


def _split(path: str) -> tuple[str, str]:
    return os.path.split(path) if _is_local(path) else posixpath.split(path)


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name) if _is_local(directory) else f"{directory.rstrip('/')}/{name}"


def _remove(path: str) -> None:
    if _is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner)


def _makedirs(directory: str) -> None:
    if _is_local(directory):
        os.makedirs(directory or ".", exist_ok=True)
    else:
        fs, inner = _fs(directory)
        fs.makedirs(inner, exist_ok=True)


def _list_names(directory: str) -> set[str]:
    """File names in `directory`, listed once per run: one listing instead of a stat (or, on
    object stores, a request) per shard."""
    if _is_local(directory):
        return set(os.listdir(directory or "."))
    fs, inner = _fs(directory)
    return {posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)}


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


@contextlib.contextmanager
def _atomic_write(final: str):
    """Yields a binary file; on success the bytes are on disk (fsync) and renamed to `final`.

    On failure the temporary file is removed. A reader never sees a partial `final`: a crash
    leaves at most a hidden `.<name>.tmp-*` file, which the next run removes.
    """
    directory, name = _split(final)
    temp = _join(directory, f"{_temp_prefix(name)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if _is_local(final):
            with open(temp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
            _fsync_dir(directory)
        else:
            fs, inner = _fs(temp)
            with fs.open(inner, "wb") as f:
                yield f
            fs.mv(inner, _fs(final)[1])
    except BaseException:
        with contextlib.suppress(Exception):
            _remove(temp)
        raise


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is; not possible on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(final: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    with _atomic_write(final) as f:
        f.write(text.encode("utf-8"))


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        if _is_local(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        fs, inner = _fs(path)
        with fs.open(inner, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ tokenize_shards


@dataclasses.dataclass
class ShardReport:
    """One input shard: where it went and what happened to its samples."""

    url: str
    output: str
    stats_path: str
    status: str  # "written" (this run), "finished" (by an earlier run), "failed"
    samples_in: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: str | None = None  # why the whole shard failed (status "failed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Manifest:
    """The result of tokenize_shards on this process: every shard it owns, and totals."""

    output: str
    shards: list[ShardReport]
    spec: dict[str, Any]
    process_index: int = 0
    process_count: int = 1
    worker_index: int = 0
    worker_count: int = 1
    seconds: float = 0.0
    path: str | None = None  # where manifest JSON was written

    @property
    def written(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "written"]

    @property
    def finished(self) -> list[ShardReport]:
        """Shards an earlier run completed; left as they were."""
        return [s for s in self.shards if s.status == "finished"]

    @property
    def failed_shards(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "failed"]

    @property
    def totals(self) -> dict[str, int]:
        """Sample counts over every completed shard (written now or before)."""
        done = [s for s in self.shards if s.status != "failed"]
        return {name: sum(getattr(s, name) for s in done)
                for name in ("samples_in", "encoded", "skipped", "failed")}

    @property
    def images_per_second(self) -> float:
        encoded = sum(s.encoded for s in self.written)
        return encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "worker_index": self.worker_index,
            "worker_count": self.worker_count,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "shards_written": len(self.written),
            "shards_finished_before": len(self.finished),
            "shards_failed": len(self.failed_shards),
            "totals": self.totals,
            METADATA_KEY: self.spec,
            "shards": [s.to_dict() for s in self.shards],
        }


def _shard_stem(url: str, index: int) -> str:
    """The input's file name without .tar/.tgz/.tar.gz; for pipe: commands, the last tar name."""
    names = re.findall(r"([^\s/|<>;'\"]+)\.(?:tar\.gz|tgz|tar)(?=$|[\s'\";|?#])", url)
    if names:
        return names[-1]
    base = posixpath.basename(url.split("?")[0].rstrip("/"))
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", base)
    return stem if stem and not url.startswith("pipe:") else f"{index:05d}"


def _output_path(output: str, url: str, index: int) -> str:
    stem = _shard_stem(url, index)
    if "{shard" in output or "{index" in output:
        return output.format(shard=stem, index=index)
    return _join(output, stem + ".tar")


def _stats_path(output_file: str) -> str:
    return re.sub(r"\.tar$", "", output_file) + STATS_SUFFIX


def _output_dir(output: str) -> str:
    """Where the manifest goes: the directory, or a pattern's directory before any field."""
    return _split(output.split("{", 1)[0])[0] if "{" in output else output


def _assign(count: int, process: tuple[int, int], worker: tuple[int, int]) -> list[int]:
    """Shard i goes to process i % P; within a process, its j-th shard to worker j % W."""
    p_index, p_count = process
    w_index, w_count = worker
    mine = [i for i in range(count) if i % p_count == p_index]
    return mine[w_index::w_count]


def _check_split(name: str, index: int, count: int) -> tuple[int, int]:
    if isinstance(index, bool) or isinstance(count, bool) or count < 1 or not 0 <= index < count:
        raise ValueError(f"{name}_index must be in [0, {name}_count); got {index} of {count}")
    return int(index), int(count)


def _torch_worker() -> tuple[int, int]:
    """(id, count) inside a torch DataLoader worker, else (0, 1). Only looks if torch is already
    imported: a process that never imported torch is not one of its workers."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (int(info.id), int(info.num_workers)) if info is not None else (0, 1)


def tokenize_shards(
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    model: VQModel | str,
    image_size: int | None = None,
    image_key: str | Sequence[str] = DEFAULT_IMAGE_KEY,
    output_key: str = "vqgan.npy",
    keep_image: bool = False,
    on_error: OnError = "skip",
    error_key: str = "vqgan_error",
    batch_size: int = 8,
    draft: bool = True,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_index: int | None = None,
    worker_count: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Tokenize tar shards into tar shards: one output per input, same keys, tokens as .npy.

    `output` is a directory (outputs keep the input's file name, e.g. `00042.tar`) or a pattern
    with `{shard}` (the input's name without .tar) and/or `{index}` (its position in the input
    list). Each output is renamed into place when complete, then `<name>.stats.json` is written;
    a rerun skips shards whose stats and tar both exist, so a killed run resumes with every
    sample written exactly once. Shards are split across JAX processes (shard i to process
    i % count) and then across torch DataLoader workers, unless the arguments say otherwise.
    A shard that cannot be read raises under on_error="raise", else it is reported as failed
    (no stats, so a rerun retries it) and the others go on.
    """
    started = time.monotonic()
    model = _as_model(model)
    policy = _Policy(on_error)
    spec = TokenizerSpec.from_model(model, image_size)
    output = re.sub(r"^file://", "", os.fspath(output))
    urls = expand_urls(inputs)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if worker_index is None or worker_count is None:
        detected = _torch_worker()
        worker_index = detected[0] if worker_index is None else worker_index
        worker_count = detected[1] if worker_count is None else worker_count
    process = _check_split("process", process_index, process_count)
    worker = _check_split("worker", worker_index, worker_count)

    outputs = [_output_path(output, url, i) for i, url in enumerate(urls)]
    clashes = [o for o, n in collections.Counter(outputs).items() if n > 1]
    if clashes:
        raise ValueError(
            f"several input shards map to the output {clashes[0]!r}; use a pattern with "
            "{index} (e.g. 'out/{index:05d}.tar') or inputs with distinct file names"
        )
    mine = _assign(len(urls), process, worker)
    directory = _output_dir(output)
    _makedirs(directory)
    listings: dict[str, set[str]] = {}  # output folder → names in it when the run started
    for i in mine:
        folder = _split(outputs[i])[0]
        if folder not in listings:
            _makedirs(folder)
            listings[folder] = _list_names(folder)

    options = _EncodeOptions(
        image_keys=_parse_keys(image_key, "image_key"), output_key=output_key,
        image_size=spec.image_size, keep_image=keep_image, error_key=error_key,
        token_dtype=spec.token_dtype, draft=draft, policy=policy,
    )
    settings = {"image_key": ";".join(options.image_keys), "output_key": output_key,
                "keep_image": keep_image, "on_error": on_error, "error_key": error_key}
    # Every finished shard is checked before anything is written: a mismatch must stop the run
    # before it adds a single shard made with other settings.
    finished = {} if overwrite else {
        i: _finished(urls[i], outputs[i], listings[_split(outputs[i])[0]], spec, settings)
        for i in mine
    }
    reports: list[ShardReport] = []
    engine = None

    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="img", desc=f"tokenize 0/{len(mine)} shards", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for done, i in enumerate(mine):
            url, target = urls[i], outputs[i]
            report = finished.get(i)
            if report is None:
                if engine is None:  # compiled only when there is work: a no-op rerun is quick
                    from .engine import get_engine

                    engine = get_engine(model, batch_size=batch_size)
                report = _convert_shard(url, target, listings[_split(target)[0]], engine,
                                        options, spec, settings, bar)
            reports.append(report)
            bar.set_description_str(f"tokenize {done + 1}/{len(mine)} shards")
    finally:
        bar.close()

    manifest = Manifest(
        output=output, shards=reports, spec=spec.to_dict(), process_index=process[0],
        process_count=process[1], worker_index=worker[0], worker_count=worker[1],
        seconds=time.monotonic() - started,
    )
    name = MANIFEST_NAME if process[1] * worker[1] == 1 else (
        f"manifest-{process[0]:05d}-of-{process[1]:05d}-worker-{worker[0]:03d}.json"
    )
    manifest.path = _join(directory, name)
    _write_json(manifest.path, manifest.to_dict())
    _log_summary(manifest)
    return manifest


def _finished(url: str, target: str, names: set[str], spec: TokenizerSpec,
              settings: dict[str, Any]) -> ShardReport | None:
    """The report of a shard an earlier run completed (stats JSON and tar both present), or None.

    Refuses to mix outputs: a finished shard made by another tokenizer, or with other fields
    (image_key, output_key, keep_image, error_key), raises. on_error may change between runs.
    """
    stats_file = _stats_path(target)
    if _split(stats_file)[1] not in names or _split(target)[1] not in names:
        return None
    stats = _read_json(stats_file)
    if stats is None:  # unreadable: written atomically, so not ours; redo the shard
        return None
    recorded = stats.get(METADATA_KEY)
    if recorded is not None:
        try:
            theirs = TokenizerSpec.from_dict(recorded)
        except (KeyError, TypeError, ValueError):
            theirs = None
        if theirs is None or theirs.fingerprint() != spec.fingerprint():
            why = (theirs.mismatch(spec) if theirs is not None else None) or "settings differ"
            raise ValueError(
                f"{target} was tokenized by another tokenizer ({why}); write to another "
                "output or pass overwrite=True"
            )
    recorded = {k: v for k, v in stats.get("settings", {}).items() if k != "on_error"}
    wanted = {k: v for k, v in settings.items() if k != "on_error"}
    if recorded and recorded != wanted:
        changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
        raise ValueError(
            f"{target} was written with other settings ({', '.join(changed)}: "
            f"{[recorded.get(k) for k in changed]} then, {[wanted[k] for k in changed]} now); "
            "write to another output or pass overwrite=True"
        )
    return ShardReport(
        url=url, output=target, stats_path=stats_file, status="finished",
        samples_in=int(stats.get("samples_in", 0)), encoded=int(stats.get("encoded", 0)),
        skipped=int(stats.get("skipped", 0)), failed=int(stats.get("failed", 0)),
        seconds=float(stats.get("seconds", 0.0)), errors=list(stats.get("errors", [])),
    )


def _convert_shard(url, target, names, engine, options, spec, settings, bar) -> ShardReport:
    from webdataset import TarWriter

    started = time.monotonic()
    stats_file = _stats_path(target)
    folder, stats_name = _split(stats_file)
    # A stale marker must go before the tar is replaced: a crash between the two renames must
    # never leave an old stats file next to a new tar.
    if stats_name in names:
        _remove(stats_file)
    prefixes = (_temp_prefix(_split(target)[1]), _temp_prefix(stats_name))
    for leftover in sorted(n for n in names if n.startswith(prefixes)):
        logger.info("removing %s, left by an interrupted run", _join(folder, leftover))
        _remove(_join(folder, leftover))
    stats = StageStats()
    counted = 0
    try:
        with _atomic_write(target) as f:
            writer = TarWriter(f)
            try:
                for sample in _encode_stream(read_shard(url), engine, options, stats):
                    writer.write(sample)
                    bar.update(stats.samples_in - counted)
                    counted = stats.samples_in
                    if _after_sample_hook is not None:
                        _after_sample_hook(url, counted)
            except BaseException:
                # Close the tar stream while its file is open (the temp file is removed next);
                # left to the garbage collector it would write to a closed file.
                with contextlib.suppress(Exception):
                    writer.close()
                raise
            bar.update(stats.samples_in - counted)
            writer.close()  # the tar end blocks; the file itself is closed by _atomic_write
    except ShardReadError as e:
        if options.policy.on_error == "raise":
            raise
        logger.error("%s; the shard is left unfinished and a rerun will retry it", e)
        return ShardReport(url=url, output=target, stats_path=stats_file, status="failed",
                           samples_in=stats.samples_in, encoded=stats.encoded,
                           skipped=stats.skipped, failed=stats.failed,
                           seconds=time.monotonic() - started, errors=stats.errors,
                           error=str(e))
    seconds = time.monotonic() - started
    record = {
        "url": url,
        "output": target,
        "samples_in": stats.samples_in,
        "encoded": stats.encoded,
        "skipped": stats.skipped,
        "failed": stats.failed,
        "errors": stats.errors,
        "errors_not_listed": stats.errors_not_listed,
        "seconds": round(seconds, 3),
        "images_per_second": round(stats.encoded / seconds, 2) if seconds > 0 else 0.0,
        "settings": settings,
        METADATA_KEY: spec.to_dict(),
    }
    _write_json(stats_file, record)  # last: the completion marker
    if stats.skipped or stats.failed:
        logger.warning("%s: %d of %d samples skipped, %d failed (on_error=%r); see %s",
                       url, stats.skipped, stats.samples_in, stats.failed,
                       options.policy.on_error, stats_file)
    return ShardReport(url=url, output=target, stats_path=stats_file, status="written",
                       samples_in=stats.samples_in, encoded=stats.encoded,
                       skipped=stats.skipped, failed=stats.failed, seconds=seconds,
                       errors=stats.errors)


def _log_summary(manifest: Manifest) -> None:
    totals = manifest.totals
    logger.info(
        "tokenize_shards: %d shards written, %d finished before, %d failed; %d samples, "
        "%d encoded, %d skipped, %d failed; %.1f images/s over %.1f s; manifest %s",
        len(manifest.written), len(manifest.finished), len(manifest.failed_shards),
        totals["samples_in"], totals["encoded"], totals["skipped"], totals["failed"],
        manifest.images_per_second, manifest.seconds, manifest.path,
    )
    for report in manifest.failed_shards:
        logger.error("shard not converted: %s", report.error)
