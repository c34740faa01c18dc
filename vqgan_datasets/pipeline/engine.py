"""The device loop: data-parallel VQGAN encode/decode on every local device.

One jitted encode function and one jitted decode function per token grid, over a one-axis mesh
of the devices (axis "data"): parameters replicated, batches split on their leading axis.
Batches are padded with zero rows up to one of a few fixed sizes (buckets) so a run compiles a
bounded number of programs; padding rows are stripped from every result. `encode_iter` streams:
worker processes (`workers.WorkerPool`) preprocess the next batches while the devices work on
the current one, and at most ``prefetch + 2`` batches are ever held, whatever the input length.
Every entry point first checks that JAX can run here (`forks.check_fork_safety`). Batch sizes,
buckets and the preprocessing settings are resolved in `engine_settings`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..models import modeling
from ..models.modeling import VQModel
from . import images as images_lib
from .batches import Prepared, check_code_row, chunked, code_batch
from .engine_settings import (
    bucket_sizes,
    check_int,
    default_batch_size,
    resolve_settings,
    rows_that_fit,
)
from .forks import check_fork_safety
from .images import ImageDecodeError, OnError
from .workers import DEFAULT_SAMPLE_TIMEOUT_S, WorkerPool

__all__ = ["DecodeResult", "EncodeResult", "Engine", "EngineStats", "decode_iter",
           "default_batch_size", "encode_iter", "get_engine"]

logger = logging.getLogger(__name__)

_AXIS = "data"
_ON_ERROR = ("raise", "skip", "null")
_draft_warned = False


@dataclasses.dataclass
class EncodeResult:
    """One input's tokens (int32 [h*w], raster order), or None and why when on_error="null"."""

    key: object
    tokens: np.ndarray | None
    error: str | None = None


@dataclasses.dataclass
class DecodeResult:
    """One token sequence decoded to a uint8 [H, W, 3] image."""

    key: object
    image: np.ndarray


@dataclasses.dataclass
class EngineStats:
    """Running counts over the engine's life (a cached engine accumulates across calls)."""

    samples_in: int = 0  # inputs that reached a policy decision (encode and encode_iter)
    encoded: int = 0
    skipped: int = 0  # failed inputs omitted under on_error="skip"
    failed: int = 0  # failed inputs yielded as nulls (on_error="null") or raised
    decoded: int = 0
    batches: int = 0  # device calls, encode and decode
    padded_rows: int = 0  # zero rows added to reach a bucket


