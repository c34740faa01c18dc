"""Sample streams through the engine: dict samples in, the same samples plus tokens (or
images) out, in input order; every failure through one ErrorPolicy.

A sample is a dict of fields with `__key__` (and `__url__`, its shard), as webdataset and our
tar reader yield them. `encode_stream` and `decode_stream` are what the webdataset stages and
the shard conversion both run: the engine batches, pads and prefetches across all local
devices; a stream only maps samples to images or token rows and puts every other field back.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .options import KEEP, STOP, EncodeOptions, ErrorPolicy, SampleError, StageStats

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "DEFAULT_OUTPUT_KEY",
    "DEFAULT_ERROR_KEY",
    "IMAGE_FORMATS",
    "DecodeOptions",
    "decode_stream",
    "encode_stream",
]

DEFAULT_IMAGE_KEY = "jpg;png;jpeg;webp;ppm;bmp;tif;tiff"
DEFAULT_OUTPUT_KEY = "vqgan.npy"
DEFAULT_ERROR_KEY = "vqgan_error"
IMAGE_FORMATS = ("pil", "numpy", "png", "jpeg", "webp")


# ------------------------------------------------------------------------------ sample fields


def find_field(sample: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` the sample holds (exact, then case-insensitive), or None."""
    for name in names:
        if sample.get(name) is not None:
            return name
    lowered = {k.lower(): k for k in sample if isinstance(k, str) and not k.startswith("__")}
    for name in names:
        actual = lowered.get(name.lower())
        if actual is not None and sample[actual] is not None:
            return actual
    return None


def field_names(sample: dict) -> str:
    """The sample's fields for messages: "jpg, txt" or "none"."""
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


def _without(sample: dict, fields: Iterable[str], *extra: str) -> dict:
    drop = set(fields)
    return {
        k: v for k, v in sample.items()
        if k not in extra and not (isinstance(k, str) and k.lower() in drop)
    }


class _NoImage:
    """Goes to the engine in place of a sample without an image, so that the failure keeps its
    place in the stream (the engine reports it as unreadable; our own reason replaces that)."""

    __slots__ = ()


_NO_IMAGE = _NoImage()


# ------------------------------------------------------------------------------ encode


def encode_stream(src: Iterable[dict], engine: Any, options: EncodeOptions, stats: StageStats,
                  policy: ErrorPolicy | None = None) -> Iterator[dict]:
    """Samples with an image field → the same samples plus tokens, in order.

    Field names left None in `options` are webdataset's: the first of DEFAULT_IMAGE_KEY present
    is the image, tokens go to "vqgan.npy", reasons (on_error="null") to "vqgan_error".
    `policy` defaults to options.on_error.
    """
    policy = policy or ErrorPolicy(options.on_error)
    image_keys = options.image_fields(DEFAULT_IMAGE_KEY.split(";"))
    output_key = options.output_field or DEFAULT_OUTPUT_KEY
    error_key = options.error_field or DEFAULT_ERROR_KEY
    size = options.image_size or engine.config.resolution
    dtype = np.dtype(options.token_dtype or engine.config.token_dtype)
    if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < engine.config.n_embed - 1:
        raise ValueError(f"token_dtype {dtype} cannot hold ids up to {engine.config.n_embed - 1}")
    image_fields = {k.lower() for k in image_keys}
    dropped = image_fields if not options.keep_image else ()
    looked_for = ", ".join("." + k for k in image_keys)
    # (sample, index, error reason or None), in input order; the engine reads at most a few
    # batches ahead of us, so this stays short.
    pending: collections.deque = collections.deque()

    def images():
        for index, sample in enumerate(src):
            _check_sample(sample, index, "encode")
            field = find_field(sample, image_keys)
            if field is None:
                reason = f"no image field; looked for {looked_for} (fields: {field_names(sample)})"
                pending.append((sample, index, reason))
                yield _NO_IMAGE
            else:
                pending.append((sample, index, None))
                yield sample[field]

    results = engine.encode_iter(images(), image_size=size, on_error="null",
                                 preprocess=options.preprocess)
    try:
        for result in results:
            sample, index, reason = pending.popleft()
            stats.samples_in += 1
            if reason is None and result.tokens is not None:
                stats.encoded += 1
                out = _without(sample, dropped, error_key)
                out[output_key] = result.tokens.astype(dtype)
                yield out
                continue
            error = SampleError(reason or result.error or "unknown error",
                                _sample_key(sample, index), sample.get("__url__"))
            action = policy.apply(error, stats)
            if action == STOP:
                return
            if action == KEEP:
                out = _without(sample, dropped, output_key)
                out[error_key] = error.reason
                yield out
    finally:
        results.close()


# ------------------------------------------------------------------------------ decode


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How token samples become images (the decode stage's settings)."""

    input_key: str = DEFAULT_OUTPUT_KEY
    output_key: str = "png"
    output_format: str = "pil"
    keep_tokens: bool = True
    grid: tuple[int, int] | None = None
    error_key: str = DEFAULT_ERROR_KEY

    def __post_init__(self) -> None:
        if self.output_format not in IMAGE_FORMATS:
            raise ValueError(
                f"output_format must be one of {IMAGE_FORMATS}, got {self.output_format!r}"
            )
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))


def read_tokens(sample: dict, key: str, length: int | None, codebook: int):
    """(int32 tokens, None) or (None, why not)."""
    value = sample.get(key)
    if value is None:
        return None, f"no token field .{key} (fields: {field_names(sample)})"
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


def decode_stream(src: Iterable[dict], engine: Any, opts: DecodeOptions, stats: StageStats,
                  policy: ErrorPolicy) -> Iterator[dict]:
    """Samples with tokens → the same samples plus an image, in order."""
    codebook = engine.config.n_embed
    length = None if opts.grid is None else opts.grid[0] * opts.grid[1]
    source = enumerate(src)

    def fail(sample: dict, index: int, reason: str):
        stats.samples_in += 1
        error = SampleError(reason, _sample_key(sample, index), sample.get("__url__"))
        action = policy.apply(error, stats)
        if action == KEEP:
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
        tokens, reason = read_tokens(sample, opts.input_key, length, codebook)
        if reason is None:
            first = (index, sample, tokens)
            length = tokens.size
            break
        action, out = fail(sample, index, reason)
        if action == STOP:
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
            tokens, reason = read_tokens(sample, opts.input_key, length, codebook)
            pending.append((sample, index, reason))
            yield placeholder if reason is not None else tokens

    results = engine.decode_iter(codes(), grid=opts.grid)
    try:
        for result in results:
            sample, index, reason = pending.popleft()
            if reason is not None:
                action, out = fail(sample, index, reason)
                if action == STOP:
                    return
                if out is not None:
                    yield out
                continue
            stats.samples_in += 1
            stats.decoded += 1
            out = _without(sample, (), opts.error_key)
            if not opts.keep_tokens:
                out.pop(opts.input_key, None)
            out[opts.output_key] = convert_image(result.image, opts.output_format)
            yield out
    finally:
        results.close()


def convert_image(image: np.ndarray, output_format: str):
    """A uint8 HWC image as PIL, numpy, or encoded png/jpeg/webp bytes."""
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
