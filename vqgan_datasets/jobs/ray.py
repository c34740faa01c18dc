"""Tokenizing on a Ray cluster (GPU nodes), two ways.

- `tokenize(inputs, output, model=..., num_actors=..., num_gpus_per_actor=...)`: tar shards to
  token shards on a pool of Ray actors, one input shard per task, **exactly once**: every task
  calls the same `shards.convert_shard` as `tokenize_shards` (temp file + rename, stats file last),
  finished shards are skipped before scheduling and again inside the worker, so a task Ray
  retries after an actor died redoes an unfinished shard or finds it finished (a shard is
  written only under its claim: a retry whose first attempt still runs waits for it). The
  driver holds a run record in the output folder, as `tokenize_shards` does. Same outputs,
  byte for byte, as `tokenize_shards`; a `manifest.json` at the end. Only shard URLs and small
  reports travel through Ray; images are read, and tokens written, by the workers themselves.
- `RayTokenizer`: a callable class for `ds.map_batches(RayTokenizer, ...)` on any Ray Dataset
  (read_webdataset, read_images, read_binary_files, read_parquet, from_huggingface...). This is
  **at-least-once**: Ray retries a failed task and its writers (`write_parquet`...) append, so
  a retried or rerun pipeline can write rows twice. Use `tokenize` when that matters.

Workers load the model themselves, from its Hub id (pinned to the driver's commit) or its
checkpoint directory (which every node must see at the same path); parameters never go
through the object store. Ray is an extra: `pip install "vqgan-datasets[ray]"`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import storage
from ..handle import ModelHandle
from ..models.modeling import VQModel
from ..options import EncodeOptions, SampleError, encode_options
from .convert import ShardOptions, convert_shard, engine_for, plan
from .manifest import MANIFEST_NAME, Manifest, ShardReport, log_summary, normalize_output

if importlib.util.find_spec("ray") is None:  # ray itself is imported on first use: it is slow
    raise ImportError(
        'vqgan_datasets.ray needs Ray, an optional dependency: pip install "vqgan-datasets[ray]"'
    )

__all__ = ["RayTokenizer", "tokenize"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ tokenize


def tokenize(
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    model: VQModel | str | os.PathLike | ModelHandle,
    revision: str | None = None,
    options: EncodeOptions | None = None,
    image_size: int | None = None,
    image_key: str | Sequence[str] | None = None,
    output_key: str | None = None,
    keep_image: bool | None = None,
    on_error: str | None = None,
    error_key: str | None = None,
    batch_size: int | None = None,
    preprocess: str | None = None,
    workers: int | None = None,
    draft: bool | None = None,
    overwrite: bool = False,
    num_actors: int | None = None,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float | None = None,
    address: str | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    on_sample_written: Callable[[str, int], Any] | None = None,
    verify: bool = False,
) -> Manifest:
    """`tokenize_shards` on a Ray actor pool: the same outputs, stats files and resume rules.

    `model`: a Hub id, a checkpoint directory every node can read, or a VQModel loaded from
    either (an in-memory model raises: its weights would have to be shipped). Each actor loads
    it once and converts one shard per task on its devices: `num_gpus_per_actor` GPUs (Ray
    sets CUDA_VISIBLE_DEVICES; the engine uses all of them), `batch_size` per device. Settings:
    `options=EncodeOptions(...)` or the keyword shortcuts, as for `tokenize_shards`
    (on_error="raise", the default, fails a shard with a bad sample and goes on).
    `num_actors` defaults to the cluster's GPUs / num_gpus_per_actor, or one actor per node
    for CPU actors, and never more than the shards left. Connects to `address` (e.g.
    "ray://head:10001" or "auto"), or uses the Ray already initialized in this process, or
    starts one as `ray.init()` does. `ray_remote_args` go to `map_batches` (e.g.
    `{"runtime_env": {...}, "resources": {...}}`). `on_sample_written(url, samples_read)` runs
    in the workers after each sample written (it must pickle). Returns the manifest of every
    shard and writes it to `<output>/manifest.json`.
    """
    started = time.monotonic()
    opts = encode_options(options, image_size=image_size, image_key=image_key,
                          output_key=output_key, keep_image=keep_image, on_error=on_error,
                          error_key=error_key, batch_size=batch_size, preprocess=preprocess,
                          workers=workers, draft=draft)
    overwrite = overwrite or bool(getattr(opts, "overwrite", False))  # ShardOptions(overwrite=)
    # Pinned to the commit resolved here, so that every worker loads the same weights; the
    # spec comes from config.json and the digest, without loading the weights.
    handle = ModelHandle.of(model, revision=revision).portable()
    spec = handle.spec(opts.image_size, preprocess=opts.preprocess)
    output = normalize_output(output)
    urls = storage.expand_urls(inputs)
    todo = plan(urls, output, None, spec, opts, overwrite=overwrite, verify=verify)
    try:
        reports = _convert(todo, urls, handle, opts, overwrite, num_actors, num_gpus_per_actor,
                           num_cpus_per_actor, address, ray_remote_args, on_sample_written)
    finally:
        todo.close()
    manifest = Manifest(output=output, shards=[reports[i] for i in range(len(urls))],
                        spec=spec.to_dict(), seconds=time.monotonic() - started)
    manifest.path = storage.join(todo.directory, MANIFEST_NAME)
    storage.write_json(manifest.path, manifest.to_dict())
    log_summary(manifest, "ray tokenize")
    return manifest


def _convert(todo, urls, handle, opts, overwrite, num_actors, num_gpus_per_actor,
             num_cpus_per_actor, address, ray_remote_args, on_sample_written
             ) -> dict[int, ShardReport]:
    """Every unfinished shard of the plan on the actor pool; reports by shard index."""
    reports: dict[int, ShardReport] = dict(todo.finished)
    pending = [i for i in range(len(urls)) if i not in reports]
    todo.remove_leftovers(pending, fresh=False)

    if pending:
        ray = _connect(address)
        actors = num_actors or _default_actors(ray, num_gpus_per_actor)
        actors = max(1, min(int(actors), len(pending)))
        items = [{"index": i, "url": urls[i], "output": todo.outputs[i]} for i in pending]
        remote_args = dict(ray_remote_args or {})
        if num_cpus_per_actor is not None:
            remote_args["num_cpus"] = num_cpus_per_actor
        logger.info("ray tokenize: %d shards to convert (%d finished before) on %d actors "
                    "with %s GPUs each", len(pending), len(reports), actors, num_gpus_per_actor)
        # One block per shard and batch_size=1: one shard per task, so a retry redoes one shard.
        worker_options = ShardOptions(**{**opts.fields(), "overwrite": overwrite})
        converted = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWorker,
            fn_constructor_kwargs={"model": handle, "options": worker_options,
                                   "on_sample_written": on_sample_written,
                                   "run_id": todo.run_id},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=num_gpus_per_actor,
            **remote_args,
        )
        for row in converted.iter_rows():
            reports[int(row["index"])] = ShardReport.from_dict(json.loads(row["report"]))
        # Temporary files of attempts that died (a killed actor's shard, redone by its retry).
        todo.remove_leftovers(pending, fresh=True)
    return reports


def _connect(address: str | None):
    import ray
    import ray.data  # noqa: F401 - ray.data is a subpackage, not loaded by `import ray`

    if ray.is_initialized():
        if address is not None:
            logger.warning("Ray is already initialized in this process; using it, not %s",
                           address)
        return ray
    ray.init(address=address)
    return ray


def _default_actors(ray, num_gpus_per_actor: float) -> int:
    if num_gpus_per_actor:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < num_gpus_per_actor:
            raise ValueError(
                f"the Ray cluster has {gpus:g} GPUs, fewer than num_gpus_per_actor="
                f"{num_gpus_per_actor:g}"
            )
        return int(gpus // num_gpus_per_actor)
    # A CPU actor's JAX uses every core of its node: one per node.
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


class ShardWorker:
    """A Ray actor: loads the model once, then converts one shard per call."""

    def __init__(self, model: ModelHandle, options: ShardOptions,
                 on_sample_written: Callable[[str, int], Any] | None = None,
                 run_id: str | None = None) -> None:
        self.options = options
        self.run_id = run_id
        self.handle = model  # holds the model: the engine refers to it only weakly
        self.engine = engine_for(model, options)
        self.on_sample_written = on_sample_written

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reports = [
            # Looks afresh (no listing): a retried task may find its shard finished already, or
            # still claimed by the attempt it replaces (then it waits for that one).
            convert_shard(str(url), str(output), model=self.engine, options=self.options,
                          on_sample_written=self.on_sample_written, run_id=self.run_id)
            for url, output in zip(batch["url"], batch["output"], strict=True)
        ]
        return {
            "index": np.asarray(batch["index"]),
            "report": np.array([json.dumps(r.to_dict()) for r in reports], dtype=object),
        }


# ------------------------------------------------------------------------------ RayTokenizer


class RayTokenizer:
    """`ds.map_batches(RayTokenizer, fn_constructor_kwargs={"model": ...}, ...)`: an image
    column to a fixed-length token column, on any Ray Dataset. At-least-once (see the module).

        ds.map_batches(RayTokenizer, fn_constructor_kwargs={"model": "org/vqgan"},
                       batch_size=256, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1)

    `image_column` may hold encoded bytes (read_webdataset's "jpg", read_binary_files' "bytes"),
    uint8 HWC arrays (read_images' "image"), Hugging Face image structs ({"bytes", "path"} from
    read_parquet / from_huggingface) or paths. `output_column` gets h*w tokens per row, raster
    order, in the smallest unsigned dtype for the codebook (uint16 for 16,384 codes). Bad
    images: "raise" (default) fails the task naming the row's `__key__` or index, "null"
    keeps the row with zero tokens and the reason in `error_column` (default
    f"{output_column}_error"; None for good rows; Ray tensor columns cannot hold nulls), "skip"
    drops the row. The image column is dropped unless `keep_image`. `batch_size` is per
    device. Settings: `options=EncodeOptions(...)` or the keyword shortcuts. Each actor loads
    `model` (Hub id or checkpoint directory, or a VQModel when called in-process) once.
    """

    def __init__(
        self,
        model: VQModel | str | os.PathLike | ModelHandle,
        *,
        options: EncodeOptions | None = None,
        image_column: str | None = None,
        output_column: str | None = None,
        error_column: str | None = None,
        image_size: int | None = None,
        on_error: str | None = None,
        batch_size: int | None = None,
        keep_image: bool | None = None,
        preprocess: str | None = None,
        workers: int | None = None,
        revision: str | None = None,
        dtype: str | None = None,
        value_range: tuple[float, float] | None = None,
        draft: bool | None = None,
    ) -> None:
        self.options = encode_options(
            options, image_column=image_column, output_column=output_column,
            error_column=error_column, image_size=image_size, on_error=on_error,
            batch_size=batch_size, keep_image=keep_image, preprocess=preprocess, workers=workers,
            draft=draft,
        )
        self.image_column = self.options.image_fields(("image",))[0]
        self.output_column = self.options.output_field or "vqgan_tokens"
        if self.output_column == self.image_column:
            raise ValueError("output_column must differ from image_column")
        self.error_column = self.options.error_field or f"{self.output_column}_error"
        self.on_error = self.options.on_error
        self.keep_image = self.options.keep_image
        self.handle = ModelHandle.of(model, revision=revision, dtype=dtype,
                                     value_range=value_range)
        self.model = self.handle.load()
        self.engine = engine_for(self.handle, self.options)
        self.spec = self.handle.spec(self.options.image_size, preprocess=self.options.preprocess)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        columns = _numpy_columns(batch)
        if self.image_column not in columns:
            raise KeyError(f"no column {self.image_column!r} in the batch (columns: "
                           f"{', '.join(sorted(columns)) or 'none'}); set image_column=")
        images = columns[self.image_column]
        n = len(images)
        keys = columns.get("__key__")
        keys = [str(k) for k in keys] if keys is not None else list(range(n))
        results = self.engine.encode_iter(
            _rows(images), image_size=self.spec.image_size, keys=keys, on_error="null",
            preprocess=self.options.preprocess,
        )
        tokens = np.zeros((n, self.spec.sequence_length), np.dtype(self.spec.token_dtype))
        errors = np.full(n, None, dtype=object)
        for row, result in enumerate(results):
            if result.tokens is None:
                errors[row] = result.error
                if self.on_error == "raise":
                    urls = columns.get("__url__")
                    raise SampleError(result.error, keys[row],
                                      None if urls is None else str(urls[row]))
            else:
                tokens[row] = result.tokens
        out = {name: values for name, values in columns.items()
               if name != self.image_column or self.keep_image}
        if self.on_error == "skip":
            ok = np.array([e is None for e in errors], dtype=bool)
            out = {name: values[ok] for name, values in out.items()}
            tokens = tokens[ok]
            if not ok.all():
                logger.warning("skipped %d of %d rows that could not be read as images",
                               n - int(ok.sum()), n)
        out[self.output_column] = tokens
        if self.on_error == "null":
            out[self.error_column] = errors
        return out


def _numpy_columns(batch: Any) -> dict[str, np.ndarray]:
    """A Ray batch as {name: numpy array}: numpy batches as they are, pandas and Arrow too."""
    if isinstance(batch, dict):
        return {name: _as_array(values) for name, values in batch.items()}
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return {name: _as_array(values) for name, values in batch.to_pydict().items()}
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):  # pandas.DataFrame
        return {name: _as_array(list(batch[name])) for name in batch.columns}
    raise TypeError(
        f"RayTokenizer takes Ray batches (a dict of numpy arrays, pandas or pyarrow), got "
        f"{type(batch).__name__}; use map_batches(..., batch_format='numpy')"
    )


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    array = np.empty(len(values), dtype=object)  # never let numpy stack images into one array
    array[:] = list(values)
    return array


def _rows(images: np.ndarray):
    """One engine input per row: bytes, dicts, paths, or the row's HWC array."""
    for value in images:
        yield bytes(value) if isinstance(value, (bytearray, memoryview)) else value
