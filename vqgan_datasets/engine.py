"""The device loop: data-parallel VQGAN encode/decode on every local device.

One jitted encode function and one jitted decode function per token grid, over a one-axis mesh
of the devices (axis "data"): parameters replicated, batches split on their leading axis.
Batches are padded with zero rows up to one of a few fixed sizes (buckets) so a run compiles a
bounded number of programs; padding rows are stripped from every result. `encode_iter` streams:
host threads preprocess the next batches while the devices work on the current one, and at most
``prefetch + 2`` batches are ever held, whatever the length of the input.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import images as images_lib
from . import modeling
from .images import ImageDecodeError, OnError
from .modeling import VQModel

__all__ = [
    "DecodeResult",
    "EncodeResult",
    "Engine",
    "EngineStats",
    "decode_iter",
    "encode_iter",
    "get_engine",
]

logger = logging.getLogger(__name__)

_AXIS = "data"
_MISSING = object()
_ON_ERROR = ("raise", "skip", "null")


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


def _bucket_sizes(per_device: int, num_devices: int) -> tuple[int, ...]:
    """Global batch sizes num_devices * {1, 2, 4, ..., per_device}: ceil(log2(b)) + 1 shapes.

    Doubling keeps padding under half a batch while bounding compilations; every bucket is a
    multiple of the device count so the leading axis always splits evenly over the mesh.
    """
    sizes, rows = [], 1
    while rows < per_device:
        sizes.append(rows * num_devices)
        rows *= 2
    sizes.append(per_device * num_devices)
    return tuple(sizes)


class Engine:
    """Data-parallel VQGAN encode/decode on all local devices with bucketed, padded batches.

    `batch_size` is per device; the largest global batch is `batch_size * num_devices`.
    `num_threads` host threads decode and resize images (default min(8, cpu count)); `prefetch`
    batches are preprocessed ahead of the one on the devices. The parameters are copied to the
    devices once, here: an engine keeps using them even if `model.params` is later replaced
    (`get_engine` notices that and builds a new engine).
    """

    def __init__(
        self,
        model: VQModel,
        *,
        batch_size: int = 8,
        devices: Sequence[jax.Device] | None = None,
        num_threads: int | None = None,
        prefetch: int = 2,
    ) -> None:
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("prefetch", prefetch, minimum=0)
        if num_threads is None:
            num_threads = min(8, os.cpu_count() or 1)
        _check_int("num_threads", num_threads, minimum=1)
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("devices is empty; pass None to use every local device")
        if len(set(devices)) != len(devices):
            raise ValueError(f"devices lists a device twice: {devices}")

        self._model: VQModel | weakref.ReferenceType = model
        self.config = model.config
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.devices = tuple(devices)
        self.buckets = _bucket_sizes(self.batch_size, len(devices))
        self.stats = EngineStats()

        # jit over a mesh rather than pmap: pmap is in maintenance mode, jit with shardings is
        # today's idiom, and it is one program for any device count (no leading device axis,
        # no per-device reshapes; XLA partitions the batch axis itself).
        self.mesh = Mesh(np.array(devices, dtype=object), (_AXIS,))
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
        self._pools_lock = threading.Lock()
        self._load_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._batch_pool: concurrent.futures.ThreadPoolExecutor | None = None

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
        images = self._check_images(images)
        n = images.shape[0]
        f = self.config.downsample_factor
        out = np.empty((n, (images.shape[1] // f) * (images.shape[2] // f)), np.int32)
        step = self.global_batch_size

        def batches():
            for start in range(0, n, step):
                yield start, images[start : start + step]

        for start, tokens in self._pipelined(self._encode_fn, batches()):
            out[start : start + len(tokens)] = tokens
        self.stats.samples_in += n
        self.stats.encoded += n
        return out

    def decode(self, codes: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
        """int tokens [N, h*w] → uint8 images [N, h*f, w*f, 3]; bad ids raise, naming the position.

        `grid` is (h, w); by default the token count must be a square.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or not (np.issubdtype(codes.dtype, np.integer) or codes.size == 0):
            raise ValueError(
                f"Engine.decode expects integer token ids [N, h*w], got {codes.dtype} "
                f"{codes.shape}"
            )
        grid = self._grid(codes.shape[1], grid)
        modeling.check_codes(codes, self.config.n_embed)
        codes = codes.astype(np.int32, copy=False)  # one compiled dtype whatever the storage
        n = codes.shape[0]
        f = self.config.downsample_factor
        out = np.empty((n, grid[0] * f, grid[1] * f, self.config.out_ch), np.uint8)
        step = self.global_batch_size

        def batches():
            for start in range(0, n, step):
                yield start, codes[start : start + step]

        for start, pixels in self._pipelined(self._decode_fn(grid), batches()):
            out[start : start + len(pixels)] = pixels
        self.stats.decoded += n
        return out

    # -- streams -------------------------------------------------------------------------------

    def encode_iter(
        self,
        images: Iterable,
        *,
        image_size: int | None = None,
        keys: Iterable | None = None,
        on_error: OnError = "raise",
        draft: bool = True,
    ) -> Iterator[EncodeResult]:
        """Anything `images.load_image` accepts → one EncodeResult per input, in input order.

        Keys default to running indices. A bad input raises `ImageDecodeError` naming its key
        ("raise", after every earlier result was yielded), is left out and counted ("skip"),
        or comes back as `EncodeResult(key, None, reason)` ("null"). Memory stays bounded for
        unbounded inputs: at most (prefetch + 2) global batches are read ahead of the consumer.
        """
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        size = self.config.resolution if image_size is None else image_size
        _check_int("image_size", size, minimum=1)
        f = self.config.downsample_factor
        if size % f:
            raise ValueError(
                f"image_size {size} is not a multiple of the model's downsample factor {f}"
            )
        return self._encode_stream(iter(images), keys, int(size), on_error, draft)

    def decode_iter(
        self,
        codes: Iterable[np.ndarray],
        *,
        keys: Iterable | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Iterator[DecodeResult]:
        """Token sequences (int [h*w] each) → one DecodeResult per input, in input order.

        Bad ids raise a ValueError naming the sequence's key and the position.
        """
        return self._decode_stream(iter(codes), keys, grid)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the preprocessing threads down (they are started again if the engine is reused)."""
        with self._pools_lock:
            pools, self._load_pool, self._batch_pool = (self._load_pool, self._batch_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Engine({self.num_devices} x {self.devices[0].platform}, batch_size={self.batch_size}"
            f" per device, buckets={self.buckets}, prefetch={self.prefetch})"
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

    def _pools(self) -> tuple[concurrent.futures.Executor, concurrent.futures.Executor]:
        # Two pools: `batch` threads each run one preprocess_batch call, which fans its images
        # out to the `load` pool and waits. Waiting on the same pool could deadlock; and keeping
        # the next batch's images queued behind this one's keeps every load thread busy.
        with self._pools_lock:
            if self._load_pool is None:
                self._load_pool = concurrent.futures.ThreadPoolExecutor(
                    self.num_threads, thread_name_prefix="vqgan-load"
                )
                self._batch_pool = concurrent.futures.ThreadPoolExecutor(
                    max(1, self.prefetch), thread_name_prefix="vqgan-batch"
                )
            return self._load_pool, self._batch_pool

    def _encode_stream(
        self, items: Iterator, keys: Iterable | None, size: int, on_error: str, draft: bool
    ) -> Iterator[EncodeResult]:
        load_pool, batch_pool = self._pools()
        if not self.prefetch:
            batch_pool = None  # preprocess in the caller's thread, while the devices run
        chunks = _chunked(items, keys, self.global_batch_size)
        preprocess = functools.partial(
            images_lib.preprocess_batch, image_size=size, on_error="null",
            executor=load_pool, draft=draft,
        )
        queued: collections.deque[concurrent.futures.Future] = collections.deque()

        def refill() -> None:
            # Reading the input happens here, in the caller's thread, so the read-ahead is
            # bounded by the queue depth: nothing else pulls from the caller's iterator.
            while len(queued) < max(1, self.prefetch):
                chunk = next(chunks, None)
                if chunk is None:
                    return
                chunk_keys, chunk_items = chunk
                if batch_pool is None:
                    done = concurrent.futures.Future()
                    done.set_result((chunk_keys, preprocess(chunk_items, keys=chunk_keys)))
                    queued.append(done)
                else:
                    queued.append(batch_pool.submit(_keyed, chunk_keys, preprocess, chunk_items))

        def batches():
            while True:
                refill()
                if not queued:
                    return
                chunk_keys, batch = queued.popleft().result()
                if self.prefetch:
                    refill()  # before the dispatch of this batch, so the threads never idle
                yield (chunk_keys, batch), batch.pixels

        counts = {"in": 0, "skipped": 0}
        try:
            for (chunk_keys, batch), tokens in self._pipelined(self._encode_fn, batches()):
                yield from self._apply_policy(chunk_keys, batch, tokens, on_error, counts)
        finally:
            for future in queued:  # the consumer stopped early, or a failure is on its way up
                future.cancel()
            if counts["skipped"]:
                logger.warning(
                    "skipped %d of %d inputs that could not be read as images (on_error='skip');"
                    " the DEBUG log of %s names each", counts["skipped"], counts["in"], __name__,
                )

    def _apply_policy(self, chunk_keys, batch, tokens, on_error, counts):
        row = 0
        for key, ok, error in zip(chunk_keys, batch.ok, batch.errors, strict=True):
            self.stats.samples_in += 1
            counts["in"] += 1
            if ok:
                self.stats.encoded += 1
                yield EncodeResult(key, tokens[row], None)
                row += 1
                continue
            reason = _reason(error, key)
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
        first = next(codes, None)
        if first is None:
            return
        key_iter = itertools.count() if keys is None else iter(keys)
        first_key = next(key_iter, _MISSING)
        if first_key is _MISSING:
            raise ValueError("keys is empty, but codes is not")
        length = _check_code_row(first_key, np.asarray(first), None)
        grid = self._grid(length, grid)
        codes = itertools.chain([first], codes)
        keys = itertools.chain([first_key], key_iter)

        def batches():
            for chunk_keys, chunk in _chunked(codes, keys, self.global_batch_size):
                arrays = [np.asarray(c) for c in chunk]
                for key, array in zip(chunk_keys, arrays, strict=True):
                    _check_code_row(key, array, length)
                    try:
                        modeling.check_codes(array, self.config.n_embed)
                    except ValueError as e:
                        raise ValueError(f"codes for key {key!r}: {e}") from None
                yield chunk_keys, np.stack(arrays).astype(np.int32, copy=False)

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
        f = self.config.downsample_factor
        channels = self.config.in_channels
        ok = (
            images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[3] == channels
            and images.shape[1] > 0
            and images.shape[1] % f == 0
            and images.shape[2] % f == 0
        )
        if not ok:
            hint = ""
            if images.dtype != np.uint8:
                hint = (
                    " Pass pixels as uint8 0..255; the engine scales them to the model's range"
                    f" {self.config.value_range} on the device."
                )
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


def _check_code_row(key, array: np.ndarray, length: int | None) -> int:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"codes for key {key!r}: expected integer token ids [h*w], got {array.dtype} "
            f"{array.shape}"
        )
    if length is not None and array.shape[0] != length:
        raise ValueError(
            f"codes for key {key!r} hold {array.shape[0]} tokens, earlier ones {length} "
            "(one grid per stream)"
        )
    return array.shape[0]


def _keyed(chunk_keys, preprocess, chunk_items):
    return chunk_keys, preprocess(chunk_items, keys=chunk_keys)


def _chunked(items: Iterator, keys: Iterable | None, size: int):
    """(keys, items) lists of `size` from an iterator; keys default to running indices."""
    key_iter = itertools.count() if keys is None else iter(keys)
    index = 0
    while True:
        chunk_items = list(itertools.islice(items, size))
        if not chunk_items:
            return
        chunk_keys = list(itertools.islice(key_iter, len(chunk_items)))
        if len(chunk_keys) != len(chunk_items):
            raise ValueError(
                f"keys ran out after {index + len(chunk_keys)} keys, before the inputs did"
            )
        index += len(chunk_items)
        yield chunk_keys, chunk_items


def _reason(error: str | None, key: object) -> str:
    """The reason of a failure without the 'sample <key>: ' prefix that preprocess_batch adds."""
    error = error or "unknown error"
    prefix = str(ImageDecodeError("", key))
    return error[len(prefix) :] if prefix and error.startswith(prefix) else error


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


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
    compiled functions. The cache holds models weakly, and a cached engine refers to its model
    only weakly, so dropping the model frees both."""
    unknown = sorted(set(kwargs) - set(_ENGINE_ARGS))
    if unknown:
        raise TypeError(f"unknown Engine arguments {unknown}; expected some of {_ENGINE_ARGS}")
    # Defaults filled in, so get_engine(m) and get_engine(m, batch_size=8) share one engine.
    resolved = {**_ENGINE_DEFAULTS, **kwargs}
    if resolved["devices"] is not None:
        resolved["devices"] = tuple(resolved["devices"])
    key = tuple(sorted(resolved.items(), key=lambda item: item[0]))
    with _ENGINES_LOCK:
        per_model = _ENGINES.setdefault(model, {})
        engine = per_model.get(key)
        if engine is None or engine._params_source is not model.params:
            if engine is not None:
                engine.close()
            engine = Engine(model, **kwargs)
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
