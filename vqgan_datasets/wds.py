"""webdataset pipeline stages: tokens in, tokens out, one sample at a time.

- stages: `encode_samples` / `decode_samples` are plain generators over webdataset samples (dicts
  with `__key__`, `__url__` and one field per file extension); `encode(...)` / `decode(...)`
  wrap them in small picklable callables for `DataPipeline(...)` and `WebDataset(...).compose`.
  Batching, padding and prefetch across all local devices are the engine's; a stage only maps
  samples to images and keys and puts every other field back, in input order.
- failures: one policy for every bad sample (`on_error="raise" | "skip" | "null"`, or a
  webdataset `handler=`); every message names the sample's key and shard, and `StageStats`
  counts what happened.
- model handles: a model pickles as a small reference to its checkpoint (`_ModelRef`), so stages
  travel to DataLoader workers and Ray actors without their weights.

Shard-to-shard conversion (`tokenize_shards`, `read_shard`, `Manifest`...) lives in `shards.py`;
its public names are importable from here too, as they always were.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .images import ImageDecodeError, OnError
from .modeling import VQModel

if TYPE_CHECKING:
    from .shards import (
        Manifest,
        ShardOptions,
        ShardReadError,
        ShardReport,
        convert_shard,
        expand_urls,
        open_url,
        read_shard,
        register_fsspec,
        tokenize_shards,
        write_manifest,
    )

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "Manifest",
    "SampleError",
    "ShardOptions",
    "ShardReadError",
    "ShardReport",
    "Stage",
    "StageStats",
    "convert_shard",
    "decode",
    "decode_samples",
    "encode",
    "encode_samples",
    "expand_urls",
    "open_url",
    "read_shard",
    "register_fsspec",
    "tokenize_shards",
    "write_manifest",
]

# Names that moved to shards.py; resolved on first use so that neither module imports the other
# at import time (shards.py builds on this module).
_SHARD_NAMES = frozenset({
    "Manifest", "ShardOptions", "ShardReadError", "ShardReport", "convert_shard", "expand_urls",
    "open_url", "read_shard", "register_fsspec", "tokenize_shards", "write_manifest",
})

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp;ppm;bmp;tif;tiff"
MAX_REPORTED_ERRORS = 100  # per shard / per stage; the counts stay exact beyond it
_ON_ERROR = ("raise", "skip", "null")
_IMAGE_FORMATS = ("pil", "numpy", "png", "jpeg", "webp")


def __getattr__(name: str) -> Any:
    if name in _SHARD_NAMES:
        from . import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _portable_reference(model: VQModel | str | os.PathLike, *,
                        revision: str | None = None) -> dict[str, Any]:
    """A reference that other machines can load: a Hub id pinned to its resolved commit, or a
    checkpoint directory, which every machine must then see at the same path.

    Never the parameters: on a cluster they would travel to every worker through the object
    store (300 MB for f16-16384). An in-memory model has nothing else to send, so it raises.
    """
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        ref = {"path": os.path.abspath(name) if os.path.isdir(name) else name}
        return {**ref, "revision": revision} if revision is not None else ref
    if not isinstance(model, VQModel):
        raise TypeError(
            f"model must be a VQModel or a checkpoint path / Hub id, got {type(model).__name__}"
        )
    source = model.source
    if source is None or not source.weights_file:
        raise ValueError(
            "this VQModel has no checkpoint to load it from (its weights exist only in this "
            "process); save it with model.save_pretrained(directory) on storage every worker "
            "sees, or push it to the Hub, and pass that directory or repo id as the model"
        )
    common = {
        "dtype": model.dtype.name,
        "value_range": list(model.config.value_range),
        "digest": model.weights_digest,
    }
    if os.path.isdir(source.name):  # a local checkpoint, named as the user gave it
        return {"path": os.path.dirname(source.weights_file), **common}
    return {"path": source.name, "revision": source.revision, **common}


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
            kwargs = {k: ref[k] for k in ("dtype", "revision") if ref.get(k) is not None}
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
