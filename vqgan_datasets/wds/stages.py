"""webdataset pipeline stages: tokens in, tokens out, one sample at a time (the adapter).

`encode_samples` / `decode_samples` are plain generators over webdataset samples (dicts with
`__key__`, `__url__` and one field per file extension); `encode(...)` / `decode(...)` wrap them
in small picklable `Stage`s for `DataPipeline(...)` and `WebDataset(...).compose`. The streams
themselves (streams.py) are shared with the shard conversion; the model travels as a
`ModelHandle` (handle.py: a checkpoint's reference, or in-memory weights by value).

Settings come as `options=EncodeOptions(...)` or as keyword shortcuts (`image_key`, `output_key`,
`error_key` are the webdataset names of `image_field`, `output_field`, `error_field`). Defaults
are the library's, except `keep_image=True`: a stage passes samples through and only adds
tokens. Failures: `on_error` ("raise" by default) or a webdataset `handler=`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..handle import ModelHandle
from ..models.modeling import VQModel
from ..options import EncodeOptions, ErrorPolicy, StageStats, encode_options
from ..streams import DecodeOptions, decode_stream, encode_stream

__all__ = ["Stage", "decode", "decode_samples", "encode", "encode_samples"]

STAGE_DEFAULTS = {"keep_image": True}

Model = VQModel | str | ModelHandle


def _engine(model: Model, **kwargs: Any):
    from ..pipeline.engine import get_engine

    return get_engine(ModelHandle.of(model).load(), **kwargs)


def encode_samples(
    src: Iterable[dict],
    model: Model,
    *,
    options: EncodeOptions | None = None,
    handler: Callable[[Exception], bool] | None = None,
    stats: StageStats | None = None,
    image_key: str | Sequence[str] | None = None,
    output_key: str | None = None,
    error_key: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    on_error: str | None = None,
    keep_image: bool | None = None,
    token_dtype: str | None = None,
    preprocess: str | None = None,
    workers: int | None = None,
    draft: bool | None = None,
) -> Iterator[dict]:
    """Samples with an image field (encoded bytes, PIL or array) → the same samples plus tokens.

    The first field of `image_key` ("jpg;png;...") present is the image. `output_key`
    ("vqgan.npy") gets the tokens (1-D, h*w, raster order, the smallest unsigned dtype holding
    the codebook unless `token_dtype` says otherwise). Every other field, `__key__` and
    `__url__` are kept; `keep_image=False` drops the image fields. Order is kept and the last,
    incomplete batch is encoded too. Bad samples follow `on_error` (or `handler`).
    """
    opts = encode_options(options, defaults=STAGE_DEFAULTS, image_key=image_key,
                          output_key=output_key, error_key=error_key, image_size=image_size,
                          batch_size=batch_size, on_error=on_error, keep_image=keep_image,
                          token_dtype=token_dtype, preprocess=preprocess, workers=workers,
                          draft=draft)
    policy = ErrorPolicy(opts.on_error, handler)
    own = StageStats() if stats is None else stats
    engine = _engine(model, **opts.engine_kwargs())
    try:
        yield from encode_stream(src, engine, opts, own, policy)
    finally:
        own.log_summary("vqgan encode stage")


def decode_samples(
    src: Iterable[dict],
    model: Model,
    *,
    input_key: str = "vqgan.npy",
    output_key: str = "png",
    output_format: str = "pil",
    keep_tokens: bool = True,
    grid: tuple[int, int] | None = None,
    on_error: str = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int | None = None,
    error_key: str = "vqgan_error",
    stats: StageStats | None = None,
) -> Iterator[dict]:
    """Samples with tokens (an integer array, or undecoded .npy bytes) → the same plus an image.

    `output_format`: "pil" (PIL image), "numpy" (uint8 HWC), or "png" / "jpeg" / "webp"
    (encoded bytes, written unchanged by TarWriter). One token grid per stream: square unless
    `grid=(h, w)`. Bad token arrays (wrong dtype, length or ids) follow `on_error`.
    """
    opts = DecodeOptions(input_key=input_key, output_key=output_key, output_format=output_format,
                         keep_tokens=keep_tokens, grid=grid, error_key=error_key)
    policy = ErrorPolicy(on_error, handler)
    own = StageStats() if stats is None else stats
    engine = _engine(model, **({} if batch_size is None else {"batch_size": batch_size}))
    try:
        yield from decode_stream(src, engine, opts, own, policy)
    finally:
        own.log_summary("vqgan decode stage")


class Stage:
    """A picklable pipeline stage: `stage(samples)` runs `function(samples, model, **kwargs)`.

    Made by `encode(...)` and `decode(...)`. The model pickles by the ModelHandle rule, so a
    stage can go to DataLoader workers; start those with the "spawn" method, since a process
    forked after JAX started can deadlock. `stats` accumulates over every stream the stage has
    processed in this process.
    """

    def __init__(self, function: Callable[..., Iterator[dict]], model: Model,
                 **kwargs: Any) -> None:
        self.function = function
        self.handle = ModelHandle.of(model)
        self.kwargs = kwargs
        self.stats = StageStats()

    @property
    def model(self) -> VQModel:
        return self.handle.load()

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return self.function(src, self.model, stats=self.stats, **self.kwargs)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"Stage({self.function.__name__}, {options})"


def encode(
    model: Model,
    *,
    options: EncodeOptions | None = None,
    handler: Callable[[Exception], bool] | None = None,
    image_key: str | Sequence[str] | None = None,
    output_key: str | None = None,
    error_key: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    on_error: str | None = None,
    keep_image: bool | None = None,
    token_dtype: str | None = None,
    preprocess: str | None = None,
    workers: int | None = None,
    draft: bool | None = None,
) -> Stage:
    """The encode stage for `DataPipeline(..., encode(model))` or `WebDataset(url).compose(...)`;
    arguments as for `encode_samples`, checked now rather than at the first sample."""
    opts = encode_options(options, defaults=STAGE_DEFAULTS, image_key=image_key,
                          output_key=output_key, error_key=error_key, image_size=image_size,
                          batch_size=batch_size, on_error=on_error, keep_image=keep_image,
                          token_dtype=token_dtype, preprocess=preprocess, workers=workers,
                          draft=draft)
    ErrorPolicy(opts.on_error, handler)
    return Stage(encode_samples, model, options=opts, handler=handler)


def decode(
    model: Model,
    *,
    input_key: str = "vqgan.npy",
    output_key: str = "png",
    output_format: str = "pil",
    keep_tokens: bool = True,
    grid: tuple[int, int] | None = None,
    on_error: str = "raise",
    handler: Callable[[Exception], bool] | None = None,
    batch_size: int | None = None,
    error_key: str = "vqgan_error",
) -> Stage:
    """The decode stage (tokens → images) for `DataPipeline` or `WebDataset(...).compose(...)`."""
    ErrorPolicy(on_error, handler)
    DecodeOptions(input_key=input_key, output_key=output_key, output_format=output_format,
                  keep_tokens=keep_tokens, grid=grid, error_key=error_key)
    return Stage(
        decode_samples, model, input_key=input_key, output_key=output_key,
        output_format=output_format, keep_tokens=keep_tokens, grid=grid, on_error=on_error,
        handler=handler, batch_size=batch_size, error_key=error_key,
    )
