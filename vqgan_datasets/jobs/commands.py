"""Whole jobs, inputs on disk → outputs on disk: one function per `vqgan-datasets` command.

The CLI only parses arguments and calls one of these; they are also the Python API for the same
jobs. Image sources: a folder of image files, a datasets directory (`save_to_disk`), parquet
files or a folder of them, or `imagefolder:DIR` for datasets' imagefolder builder. Token
sources: a datasets directory written by `encode`, or token tar shards (`inputs` tells them
apart).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .inputs import (
    DATASET_FILES,
    IMAGE_SUFFIXES,
    find_token_shards,
    is_shard_source,
    open_images,
    parquet_files,
    row_names,
    source_files,
    token_shard_files,
)
from .overlap import check_outputs, check_shard_outputs
from .summaries import row_failures, sample_errors

if TYPE_CHECKING:  # imported where used: the CLI imports this module without JAX
    from ..metadata import TokenizerSpec
    from ..options import EncodeOptions
    from .manifest import Manifest

__all__ = ["DATASET_FILES", "IMAGE_SUFFIXES", "MAX_LISTED_FAILURES", "MAX_NAME_BYTES", "convert",
           "decode", "encode", "info", "is_shard_source", "manifest_summary", "open_images",
           "preview", "report"]

logger = logging.getLogger(__name__)



def encode(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    options: EncodeOptions | None = None,
    image_column: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    on_error: str | None = None,
    preprocess: str | None = None,
    workers: int | None = None,
    keep_image: bool | None = None,
    value_range: tuple[float, float] | None = None,
    dtype: str | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    num_actors: int | None = None,
    gpus_per_actor: float = 0,
    multihost: dict[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    """Tokenize `source` into `output`: a datasets directory, or token shards for shard input.

    Settings: `options=EncodeOptions(...)`, or its fields as keywords (a keyword given
    overrides the same field of `options`); `image_column` names the datasets column or the
    tar samples' image field(s). `value_range`/`dtype` adjust the model. `ray_address` runs
    shard conversion on a Ray cluster ("" starts a local Ray); `multihost` holds
    `distributed.initialize` arguments for a JAX multi-host run (each host converts its own
    shards, or its own part of a dataset). Returns a summary of what was done; `"complete"`
    is False when some shard failed (listed in `"failed_shards"`; a rerun retries them).
    Shard output: `overwrite` converts finished shards again, `verify` checks the sha256 of
    every finished shard (see `tokenize_shards`). An output that would overwrite an input
    raises `OutputIsInputError` before anything is read.
    """
    from ..hf import DEFAULT_MODEL, VQGANTokenizer
    from ..hf.arrow import save_to_disk
    from ..options import encode_options

    model = DEFAULT_MODEL if model is None else model
    options = encode_options(options, image_field=image_column, image_size=image_size,
                             batch_size=batch_size, on_error=on_error, preprocess=preprocess,
                             workers=workers, keep_image=keep_image)
    start = time.perf_counter()
    shards = is_shard_source(source)
    if shards:  # before anything is read: an output must never overwrite an input
        check_shard_outputs(source, output)
    else:
        check_outputs(source_files(source), folders=[output])
    if multihost is not None:
        from . import distributed

        distributed.initialize(**multihost)
    if shards:
        if value_range is not None or dtype is not None:
            # Shard workers take these settings from the model itself (its reference).
            model = _load_model(model, dtype=dtype, value_range=value_range)
        if ray_address is not None:
            from .ray import tokenize as ray_tokenize

            manifest = ray_tokenize(
                os.fspath(source), os.fspath(output), model=model, options=options,
                address=ray_address or None, num_actors=num_actors,
                num_gpus_per_actor=gpus_per_actor, overwrite=overwrite, verify=verify,
            )
        else:
            from .shards import tokenize_shards

            manifest = tokenize_shards(os.fspath(source), os.fspath(output), model=model,
                                       options=options, progress=progress,
                                       overwrite=overwrite, verify=verify)
        return manifest_summary(manifest) | {"seconds": round(time.perf_counter() - start, 2)}
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    dataset = open_images(source)
    if multihost is not None:
        from . import distributed

        dataset = distributed.split_dataset(dataset)
        output = Path(output) / f"process-{distributed.process_index():05d}"
    tokenizer = VQGANTokenizer(model, options=options, value_range=value_range, dtype=dtype)
    from ..pipeline.images import ImageDecodeError

    try:  # rows named by their index in `source`, in errors
        tokens = tokenizer.apply(dataset, desc="vqgan-datasets encode", with_indices=True)
    except ImageDecodeError as err:
        raise ImageDecodeError(
            f"{os.fspath(source)}: {err}. To go on past bad images, pass --on-error skip (drop "
            "them) or --on-error null (keep a null row with the reason); on_error= in Python"
        ) from err
    save_to_disk(tokens, output)  # a 0-row output stays readable
    seconds = time.perf_counter() - start
    # Counted from the output, so that a cache hit (nothing encoded in this process) reports
    # the same numbers as the run that made it.
    nulls = tokens.data.column(tokenizer.output_column).null_count
    return {
        "output": os.fspath(output),
        "complete": True,  # a bad image under "raise" raised; skip/null rows are counted
        "rows_in": len(dataset),
        "rows_out": len(tokens),
        "encoded": len(tokens) - nulls,
        "skipped": len(dataset) - len(tokens),
        "nulls": nulls,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(dataset) / seconds, 2) if seconds else None,
        "tokens_per_image": tokenizer.spec.sequence_length,
        "token_dtype": tokenizer.spec.token_dtype,
        **row_failures(dataset, tokens, tokenizer.output_column, tokenizer.error_column, output),
    }


MAX_LISTED_FAILURES = 10  # failed shards named in a summary; the manifest lists every one


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """A shard run's summary: shards done (written now or finished before) and failed, sample
    counts over the shards done, and whether the run is complete (no shard failed)."""
    failed = manifest.failed_shards
    return {
        "output": manifest.output,
        "manifest": manifest.path,
        "complete": not failed,
        "shards": len(manifest.written) + len(manifest.finished),
        "shards_written": len(manifest.written),
        "shards_finished_before": len(manifest.finished),
        "shards_failed": len(failed),
        "shards_total": len(manifest.shards),
        **manifest.totals,
        "members_skipped": manifest.members_skipped,  # tar members that were no sample, by why
        "images_per_second": round(manifest.images_per_second, 2),
        "failed_shards": [{"url": s.url, "error": s.error} for s in failed[:MAX_LISTED_FAILURES]],
        **sample_errors(manifest),  # the first samples skipped or kept as nulls, and where all are
        "tokens_per_image": math.prod(manifest.spec.get("grid") or [0]) or None,
    }


def decode(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    options: EncodeOptions | None = None,
    token_column: str | None = None,
    batch_size: int | None = None,
    image_format: str = "png",
    limit: int | None = None,
    on_error: str = "raise",
) -> dict[str, Any]:
    """Decode tokens into image files `output/{name}.{format}`.

    `source`: a token dataset (a datasets directory, parquet files, a Hub layout directory) or
    token tar shards (a folder of them, a pattern, paths). `model` defaults to the one recorded
    with the tokens (a given one must match the record). `options` read as the tokenizer's:
    tokens in `output_field` (or `token_column`; for shards, the token field, "vqgan.npy"),
    `batch_size` per device. Null rows (images `encode` could not read, kept under
    on_error="null") have no tokens: they are counted (`"nulls"`) and skipped. Rows whose
    tokens cannot be decoded (wrong length, ids outside the codebook) raise, naming the row,
    or under `on_error="skip"` are counted (`"skipped"`, the first few in `"errors"`). `limit`
    counts rows read. Files are named after the file_name/key column, made safe (no folders,
    no hidden or over-long names) and unique: a name already taken in this run, or too long,
    gets a short hash of its key (`"renamed"` counts them). `"images"` counts the files."""
    from ..options import StageStats, encode_options

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip' for decode, got {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    options = encode_options(options, output_field=token_column, batch_size=batch_size)
    urls = find_token_shards(source)
    check_outputs(source_files(source) if urls is None else token_shard_files(urls),
                  folders=[output])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names, written, stats, nulls = _FileNames(image_format), 0, StageStats(), [0]
    from PIL import Image

    for key, image in _decoded_images(source, urls, model, options, limit, on_error, stats,
                                      nulls):
        Image.fromarray(image).save(output / names.name(key))
        written += 1
    seconds = time.perf_counter() - start
    return {"output": str(output), "images": written, "nulls": nulls[0],
            "skipped": stats.skipped, "errors": stats.errors[:MAX_LISTED_FAILURES],
            "renamed": names.renamed, "renamed_examples": names.examples,
            "seconds": round(seconds, 2)}


MAX_NAME_BYTES = 200  # a file name's stem; with the hash and the format, under 255 bytes


class _FileNames:
    """Safe, unique file names for decoded images, one per key, within one run."""

    def __init__(self, image_format: str) -> None:
        self.suffix = f".{image_format}"
        self.taken: set[str] = set()  # casefolded: unique on case-insensitive file systems too
        self.renamed = 0
        self.examples: dict[str, str] = {}

    def name(self, key: object) -> str:
        text = str(key)
        if os.path.splitext(text)[1].lower() in IMAGE_SUFFIXES:  # a file_name's own suffix
            text = os.path.splitext(text)[0]
        # One flat folder: separators become "_", and no hidden, empty or control-char names.
        stem = "".join("_" if c in "/\\" or not c.isprintable() else c for c in text)
        stem = stem.strip(". ") or "_"
        digest = hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        if len(stem.encode()) > MAX_NAME_BYTES:
            stem = stem.encode()[:MAX_NAME_BYTES - 9].decode(errors="ignore") + "-" + digest
        name, n = stem + self.suffix, 1
        while name.casefold() in self.taken:
            n += 1
            name = f"{stem}-{digest}{'' if n == 2 else f'-{n - 1}'}{self.suffix}"
        if name != text.replace("/", "_") + self.suffix:
            self.renamed += 1
            if len(self.examples) < MAX_LISTED_FAILURES:
                self.examples[str(key)] = name
        self.taken.add(name.casefold())
        return name


def _decoded_images(source, urls, model, options, limit, on_error, stats,
                    nulls) -> Iterator[tuple[object, np.ndarray]]:
    """(key, uint8 image) pairs from a token dataset or token shards (`urls`); null rows are
    counted in `nulls[0]` and skipped, bad token rows follow `on_error`."""
    from ..options import ErrorPolicy
    from ..pipeline.engine import get_engine
    from ..streams import DEFAULT_ERROR_KEY, DecodeOptions, decode_stream

    key = options.output_field or "vqgan.npy"
    if urls is not None:
        from .. import storage
        from ..handle import ModelHandle

        model, spec = _shard_model(os.fspath(source), model)
        grid = None if spec is None else tuple(spec.grid)
        loaded = ModelHandle.of(model).load()
        samples = itertools.chain.from_iterable(storage.read_shard(u) for u in urls)
        error_key = options.error_field or DEFAULT_ERROR_KEY
    else:
        dataset, detok = _token_dataset_and_decoder(source, model, options)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        key, grid, loaded, error_key = detok.token_column, detok.grid, detok.model, None
        rows = dataset.with_format("numpy", columns=[key])
        samples = ({"__key__": name, key: row[key]}
                   for name, row in zip(row_names(dataset), rows, strict=True))

    def tokens_only():
        for sample in itertools.islice(samples, limit):
            if sample.get(key) is None and (error_key is None or error_key in sample):
                nulls[0] += 1  # a null row: an image encode could not read
                continue
            yield sample

    engine = get_engine(loaded, **options.engine_kwargs())
    stream = DecodeOptions(input_key=key, output_format="numpy", keep_tokens=False, grid=grid)
    for sample in decode_stream(tokens_only(), engine, stream, stats, ErrorPolicy(on_error)):
        yield sample["__key__"], sample["png"]


def _token_dataset_and_decoder(source, model, options):
    """The token dataset at `source` and its decoder, from the record in the dataset's info or
    in the dataset card (README.md) of its folder; without a record, `model` is required."""
    import datasets

    from ..hf import VQGANDetokenizer
    from ..hf.arrow import load_from_disk
    from ..hf.hub import read_column_metadata

    path = Path(os.fspath(source))
    parquet = parquet_files(path) if not (path / "state.json").is_file() else []
    if parquet:
        dataset = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet],
                                        split="train")
    else:
        dataset = load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    column = options.output_field
    cards = [d for d in (path, *path.parents[:2]) if (d / "README.md").is_file()]
    for record in (dataset, *(str(d) for d in cards)):
        try:
            read_column_metadata(record, column)
        except ValueError:
            continue
        decoder = VQGANDetokenizer.from_dataset(record, model=model, token_column=column,
                                                batch_size=options.batch_size)
        return dataset, decoder
    if model is None:
        raise ValueError(
            f"{source}: no tokenizer record in the dataset's info or a dataset card (README.md); "
            "pass --model (model=) with the model that made the tokens"
        )
    return dataset, VQGANDetokenizer(model, token_column=column, batch_size=options.batch_size)


def _shard_model(source, model: Any) -> tuple[Any, TokenizerSpec | None]:
    """The model to decode token shards with, and their recorded spec (the first shard's stats
    file or the folder's manifest.json); a given model must match the record."""
    from ..handle import ModelHandle
    from .manifest import TokenSpecNotFound, read_token_spec

    try:
        spec = read_token_spec(source)
    except TokenSpecNotFound:
        if model is None:
            raise
        return model, None
    if model is None:
        model = spec.model_name
        if model is None or (os.path.isabs(model) and not os.path.isdir(model)):
            raise ValueError(
                f"the tokens in {source} were made by {model or 'an in-memory model'}, which "
                f"is not available here; pass --model (model=) with weights {spec.weights_digest}"
            )
        handle = ModelHandle(model, revision=spec.revision, value_range=spec.value_range)
    else:
        handle = ModelHandle.of(model, value_range=spec.value_range)
    reason = spec.mismatch(handle.spec(spec.image_size))
    if reason:
        what = handle.ref or "this model"
        raise ValueError(f"the tokens in {source} cannot be decoded by {what}: {reason}")
    return handle, spec


def _sample_images(source: str | os.PathLike, count: int) -> tuple[list[Any], list[str]]:
    dataset = open_images(source)
    dataset = dataset.select(range(min(count, len(dataset))))
    import datasets

    images = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    return images, row_names(dataset)


def preview(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    count: int = 8,
    image_size: int | None = None,
    columns: int | None = None,
) -> Path:
    """A PNG grid: `count` images from `source` above their reconstructions."""
    from ..report.build import preview as draw_preview

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    check_outputs(source_files(source), files=[output])
    images, _ = _sample_images(source, count)
    return draw_preview(_load_model(model), images, output, image_size=image_size,
                        columns=columns)


def report(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: Any = None,
    max_samples: int = 64,
    image_size: int | None = None,
) -> Path:
    """The HTML quality report for `model` on images from `source`, or on a token dataset."""
    from ..report.build import build_report

    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    check_outputs(source_files(source), folders=[output_dir])
    tokens = _token_dataset(Path(os.fspath(source)))
    if tokens is not None:
        dataset, column, spec = tokens
        loaded = _load_model(model if model is not None else spec.model_name)
        nulls = np.asarray(dataset.data.column(column).is_null())  # null rows: no tokens
        rows = [dataset[int(i)][column] for i in np.flatnonzero(~nulls)[:max_samples]]
        return build_report(loaded, tokens=np.asarray(rows), out_dir=output_dir,
                            max_samples=max_samples)
    images, _ = _sample_images(source, max_samples)
    return build_report(_load_model(model), images, out_dir=output_dir, image_size=image_size,
                        max_samples=max_samples)


def _token_dataset(path: Path) -> tuple[Any, str, Any] | None:
    """(dataset, token column, its TokenizerSpec) for a saved token dataset, else None."""
    if not (path.is_dir() and (path / "dataset_info.json").is_file()):
        return None
    from ..hf.arrow import load_from_disk
    from ..hf.hub import read_column_metadata

    dataset = load_from_disk(path)
    try:
        column, spec = read_column_metadata(dataset, None)
    except ValueError:
        return None
    return dataset, column, spec


def _load_model(model: Any, *, dtype: str | None = None,
                value_range: tuple[float, float] | None = None):
    from ..handle import ModelHandle
    from ..hf import DEFAULT_MODEL

    handle = ModelHandle.of(DEFAULT_MODEL if model is None else model, dtype=dtype,
                            value_range=value_range)
    return handle.load()


def info(model: Any = None) -> dict[str, Any]:
    """The model (name, revision, digest, config, value range, dtype) and this host's devices."""
    import jax

    from ..metadata import TokenizerSpec

    loaded = _load_model(model)
    spec = TokenizerSpec.from_model(loaded)
    devices = jax.local_devices()
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "weights_digest": loaded.weights_digest,
        "config": loaded.config.to_dict(),
        "value_range": list(loaded.config.value_range),
        "compute_dtype": spec.compute_dtype,
        "image_size": spec.image_size,
        "tokens_per_image": spec.sequence_length,
        "token_dtype": spec.token_dtype,
        "family": spec.family,
        "preprocess": spec.preprocess,
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "process": f"{jax.process_index()} of {jax.process_count()}",
    }


def convert(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    family: str | None = None,
    config: str | os.PathLike | None = None,
    value_range: tuple[float, float] | None = None,
    unsafe_pickle: bool = False,
) -> Path:
    """A published tokenizer checkpoint → a model directory (see conversion.convert_checkpoint)."""
    from ..models.conversion import convert_checkpoint  # here: the CLI imports jobs without JAX

    return convert_checkpoint(checkpoint, output_dir, family, config, value_range=value_range,
                              unsafe_pickle=unsafe_pickle)