class Engine:
    """Data-parallel VQGAN encode/decode on all local devices with bucketed, padded batches.

    `batch_size` is per device (None: `default_batch_size`); the largest global batch is
    `batch_size * num_devices`. `workers` processes preprocess images for `encode_iter` (None:
    one per available core; 0: `num_threads` threads in this process instead); a sample that
    takes longer than `sample_timeout_s` (None: no limit) fails and its worker is replaced.
    `prefetch` batches are preprocessed ahead of the one on the devices. The parameters are
    copied to the devices once, here: an engine keeps using them even if `model.params` is
    later replaced (`get_engine` notices that and builds a new engine).
    """

    def __init__(
        self, model: VQModel, *, batch_size: int | None = None,
        devices: Sequence[jax.Device] | None = None, num_threads: int | None = None,
        prefetch: int = 2, workers: int | None = None,
        sample_timeout_s: float | None = DEFAULT_SAMPLE_TIMEOUT_S,
    ) -> None:
        check_fork_safety("Engine")
        settings = resolve_settings(model.config, batch_size=batch_size, devices=devices,
                             num_threads=num_threads, prefetch=prefetch, workers=workers,
                             sample_timeout_s=sample_timeout_s)
        self._model: VQModel | weakref.ReferenceType = model
        self.config = model.config
        self.batch_size: int = settings["batch_size"]
        self.devices: tuple[jax.Device, ...] = settings["devices"]
        self.num_threads: int = settings["num_threads"]
        self.prefetch: int = settings["prefetch"]
        self.workers: int = settings["workers"]
        self.sample_timeout_s: float | None = settings["sample_timeout_s"]
        self.buckets = bucket_sizes(self.batch_size, len(self.devices))
        self.stats = EngineStats()

        # jit over a mesh rather than pmap: pmap is in maintenance mode, jit with shardings is
        # today's idiom, and it is one program for any device count (no leading device axis,
        # no per-device reshapes; XLA partitions the batch axis itself).
        self.mesh = Mesh(np.array(self.devices, dtype=object), (_AXIS,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(_AXIS))
        # Placed once and passed as an argument: constants closed over by a jitted function
        # would be embedded into every compiled program (and copied again per bucket).
        self._params = jax.device_put(model.params, self._replicated)
        self._params_source = model.params  # identity only: get_engine checks for replacement
        self._module = model.module
        self._encode_fn = jax.jit(
            functools.partial(modeling.encode_uint8, model.module, self.config.value_range),
            in_shardings=(self._replicated, self._batch_sharding),
            out_shardings=self._batch_sharding,
        )
        self._decode_fns: dict[tuple[int, int], Callable] = {}
        self._shrunk: set[tuple[int, int, bool]] = set()  # sizes whose batches were made smaller
        self._pools_lock = threading.Lock()
        self._load_pool: WorkerPool | None = None
        self._pool_finalizer: weakref.finalize | None = None

    # -- properties --------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def model(self) -> VQModel:
        if isinstance(self._model, weakref.ReferenceType):
            model = self._model()
            if model is None:
                raise ReferenceError("this cached engine's VQModel has been garbage-collected")
            return model
        return self._model

    @property
    def global_batch_size(self) -> int:
        return self.buckets[-1]

    # -- whole arrays --------------------------------------------------------------------------

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N,H,W,3] (any N >= 0) → int32 tokens [N, h*w], raster order."""
        check_fork_safety("Engine.encode")
        images = self._check_images(images)
        n, f = images.shape[0], self.config.downsample_factor
        rows = self._rows(images.shape[1], images.shape[2]) if n else 1
        out = np.empty((n, (images.shape[1] // f) * (images.shape[2] // f)), np.int32)
        self._whole(self._encode_fn, images, out, rows)
        self.stats.samples_in += n
        self.stats.encoded += n
        return out

    def decode(self, codes: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
        """int tokens [N, h*w] → uint8 images [N, h*f, w*f, 3]; bad ids raise, naming the position.

        `grid` is (h, w); by default the token count must be a square.
        """
        check_fork_safety("Engine.decode")
        codes = np.asarray(codes)
        if codes.ndim != 2 or not (np.issubdtype(codes.dtype, np.integer) or codes.size == 0):
            raise ValueError(
                f"Engine.decode expects integer token ids [N, h*w], got {codes.dtype} "
                f"{codes.shape}"
            )
        grid = self._grid(codes.shape[1], grid)
        modeling.check_codes(codes, self.config.n_embed)
        codes = codes.astype(np.int32, copy=False)  # one compiled dtype whatever the storage
        n, f = codes.shape[0], self.config.downsample_factor
        rows = self._rows(grid[0] * f, grid[1] * f, decode=True) if n else 1
        out = np.empty((n, grid[0] * f, grid[1] * f, self.config.out_ch), np.uint8)
        self._whole(self._decode_fn(grid), codes, out, rows)
        self.stats.decoded += n
        return out

    # -- streams -------------------------------------------------------------------------------

    def encode_iter(
        self, images: Iterable, *, image_size: int | None = None, keys: Iterable | None = None,
        on_error: OnError = "raise", preprocess: str = "exact", draft: bool | None = None,
    ) -> Iterator[EncodeResult]:
        """Anything `images.load_image` accepts → one EncodeResult per input, in input order.

        Keys default to running indices. A bad input raises `ImageDecodeError` naming its key
        ("raise", after every earlier result was yielded), is left out and counted ("skip"),
        or comes back as `EncodeResult(key, None, reason)` ("null"). `preprocess` is "exact"
        (the model family's own), "fast" or a name (see `images`); `draft` is deprecated and
        ignored. Memory stays bounded for
        unbounded inputs: at most (prefetch + 2) global batches are read ahead of the consumer.
        """
        check_fork_safety("Engine.encode_iter")
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if preprocess not in images_lib.PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {images_lib.PREPROCESS_MODES}, got "
                             f"{preprocess!r}")
        if draft is not None:
            _warn_draft()
        if preprocess == "exact":  # the model family's own preprocessing
            preprocess = self.config.preprocess
        size = self.config.resolution if image_size is None else image_size
        check_int("image_size", size, minimum=1)
        f = self.config.downsample_factor
        if size % f:
            raise ValueError(
                f"image_size {size} is not a multiple of the model's downsample factor {f}"
            )
        try:  # before any image is read: a size the devices cannot hold fails at once
            rows = self._rows(int(size), int(size))
        except ValueError as e:
            raise ValueError(f"image_size {size}: {e}") from None
        return self._encode_stream(iter(images), keys, int(size), on_error, preprocess, rows)

    def decode_iter(
        self, codes: Iterable[np.ndarray], *, keys: Iterable | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Iterator[DecodeResult]:
        """Token sequences (int [h*w] each) → one DecodeResult per input, in input order.

        Bad ids raise a ValueError naming the sequence's key and the position.
        """
        check_fork_safety("Engine.decode_iter")
        return self._decode_stream(iter(codes), keys, grid)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the preprocessing workers (they start again if the engine is used again)."""
        with self._pools_lock:
            finalizer, self._pool_finalizer, self._load_pool = self._pool_finalizer, None, None
        if finalizer is not None:
            finalizer()  # closes the pool once, and lets it go

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Engine({self.num_devices} x {self.devices[0].platform}, batch_size={self.batch_size}"
            f" per device, buckets={self.buckets}, prefetch={self.prefetch}, "
            f"workers={self.workers})"
        )

    # -- internals: device calls -----------------------------------------------------------

    def _decode_fn(self, grid: tuple[int, int]) -> Callable:
        fn = self._decode_fns.get(grid)
        if fn is None:
            fn = jax.jit(
                functools.partial(
                    modeling.decode_uint8, self._module, self.config.value_range, grid
                ),
                in_shardings=(self._replicated, self._batch_sharding),
                out_shardings=self._batch_sharding,
            )
            self._decode_fns[grid] = fn
        return fn

    def _dispatch(self, fn: Callable, rows: np.ndarray) -> jax.Array:
        """Pad to the next bucket, place on the mesh, start the program; returns at once."""
        n = rows.shape[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        if bucket != n:
            padded = np.zeros((bucket, *rows.shape[1:]), rows.dtype)
            padded[:n] = rows
            rows = padded
        out = fn(self._params, jax.device_put(rows, self._batch_sharding))
        # Start the device→host copy now so that np.asarray later finds it done (a no-op on CPU).
        out.copy_to_host_async()
        self.stats.batches += 1
        self.stats.padded_rows += bucket - n
        return out

    def _rows(self, height: int, width: int, *, decode: bool = False) -> int:
        """Rows per device call for images of this size: the global batch, or the largest
        bucket whose images fit the devices' free memory (logged once per size)."""
        rows = rows_that_fit(self.config, height, width, self.buckets, self.devices,
                             decode=decode)
        if rows < self.global_batch_size and (height, width, decode) not in self._shrunk:
            self._shrunk.add((height, width, decode))
            logger.warning("%dx%d images: %d per device call instead of %d, to fit the devices' "
                           "free memory", height, width, rows, self.global_batch_size)
        return rows

    def _whole(self, fn: Callable, rows: np.ndarray, out: np.ndarray, step: int) -> None:
        batches = ((start, rows[start : start + step]) for start in range(0, len(rows), step))
        for start, result in self._pipelined(fn, batches):
            out[start : start + len(result)] = result

    def _pipelined(self, fn: Callable, batches: Iterable[tuple[object, np.ndarray]]):
        """(tag, rows) → (tag, host result without padding), dispatching batch k+1 before
        fetching batch k: JAX dispatch is asynchronous, so the devices never wait for the host
        to copy a result out."""
        pending = None
        for tag, rows in batches:
            out = self._dispatch(fn, rows) if rows.shape[0] else None
            if pending is not None:
                yield _fetch(*pending)
            pending = (tag, rows.shape[0], out)
        if pending is not None:
            yield _fetch(*pending)

    # -- internals: streams --------------------------------------------------------------------

    def _pool(self) -> WorkerPool:
        with self._pools_lock:
            pool = self._load_pool
            if pool is None or pool.closed or pool.pid != os.getpid():
                if self._pool_finalizer is not None:  # closed, or another process's
                    self._pool_finalizer()
                pool = self._load_pool = WorkerPool(
                    self.workers, threads=self.num_threads, sample_timeout_s=self.sample_timeout_s
                )
                # A dropped engine stops its workers; close() runs this once and releases it.
                self._pool_finalizer = weakref.finalize(self, pool.close)
            return pool

    def _encode_stream(
        self, items: Iterator, keys: Iterable | None, size: int, on_error: str, preprocess: str,
        rows: int,
    ) -> Iterator[EncodeResult]:
        # At most max(1, prefetch) + 1 batches preprocessed or queued, one on the devices.
        prepared = self._pool().stream(
            items, keys, batch_size=rows, ahead=self.prefetch,
            image_size=size, preprocess=preprocess,
        )
        batches = (((chunk_keys, batch), batch.pixels) for chunk_keys, batch in prepared)
        counts = {"in": 0, "skipped": 0}
        try:
            for (chunk_keys, batch), tokens in self._pipelined(self._encode_fn, batches):
                yield from self._apply_policy(chunk_keys, batch, tokens, on_error, counts)
        finally:
            prepared.close()  # the consumer stopped early, or a failure is on its way up
            if counts["skipped"]:
                logger.warning(
                    "skipped %d of %d inputs that could not be read as images (on_error='skip');"
                    " the DEBUG log of %s names each", counts["skipped"], counts["in"], __name__,
                )

    def _apply_policy(self, chunk_keys, prepared: Prepared, tokens, on_error, counts):
        row = 0
        for key, ok, reason in zip(chunk_keys, prepared.ok, prepared.reasons, strict=True):
            self.stats.samples_in += 1
            counts["in"] += 1
            if ok:
                self.stats.encoded += 1
                yield EncodeResult(key, tokens[row], None)
                row += 1
                continue
            reason = reason or "unknown error"
            if on_error == "skip":
                self.stats.skipped += 1
                counts["skipped"] += 1
                logger.debug("skipping sample %r: %s", key, reason)
            else:
                self.stats.failed += 1
                if on_error == "raise":
                    raise ImageDecodeError(reason, key)
                yield EncodeResult(key, None, reason)

    def _decode_stream(
        self, codes: Iterator, keys: Iterable | None, grid: tuple[int, int] | None
    ) -> Iterator[DecodeResult]:
        # The first sequence fixes the grid, hence the jitted function, for the whole stream.
        chunks = chunked(codes, keys, self.global_batch_size)
        first = next(chunks, None)
        if first is None:
            return
        length = check_code_row(first[0][0], np.asarray(first[1][0]), None)
        grid = self._grid(length, grid)
        f = self.config.downsample_factor
        rows = self._rows(grid[0] * f, grid[1] * f, decode=True)

        def batches():
            for whole_keys, whole in itertools.chain([first], chunks):
                yield from (code_batch(whole_keys[start:start + rows], whole[start:start + rows],
                                       length, self.config.n_embed)
                            for start in range(0, len(whole), rows))

        for chunk_keys, pixels in self._pipelined(self._decode_fn(grid), batches()):
            self.stats.decoded += len(chunk_keys)
            for key, image in zip(chunk_keys, pixels, strict=True):
                yield DecodeResult(key, image)

    def _grid(self, length: int, grid: tuple[int, int] | None) -> tuple[int, int]:
        if grid is None:
            side = int(round(length**0.5))
            if side * side != length or length == 0:
                raise ValueError(
                    f"{length} tokens per image are not a square grid; pass grid=(h, w)"
                )
            return side, side
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or grid[0] * grid[1] != length:
            raise ValueError(f"grid {grid} does not hold {length} tokens per image")
        return grid

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        f, channels, shape = self.config.downsample_factor, self.config.in_channels, images.shape
        ok = images.dtype == np.uint8 and images.ndim == 4 and shape[3] == channels
        if not (ok and shape[1] > 0 and shape[1] % f == 0 and shape[2] % f == 0):
            hint = "" if images.dtype == np.uint8 else (
                " Pass pixels as uint8 0..255; the engine scales them to the model's range"
                f" {self.config.value_range} on the device.")
            raise ValueError(
                f"Engine.encode expects uint8 images [N,H,W,{channels}] with H and W multiples of "
                f"the downsample factor {f} (square, e.g. {self.config.resolution}x"
                f"{self.config.resolution}, for the default decode grid), got {images.dtype} "
                f"{images.shape}.{hint} "
                "Use encode_iter (or images.load_image) for files, bytes and PIL images."
            )
        return images


# -- helpers --------------------------------------------------------------------------------


def _fetch(tag, n: int, out: jax.Array | None):
    if out is None:
        return tag, np.empty((0,), np.int32)
    return tag, np.asarray(out)[:n]


def _warn_draft() -> None:
    global _draft_warned
    if not _draft_warned:  # once per process
        _draft_warned = True
        warnings.warn("encode_iter(draft=...) is deprecated and ignored: JPEG drafting moved to "
                      "preprocess='fast' (the default, 'exact', gives the same pixels for every "
                      "input form)", DeprecationWarning, stacklevel=3)


# -- cached engines ----------------------------------------------------------------------------

_ENGINE_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(Engine.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}
_ENGINE_ARGS = tuple(_ENGINE_DEFAULTS)
_ENGINES: weakref.WeakKeyDictionary[VQModel, dict[tuple, Engine]] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def get_engine(model: VQModel, **kwargs) -> Engine:
    """The engine for (model, kwargs), built once: repeated dataset `map` calls reuse its
    compiled functions and worker processes. The cache holds models weakly, and a cached engine
    refers to its model only weakly, so dropping the model frees both."""
    check_fork_safety("get_engine")
    unknown = sorted(set(kwargs) - set(_ENGINE_ARGS))
    if unknown:
        raise TypeError(f"unknown Engine arguments {unknown}; expected some of {_ENGINE_ARGS}")
    # Defaults resolved, so get_engine(m) and get_engine(m, batch_size=<the default>) share one.
    settings = resolve_settings(model.config, **{**_ENGINE_DEFAULTS, **kwargs})
    key = tuple(sorted(settings.items(), key=lambda item: item[0]))
    with _ENGINES_LOCK:
        per_model = _ENGINES.setdefault(model, {})
        engine = per_model.get(key)
        if engine is None or engine._params_source is not model.params:
            # A replaced engine is dropped, not closed: a stream may still be reading it. Its
            # workers stop when the last reference goes (the finalizer in `_pool`).
            engine = Engine(model, **settings)
            # A strong reference from the value would keep the weak key alive for ever.
            engine._model = weakref.ref(model)
            per_model[key] = engine
        return engine


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    engine_kwargs = {k: kwargs.pop(k) for k in _ENGINE_ARGS if k in kwargs}
    return engine_kwargs, kwargs


def encode_iter(images: Iterable, model: VQModel, **kwargs) -> Iterator[EncodeResult]:
    """`get_engine(model, ...).encode_iter(images, ...)`; Engine and call arguments mixed."""
    engine_kwargs, call_kwargs = _split_kwargs(dict(kwargs))
    return get_engine(model, **engine_kwargs).encode_iter(images, **call_kwargs)


def decode_iter(codes: Iterable, model: VQModel, **kwargs) -> Iterator[DecodeResult]:
    """`get_engine(model, ...).decode_iter(codes, ...)`; Engine and call arguments mixed."""
    engine_kwargs, call_kwargs = _split_kwargs(dict(kwargs))
    return get_engine(model, **engine_kwargs).decode_iter(codes, **call_kwargs)
