"""Hugging Face `datasets` adapters: images → token columns and back, with stable fingerprints.

    ds = ds.map(vqgan_tokenize, batched=True)          # image column → fixed-length uint16 tokens
    ds = write_metadata(ds, vqgan_tokenize.spec)       # or: ds = vqgan_tokenize.apply(ds)
    images = ds.with_transform(VQGANDetokenizer.from_dataset(ds))   # tokens → PIL, lazily

How the one-liner `Dataset.map(tok, batched=True)` gets a fixed-size token column and drops the
image column (datasets 5.2): an unformatted dataset hands a batched function a `LazyBatch`, and
`map` builds its output from that batch's entries plus what the function returns. The tokenizer
reads the image column straight from the batch's Arrow table (so datasets never decodes it and
large JPEGs can use draft decoding), deletes the image entry from the batch, and stores the
tokens *in* the batch as a `pyarrow.FixedSizeListArray`: Arrow arrays pass through to the writer
with their type (a returned dict may not hold them; a returned `pa.Table` would keep the type but
make `map` ignore the caller's `remove_columns`). With `on_error="skip"` the other columns are
filtered the same way, so rows stay aligned. An arrow-formatted dataset gets a `pa.Table` back.
Other formats, `input_columns=` and `IterableDataset.map` pass plain values: there the tokens
come back as a numpy array and the image column stays unless removed; `tok.apply(ds)` adds
`remove_columns` and `features` (and reads images undecoded) for every kind of dataset.

Fingerprints: pickling a tokenizer gives its small identity (`TokenizerSpec.identity()`: weights
digest, config, image size, value range, compute dtype, preprocessing, format version), plus the
columns and policies, plus where to reload the model from. `datasets` hashes that pickle, so equal
tokenizers share a cache entry across processes and different weights never do. The identity is
computed without loading the weights (config.json and the file digest; for Hub checkpoints the
digest is the cache blob's name).

Processes: the encoder already runs data-parallel on every local device, so `num_proc` buys
nothing. A `num_proc` worker forked from a process where JAX had started would hang, so the
tokenizer refuses to run there, with a message; workers forked before JAX started (a tokenizer
made from a name or path, whose weights the parent never loaded) load the model themselves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoints
from .config import VQGANConfig, _parse_value_range
from .metadata import FORMAT_VERSION, METADATA_KEY, TokenizerSpec

__all__ = [
    "DEFAULT_MODEL",
    "VQGANDetokenizer",
    "VQGANTokenizer",
    "read_metadata",
    "update_dataset_card",
    "vqgan_detokenize",
    "vqgan_tokenize",
    "write_hub_files",
    "write_metadata",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "flax-community/vqgan_f16_16384"
KEY_COLUMNS = ("__key__", "key", "id")  # a column that names rows in error messages
_ON_ERROR = ("raise", "skip", "null")
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_WARN_EVERY_S = 30.0


# ---------------------------------------------------------------------------------------------
# Fork safety: a process forked after JAX started must not touch JAX (its threads did not come
# along; the first device call can hang for ever).

_FORK_STATE = {"forked": False, "jax_started": False}


def _jax_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - JAX moved its internals: assume the worst
        return True
    backends = getattr(xla_bridge, "_backends", None)
    return bool(backends) if backends is not None else True


def _before_fork() -> None:
    # Runs in the parent, where reading JAX's state is safe; the child inherits the answer.
    _FORK_STATE["jax_started"] = _jax_started()


def _after_fork_in_child() -> None:
    _FORK_STATE["forked"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _check_fork_safety(what: str) -> None:
    if _FORK_STATE["forked"] and _FORK_STATE["jax_started"]:
        raise RuntimeError(
            f"{what} is running in a process forked after JAX had started in its parent (e.g. a "
            "`datasets` map(num_proc=...) worker); JAX cannot run there and would hang. Drop "
            "num_proc: the encoder already runs data-parallel on every local device and decodes "
            "images on host threads, so one process is as fast. (If you need worker processes, "
            "create the tokenizer from a model name or path and do not use JAX in the parent "
            "before map, or use the 'spawn' start method.)"
        )


# ---------------------------------------------------------------------------------------------
# The model behind a tokenizer: identified without loading the weights, loaded on first use.

_MODEL_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_MODEL_CACHE_LOCK = threading.Lock()


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {_COMPUTE_DTYPES}, got {dtype!r}")
    return name


def _value_range(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _parse_value_range(value)
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value!r}")
    return low, high


class _ModelSource:
    """What to load (Hub id or absolute local directory, commit) and its identity.

    `describe()` gives (config, weights digest, commit) from config.json and the weights file's
    digest, without reading the weights; `load()` reads them once per process (models are shared
    between tokenizers and detokenizers through a weak cache) and checks the digest.
    """

    def __init__(self, model: Any, revision: str | None, dtype: Any, value_range: Any) -> None:
        self.value_range = _value_range(value_range)
        self.revision = revision
        self._model = None
        self._described: tuple[VQGANConfig, str, str | None] | None = None
        self._lock = threading.RLock()  # load() describes under it
        self._name: str | os.PathLike | None = None  # normalized on first use, not at import
        self._ref: str | None = None
        if model is None:  # rebuilt from a pickle of an in-memory model: nothing to load
            self.dtype = _dtype_name(dtype or "float32")
        elif isinstance(model, (str, os.PathLike)):
            self._name = model
            self.dtype = _dtype_name(dtype or "float32")
        else:
            self._model = self._adapt(model, dtype)
            source = self._model.source
            self._name = source.name if source is not None else None
            self.revision = source.revision if source is not None else None
            self.dtype = _dtype_name(self._model.dtype.name)

    @property
    def ref(self) -> str | None:
        """Hub id, or the absolute path of a local directory; None for in-memory weights."""
        if self._ref is None and self._name is not None:
            self._ref = _normalize_ref(self._name)
        return self._ref

    def _adapt(self, model: Any, dtype: Any):
        """The given VQModel, or one sharing its weights with another dtype or value range."""
        if not (hasattr(model, "config") and hasattr(model, "params")):
            raise TypeError(
                f"model must be a Hub repo id, a local model directory or a VQModel, got "
                f"{type(model).__name__}"
            )
        want = _dtype_name(dtype) if dtype is not None else model.dtype.name
        config = model.config
        if self.value_range is not None and tuple(config.value_range) != self.value_range:
            config = config.replace(value_range=self.value_range)
        if want == model.dtype.name and config is model.config:
            return model
        return type(model)(config, model.params, dtype=want, source=model.source)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def expect(self, config: VQGANConfig, digest: str, commit: str | None) -> None:
        """Take the identity from a pickle: no files are read until the model is loaded."""
        self._described = (config, digest, commit)

    def describe(self) -> tuple[VQGANConfig, str, str | None]:
        if self._described is not None:
            return self._described
        with self._lock:
            if self._described is None:
                if self._model is not None:
                    model = self._model
                    self._described = (model.config, model.weights_digest, self.revision)
                else:
                    self._described = self._describe_files()
        return self._described

    def _describe_files(self) -> tuple[VQGANConfig, str, str | None]:
        directory, commit = checkpoints.resolve(self.ref, revision=self.revision)
        config = checkpoints.load_config(directory, name=self.ref)
        if self.value_range is not None:
            config = config.replace(value_range=self.value_range)
        digest = checkpoints.file_digest(checkpoints.weights_file(directory))
        return config, digest, commit

    def load(self):
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                self._model = self._load()
        return self._model

    def _load(self):
        config, digest, commit = self.describe()
        if self.ref is None:
            raise RuntimeError(
                "this copy was unpickled from a tokenizer built on an in-memory VQModel with no "
                "checkpoint file, so it cannot load the weights here (e.g. in a map(num_proc=...) "
                "worker). Save the model with model.save_pretrained(dir) and pass the directory, "
                "or drop num_proc."
            )
        key = (self.ref, commit, self.dtype, tuple(config.value_range), digest)
        with _MODEL_CACHE_LOCK:
            model = _MODEL_CACHE.get(key)
        if model is None:
            from .modeling import VQModel

            if _FORK_STATE["forked"]:
                logger.warning(
                    "loading %s in a forked worker process (map num_proc?): every worker holds "
                    "its own copy and all of them share the same devices, so num_proc brings no "
                    "speed-up (on GPUs they also compete for device memory)", self.ref,
                )
            model = VQModel.from_pretrained(
                self.ref, revision=commit or self.revision, dtype=self.dtype,
                value_range=tuple(config.value_range),
            )
            if model.weights_digest != digest:
                raise checkpoints.CheckpointError(
                    f"the weights of {self.ref} changed since this tokenizer's fingerprint was "
                    f"computed ({digest} then, {model.weights_digest} now); create the tokenizer "
                    "again"
                )
            with _MODEL_CACHE_LOCK:
                model = _MODEL_CACHE.setdefault(key, model)
        return model


def _normalize_ref(name: str | os.PathLike) -> str:
    """An existing local directory as an absolute path (the same in every process); else as given."""
    path = Path(os.fspath(name)).expanduser()
    return str(path.resolve()) if path.is_dir() else os.fspath(name)


# ---------------------------------------------------------------------------------------------
# Reading batches: LazyBatch (unformatted Dataset.map), dicts (IterableDataset.map, formatted
# datasets, with_transform) and plain lists (input_columns=[...]).


def _batch_kind(batch: Any) -> str:
    """"lazy" (unformatted Dataset.map), "table" (arrow format), "dict" (IterableDataset.map,
    other formats, transforms) or "column" (input_columns=[...])."""
    if _is_lazy(batch):
        return "lazy"
    if hasattr(batch, "column_names") and hasattr(batch, "schema"):  # pyarrow.Table
        return "table"
    return "dict" if isinstance(batch, Mapping) else "column"


def _column_names(batch: Any, kind: str) -> list[str]:
    return list(batch.column_names) if kind == "table" else list(batch)


def _is_lazy(batch: Any) -> bool:
    """An unformatted Dataset.map batch (datasets' LazyBatch), whose Arrow table we can read."""
    if not (hasattr(batch, "pa_table") and hasattr(batch, "keys_to_format")):
        return False
    if type(batch).__name__ == "LazyRow":
        raise TypeError("this function works on batches: call map(..., batched=True)")
    return True


def _check_batched(values: Any, column: str, *, row_is_list: bool = False) -> None:
    """Refuse a single row (map without batched=True), which would be read as a batch."""
    single = isinstance(values, (str, bytes, dict)) or hasattr(values, "convert")  # PIL image
    if row_is_list and isinstance(values, (list, tuple)) and values:
        single = isinstance(values[0], (int, np.integer))
    if single:
        raise TypeError(
            f"column {column!r} holds one row, not a batch: call map(..., batched=True)"
        )


def _arrow_images(column) -> list:
    """An image column's Arrow data as inputs `images.load_image` takes, without decoding."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind}:
        return column.to_pylist()  # [{"bytes": ..., "path": ...}], as Image(decode=False) gives
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        return column.to_pylist()
    return [None if v is None else np.asarray(v, dtype=np.uint8) for v in column.to_pylist()]


def _as_input(value: Any) -> Any:
    if value is None or isinstance(value, (str, bytes, dict, np.ndarray)):
        return value
    if hasattr(value, "numpy") and not hasattr(value, "convert"):  # torch / tf tensors
        return np.asarray(value)
    return value


def _path_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return getattr(value, "filename", None) or None


@dataclasses.dataclass
class MapStats:
    """Counts over a tokenizer's (or detokenizer's) life in this process."""

    rows: int = 0
    encoded: int = 0
    skipped: int = 0  # dropped under on_error="skip"
    nulls: int = 0  # written as null under on_error="null"
    decoded: int = 0


# ---------------------------------------------------------------------------------------------
# Tokenizer


class VQGANTokenizer:
    """A batched `map` function: an image column → a fixed-length token column.

    `ds.map(tok, batched=True)` (or `IterableDataset.map`): `image_column` may hold an `Image`
    feature (decoded or `decode=False`), paths, or encoded bytes. The output column holds h*w
    tokens in raster order, in the smallest unsigned dtype for the codebook (uint16 for 16,384
    codes), as an Arrow fixed_size_list. The image column is dropped unless `keep_image`.

    `model`: a Hub id, a local directory or a `VQModel`; loaded on the first call, never at
    construction or pickling. `image_size`: default the model's resolution. `dtype`: the compute
    dtype (default float32, or the given VQModel's). `value_range`: overrides the checkpoint's.
    `on_error`: "raise" (naming the row), "skip" (drop the row, counted and logged) or "null"
    (null tokens; `error_column`, default f"{output_column}_error", says why). `batch_size` is
    per device; unpickled copies (`num_proc` workers) use the default.
    """

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        image_column: str = "image",
        output_column: str = "vqgan_tokens",
        image_size: int | None = None,
        dtype: Any = None,
        value_range: Any = None,
        on_error: str = "raise",
        batch_size: int = 8,
        keep_image: bool = False,
        revision: str | None = None,
        error_column: str | None = None,
        draft: bool = True,
    ) -> None:
        if on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
        if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.image_column = image_column
        self.output_column = output_column
        self.error_column = error_column or f"{output_column}_error"
        self.on_error = on_error
        self.keep_image = bool(keep_image)
        self.draft = bool(draft)
        self.batch_size = int(batch_size)
        self.image_size = None if image_size is None else int(image_size)
        if output_column == image_column:
            raise ValueError("output_column must differ from image_column")
        self._source = _ModelSource(model, revision, dtype, value_range)
        self._spec: TokenizerSpec | None = None
        self.stats = MapStats()
        self._last_warning = 0.0
        if self._source.loaded:
            self.spec  # noqa: B018 - a VQModel is here already: check image_size now

    # -- identity ------------------------------------------------------------------------------

    @property
    def spec(self) -> TokenizerSpec:
        """What makes these tokens; computed without loading the weights."""
        if self._spec is None:
            config, digest, commit = self._source.describe()
            self._spec = TokenizerSpec.describe(
                config, digest, model_name=self._source.ref, revision=commit,
                image_size=self.image_size, compute_dtype=self._source.dtype, draft=self.draft,
            )
        return self._spec

    @property
    def loaded(self) -> bool:
        """Whether this process has loaded the weights (the first call does)."""
        return self._source.loaded

    @property
    def model(self):
        """The VQModel, loaded on first access."""
        _check_fork_safety(repr(self))
        return self._source.load()

    def features(self, input_features: Mapping | None = None):
        """The output `Features`: the input's (image dropped unless keep_image) plus the tokens
        as `List(Value(dtype), length=h*w)` and, with on_error="null", the error column."""
        from datasets import Features, List, Value

        out = Features()
        for name, feature in (input_features or {}).items():
            if name != self.image_column or self.keep_image:
                out[name] = feature
        spec = self.spec
        out[self.output_column] = List(Value(spec.token_dtype), length=spec.sequence_length)
        if self.on_error == "null":
            out[self.error_column] = Value("string")
        return out

    def __reduce__(self):
        spec = self.spec
        state = {
            "identity": spec.identity(),
            "model": self._source.ref,
            "revision": spec.revision,
            "image_column": self.image_column,
            "output_column": self.output_column,
            "error_column": self.error_column,
            "on_error": self.on_error,
            "keep_image": self.keep_image,
            "draft": self.draft,
        }
        return _rebuild_tokenizer, (state,)

    def __copy__(self) -> VQGANTokenizer:
        return self  # immutable as far as its output goes; copies must keep an in-memory model

    def __deepcopy__(self, memo: dict) -> VQGANTokenizer:
        return self

    def __repr__(self) -> str:
        model = self._source.ref or "in-memory VQModel"
        size = self.image_size or "model resolution"
        return (f"VQGANTokenizer({model!r}, image_size={size}, {self.image_column!r} → "
                f"{self.output_column!r}, on_error={self.on_error!r})")

    # -- the map function ----------------------------------------------------------------------

    def __call__(self, batch: Any, indices: Sequence[int] | None = None) -> Any:
        """One `map(batched=True)` call; `indices` comes from `with_indices=True`."""
        _check_fork_safety(repr(self))
        if isinstance(indices, (int, np.integer)):  # with_rank=True alone passes the rank
            indices = None
        kind = _batch_kind(batch)
        if kind != "column" and self.image_column not in _column_names(batch, kind):
            raise KeyError(
                f"no column {self.image_column!r} in the batch (columns: "
                f"{_column_names(batch, kind)}); pass image_column="
            )
        if kind in ("lazy", "table"):
            table = batch.pa_table if kind == "lazy" else batch
            values = _arrow_images(table[self.image_column])
            keys = _key_values(table, lazy=True)
        elif kind == "dict":
            _check_batched(batch[self.image_column], self.image_column)
            values = [_as_input(v) for v in batch[self.image_column]]
            keys = _key_values(batch, lazy=False)
        else:  # map(..., input_columns=[image_column]) passes the column alone
            _check_batched(batch, self.image_column)
            values = [_as_input(v) for v in batch]
            keys = None
        tokens, ok, errors = self._encode(values, keys, indices)
        return self._output(batch, kind, tokens, ok, errors)

    def _encode(self, values: list, keys: tuple[str, list] | None, indices):
        from .engine import get_engine

        spec = self.spec
        n = len(values)
        tokens = np.zeros((n, spec.sequence_length), dtype=spec.token_dtype)
        ok = np.zeros(n, dtype=bool)
        errors: list[str | None] = [None] * n
        if n:
            engine = get_engine(self.model, batch_size=self.batch_size)
            results = engine.encode_iter(
                values, image_size=spec.image_size, keys=range(n), on_error="null",
                draft=self.draft,
            )
            try:
                for result in results:
                    row = result.key
                    if result.tokens is not None:
                        tokens[row] = result.tokens
                        ok[row] = True
                        continue
                    reason = "image is missing (null)" if values[row] is None else result.error
                    errors[row] = reason
                    if self.on_error == "raise":
                        raise self._row_error(row, reason, values, keys, indices)
            finally:
                results.close()
        self._count(n, ok, keys, indices, errors)
        return tokens, ok, errors

    def _row_error(self, row: int, reason: str, values: list, keys, indices) -> Exception:
        from .images import ImageDecodeError

        what = f"column {self.image_column!r}: {reason}"
        if keys is not None:
            return ImageDecodeError(what, keys[1][row])
        if indices is not None:
            return ImageDecodeError(what, int(indices[row]))
        path = _path_of(values[row])
        where = f"row {row} of this map batch" + (f" (path {path!r})" if path else "")
        return ImageDecodeError(
            f"{where}, {what}. Add a {'/'.join(KEY_COLUMNS)} column or call "
            "map(..., with_indices=True) to have rows named by key or dataset index"
        )

    def _count(self, n: int, ok: np.ndarray, keys, indices, errors) -> None:
        failed = int(n - ok.sum())
        self.stats.rows += n
        self.stats.encoded += int(ok.sum())
        if not failed:
            return
        if self.on_error == "skip":
            self.stats.skipped += failed
        else:
            self.stats.nulls += failed
        for row in np.flatnonzero(~ok):
            name = keys[1][row] if keys else (indices[row] if indices is not None else row)
            logger.debug("row %r could not be tokenized (%s): %s", name, self.on_error, errors[row])
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            action = "skipped" if self.on_error == "skip" else "written as null"
            logger.warning(
                "%d of %d rows in this batch could not be read as images and were %s (in all "
                "so far: %d skipped, %d null of %d rows; tok.stats has the counts, the DEBUG "
                "log of %s names each row)", failed, n, action, self.stats.skipped,
                self.stats.nulls, self.stats.rows, __name__,
            )

    def _output(self, batch: Any, kind: str, tokens: np.ndarray, ok: np.ndarray, errors):
        import pyarrow as pa

        skip = self.on_error == "skip" and not ok.all()
        null = self.on_error == "null"
        if kind in ("lazy", "table"):
            # Arrow in, Arrow out: other columns pass through untouched (filtered by "skip").
            table = batch.pa_table if kind == "lazy" else batch
            mask = pa.array(ok) if skip else None
            columns = {
                name: table[name].filter(mask) if skip else table[name]
                for name in table.column_names
                if name != self.image_column or self.keep_image
            }
            nulls = None if (skip or not null or ok.all()) else pa.array(~ok)
            columns[self.output_column] = _fixed_size_list(tokens[ok] if skip else tokens, nulls)
            if null:
                columns[self.error_column] = pa.array(errors, type=pa.string())
            if kind == "table":  # with_format("arrow"): map takes a table as the new rows
                return pa.table(columns)
            # A LazyBatch: `map` writes the batch's own entries plus the returned dict, and a
            # returned dict may not hold Arrow arrays; so the outputs go into the batch itself.
            if not self.keep_image:
                del batch[self.image_column]
            for name, values in columns.items():
                if skip or name not in table.column_names:
                    batch[name] = values
            return {}
        out: dict[str, Any] = {}
        if kind == "dict" and skip:
            for name, values in batch.items():
                if name != self.image_column or self.keep_image:
                    out[name] = _take(values, ok)
        if null:
            out[self.output_column] = [t if good else None for t, good in zip(tokens, ok, strict=True)]
            out[self.error_column] = list(errors)
        else:
            out[self.output_column] = tokens[ok] if skip else tokens
        return out

    # -- convenience ---------------------------------------------------------------------------

    def apply(self, dataset: Any, **map_kwargs: Any) -> Any:
        """`dataset.map(self, batched=True, ...)` plus the arguments each kind of dataset needs,
        and the tokenizer's metadata recorded (`write_metadata`).

        An unformatted `Dataset` gets the plain one-liner (so it shares cache entries with it);
        an `IterableDataset`, a formatted dataset or `input_columns=` also get
        `remove_columns=[image_column]` and an undecoded image column (unless keep_image: then
        datasets decodes the images before the call, and a broken one fails in its decoder
        whatever on_error says), and `features=`. Rows holding images are written
        `writer_batch_size=100` at a time unless told otherwise (datasets' 1,000 rows of images
        can overflow a record batch).
        """
        map_kwargs["batched"] = True
        plain = _is_unformatted_dataset(dataset) and not map_kwargs.get("input_columns")
        features = _features_of(dataset)
        image_feature = None if features is None else features.get(self.image_column)
        if not plain and not self.keep_image and _decodes_images(image_feature):
            # Elsewhere datasets would decode every image with PIL before the call (and fail on
            # a broken one, whatever on_error says); raw bytes are also faster for us (drafts).
            # With keep_image the column is left as it is, so that its rows stay images.
            from datasets import Image

            dataset = dataset.cast_column(self.image_column, Image(decode=False))
            features = _features_of(dataset)
        if not plain:
            if not self.keep_image and self.image_column not in (map_kwargs.get("remove_columns") or []):
                map_kwargs["remove_columns"] = list(map_kwargs.get("remove_columns") or []) + [
                    self.image_column
                ]
            if features is not None and "features" not in map_kwargs:
                removed = set(map_kwargs.get("remove_columns") or [])
                kept = {k: v for k, v in features.items() if k not in removed}
                map_kwargs["features"] = self.features(kept)
        if self.keep_image and "writer_batch_size" not in map_kwargs and _is_map_style(dataset):
            map_kwargs["writer_batch_size"] = 100
        out = dataset.map(self, **map_kwargs)
        return write_metadata(out, self.spec, self.output_column)


def _rebuild_tokenizer(state: Mapping[str, Any]) -> VQGANTokenizer:
    identity = dict(state["identity"])
    tok = VQGANTokenizer(
        state["model"],
        image_column=state["image_column"],
        output_column=state["output_column"],
        error_column=state["error_column"],
        image_size=identity["image_size"],
        dtype=identity["compute_dtype"],
        value_range=identity["value_range"],
        on_error=state["on_error"],
        keep_image=state["keep_image"],
        revision=state["revision"],
        draft=state["draft"],
    )
    spec = TokenizerSpec.from_dict({**identity, "model_name": state["model"],
                                    "revision": state["revision"]})
    tok._source.expect(VQGANConfig.from_dict(spec.config), spec.weights_digest, spec.revision)
    tok._spec = spec
    return tok


def _key_values(batch: Any, *, lazy: bool) -> tuple[str, list] | None:
    names = batch.column_names if lazy else list(batch)
    for name in KEY_COLUMNS:
        if name in names:
            values = batch[name].to_pylist() if lazy else list(batch[name])
            return name, values
    return None


def _take(values: Any, ok: np.ndarray) -> Any:
    if isinstance(values, np.ndarray):
        return values[ok]
    if hasattr(values, "filter") and hasattr(values, "type"):  # pyarrow
        import pyarrow as pa

        return values.filter(pa.array(ok))
    return [v for v, good in zip(values, ok, strict=True) if good]


def _fixed_size_list(tokens: np.ndarray, nulls=None):
    """[n, L] → an Arrow fixed_size_list<L> array (`nulls`: a boolean array, True = null row)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(tokens).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, tokens.shape[1], mask=nulls)


def _decodes_images(feature: Any) -> bool:
    return type(feature).__name__ == "Image" and bool(getattr(feature, "decode", False))


def _is_map_style(dataset: Any) -> bool:
    from datasets import Dataset, DatasetDict

    return isinstance(dataset, (Dataset, DatasetDict))


def _is_unformatted_dataset(dataset: Any) -> bool:
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        return all(_is_unformatted_dataset(d) for d in dataset.values())
    return isinstance(dataset, Dataset) and dataset.format.get("type") is None


def _features_of(dataset: Any):
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        first = next(iter(dataset.values()), None)
        return None if first is None else first.features
    return getattr(dataset, "features", None)


# ---------------------------------------------------------------------------------------------
# Detokenizer


class VQGANDetokenizer:
    """Tokens → PIL images, for `map(batched=True)`, `with_transform`/`set_transform` (only the
    rows accessed are decoded) and `IterableDataset.map` (streamed, nothing materialized).

    With `map` on an unformatted `Dataset` the token column is dropped unless `keep_tokens`,
    and the images are written as an `Image()` feature. As a transform, every other column is
    returned unchanged. `grid` (h, w) defaults to a square.
    """

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        token_column: str = "vqgan_tokens",
        output_column: str = "image",
        keep_tokens: bool = False,
        batch_size: int = 8,
        revision: str | None = None,
        value_range: Any = None,
        dtype: Any = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if token_column == output_column:
            raise ValueError("output_column must differ from token_column")
        self.token_column = token_column
        self.output_column = output_column
        self.keep_tokens = bool(keep_tokens)
        self.batch_size = int(batch_size)
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self._source = _ModelSource(model, revision, dtype, value_range)
        self.stats = MapStats()

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        *,
        model: Any = None,
        token_column: str | None = None,
        value_range: Any = None,
        **kwargs: Any,
    ) -> VQGANDetokenizer:
        """The decoder for a token dataset, from its recorded metadata (`read_metadata`).

        Without `model` the recorded model (Hub id and commit, or local directory) is used;
        with one, it must be the model that made the tokens: tokens from other weights, another
        codebook or value range are refused with the reason.
        """
        column, recorded = _read_column_metadata(dataset, token_column)
        if model is None:
            model = recorded.model_name
            if model is None:
                raise ValueError(
                    f"the tokens in {column!r} were made by an in-memory model with no name "
                    f"(weights {recorded.weights_digest}); pass model= (a directory or VQModel "
                    "with those weights)"
                )
            if os.path.isabs(model) and not os.path.isdir(model):
                raise ValueError(
                    f"the tokens in {column!r} were made by the local model {model!r}, which "
                    "does not exist here; pass model= (a directory, Hub id or VQModel with "
                    f"weights {recorded.weights_digest})"
                )
            kwargs.setdefault("revision", recorded.revision)
        detok = cls(
            model,
            token_column=column,
            value_range=recorded.value_range if value_range is None else value_range,
            grid=kwargs.pop("grid", None) or tuple(recorded.grid),
            **kwargs,
        )
        reason = recorded.mismatch(detok.spec_for(recorded.image_size))
        if reason:
            raise ValueError(
                f"the tokens in {column!r} cannot be decoded by {detok._source.ref or 'this model'}:"
                f" {reason}"
            )
        return detok

    def spec_for(self, image_size: int | None = None) -> TokenizerSpec:
        """This model's spec (for comparing with recorded metadata); no weights are read."""
        config, digest, commit = self._source.describe()
        return TokenizerSpec.describe(config, digest, model_name=self._source.ref,
                                      revision=commit, image_size=image_size,
                                      compute_dtype=self._source.dtype)

    @property
    def loaded(self) -> bool:
        return self._source.loaded

    @property
    def model(self):
        _check_fork_safety(repr(self))
        return self._source.load()

    def features(self, input_features: Mapping | None = None):
        """The output `Features` of `map`: the input's (tokens dropped unless keep_tokens) plus
        an `Image()` column."""
        from datasets import Features, Image

        out = Features()
        for name, feature in (input_features or {}).items():
            if name != self.token_column or self.keep_tokens:
                out[name] = feature
        out[self.output_column] = Image()
        return out

    def __reduce__(self):
        config, digest, commit = self._source.describe()
        state = {
            "weights_digest": digest,
            "config": config.to_dict(),
            "compute_dtype": self._source.dtype,
            "format_version": FORMAT_VERSION,
            "model": self._source.ref,
            "revision": commit,
            "token_column": self.token_column,
            "output_column": self.output_column,
            "keep_tokens": self.keep_tokens,
            "grid": None if self.grid is None else list(self.grid),
        }
        return _rebuild_detokenizer, (state,)

    def __copy__(self) -> VQGANDetokenizer:
        return self

    def __deepcopy__(self, memo: dict) -> VQGANDetokenizer:
        return self

    def __repr__(self) -> str:
        return (f"VQGANDetokenizer({self._source.ref or 'in-memory VQModel'!r}, "
                f"{self.token_column!r} → {self.output_column!r})")

    def __call__(self, batch: Any, indices: Sequence[int] | None = None) -> Any:
        """One `map(batched=True)` call or one transform call."""
        _check_fork_safety(repr(self))
        kind = _batch_kind(batch)
        if kind == "column":
            raise TypeError("VQGANDetokenizer needs the whole batch: do not pass input_columns")
        if self.token_column not in _column_names(batch, kind):
            raise KeyError(
                f"no column {self.token_column!r} in the batch (columns: "
                f"{_column_names(batch, kind)}); pass token_column="
            )
        if kind in ("lazy", "table"):
            table = batch.pa_table if kind == "lazy" else batch
            codes, valid = _arrow_codes(table[self.token_column])
        else:
            values = batch[self.token_column]
            _check_batched(values, self.token_column, row_is_list=True)
            codes, valid = _python_codes(values)
        images = self._decode(codes, valid)
        if kind == "lazy":
            if not self.keep_tokens:
                del batch[self.token_column]
            return {self.output_column: images}  # written as an Image() feature
        if kind == "table":
            from datasets import Image

            keep = [n for n in batch.column_names if n != self.token_column or self.keep_tokens]
            storage = Image().encode_example  # PNG bytes, as datasets stores PIL images
            encoded = [None if im is None else storage(im) for im in images]
            return batch.select(keep).append_column(self.output_column, _image_array(encoded))
        # A transform's output replaces the batch, so every other column is returned too (in
        # IterableDataset.map they are merged back unchanged).
        out = {k: v for k, v in batch.items() if k != self.token_column or self.keep_tokens}
        out[self.output_column] = images
        return out

    def _decode(self, codes: np.ndarray, valid: np.ndarray) -> list:
        from PIL import Image

        n = len(valid)
        images: list = [None] * n
        if codes.shape[0]:
            from .engine import get_engine

            engine = get_engine(self.model, batch_size=self.batch_size)
            pixels = engine.decode(codes, grid=self.grid)
            for row, image in zip(np.flatnonzero(valid), pixels, strict=True):
                images[row] = Image.fromarray(image)
        self.stats.rows += n
        self.stats.decoded += int(codes.shape[0])
        self.stats.nulls += int(n - codes.shape[0])
        return images


def _rebuild_detokenizer(state: Mapping[str, Any]) -> VQGANDetokenizer:
    config = VQGANConfig.from_dict(state["config"])
    detok = VQGANDetokenizer(
        state["model"],
        token_column=state["token_column"],
        output_column=state["output_column"],
        keep_tokens=state["keep_tokens"],
        revision=state["revision"],
        value_range=config.value_range,
        dtype=state["compute_dtype"],
        grid=state["grid"],
    )
    detok._source.expect(config, state["weights_digest"], state["revision"])
    return detok


def _arrow_codes(column) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size or variable) list column → int codes [n_valid, L] and the validity mask."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    present = column.filter(pa.array(valid)) if not valid.all() else column
    if len(present) == 0:
        return np.zeros((0, 0), np.int32), valid
    if pa.types.is_fixed_size_list(present.type):
        width = present.type.list_size
    else:
        lengths = pa.compute.list_value_length(present).to_numpy()
        if (lengths != lengths[0]).any():
            raise ValueError(f"token rows have different lengths ({sorted(set(lengths))[:4]}...)")
        width = int(lengths[0])
    flat = present.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(present), width), valid


def _image_array(encoded: list):
    import pyarrow as pa
    from datasets import Image

    return pa.array(encoded, type=Image().pa_type)


def _python_codes(values: Iterable) -> tuple[np.ndarray, np.ndarray]:
    rows = list(values)
    valid = np.array([r is not None for r in rows], dtype=bool)
    present = [np.asarray(r) for r in rows if r is not None]
    if not present:
        return np.zeros((0, 0), np.int32), valid
    return np.stack(present), valid


# ---------------------------------------------------------------------------------------------
# Metadata: in `info.description` (survives map/select/save_to_disk, and the dataset card's
# `dataset_info.description` brings it back on load_dataset) and in the card's own YAML key.

_DESCRIPTION_LINE = re.compile(rf"^{METADATA_KEY}: (\{{.*\}})\s*$", re.MULTILINE)


def _parse_description(description: str | None) -> dict[str, Any]:
    match = _DESCRIPTION_LINE.search(description or "")
    return json.loads(match.group(1)) if match else {}


def _format_description(description: str | None, record: Mapping[str, Any]) -> str:
    line = f"{METADATA_KEY}: {json.dumps(record, sort_keys=True)}"
    text = _DESCRIPTION_LINE.sub("", description or "").rstrip()
    return f"{text}\n\n{line}" if text else line


def _infos(dataset: Any) -> list:
    from datasets import DatasetInfo

    if isinstance(dataset, DatasetInfo):
        return [dataset]
    if isinstance(dataset, Mapping) and not hasattr(dataset, "info"):  # DatasetDict-like
        return [d.info for d in dataset.values()]
    info = getattr(dataset, "info", None)
    if info is None:
        raise TypeError(f"expected a Dataset, IterableDataset or DatasetDict, got {type(dataset).__name__}")
    return [info]


def write_metadata(dataset: Any, spec: TokenizerSpec, column: str = "vqgan_tokens") -> Any:
    """Record that `column` holds tokens made by `spec`; returns `dataset` (its info is updated
    in place; every split of a DatasetDict). Several token columns can be recorded."""
    features = _features_of(dataset)
    if features is not None:
        if column not in features:
            raise ValueError(f"no column {column!r} to describe (columns: {list(features)})")
        length = getattr(features[column], "length", None)
        if length not in (None, -1, spec.sequence_length):
            raise ValueError(
                f"column {column!r} holds {length} tokens per row, the spec {spec.sequence_length}"
            )
    for info in _infos(dataset):
        record = _parse_description(info.description)
        record.setdefault("columns", {})[column] = spec.to_dict()
        info.description = _format_description(info.description, record)
    return dataset


def read_metadata(source: Any, column: str | None = None) -> TokenizerSpec:
    """The `TokenizerSpec` recorded for `column` (default: the only token column recorded).

    `source`: a Dataset, IterableDataset, DatasetDict or DatasetInfo; or a local dataset
    directory / Hub dataset repo id, whose README.md card is read.
    """
    return _read_column_metadata(source, column)[1]


def _read_column_metadata(source: Any, column: str | None) -> tuple[str, TokenizerSpec]:
    if isinstance(source, (str, os.PathLike)):
        columns = _card_record(source).get("columns", {})
        where = f"the dataset card of {os.fspath(source)!r}"
    else:
        columns = {}
        for info in _infos(source):
            columns.update(_parse_description(info.description).get("columns", {}))
        where = "this dataset's info"
    if not columns:
        raise ValueError(
            f"no {METADATA_KEY} metadata in {where}: was it tokenized with "
            "VQGANTokenizer.apply or recorded with write_metadata?"
        )
    if column is None:
        if len(columns) > 1:
            raise ValueError(f"several token columns are recorded ({sorted(columns)}); pass column=")
        column = next(iter(columns))
    if column not in columns:
        raise ValueError(f"no metadata for column {column!r}; recorded: {sorted(columns)}")
    return column, TokenizerSpec.from_dict(columns[column])


def _card_record(source: str | os.PathLike) -> dict[str, Any]:
    from huggingface_hub import DatasetCard

    path = Path(os.fspath(source))
    readme = path / "README.md" if path.is_dir() else path
    card = DatasetCard.load(readme if readme.is_file() else os.fspath(source), repo_type="dataset")
    record = card.data.to_dict().get(METADATA_KEY)
    if record:
        return record
    info = card.data.to_dict().get("dataset_info") or {}
    for entry in info if isinstance(info, list) else [info]:
        found = _parse_description(entry.get("description"))
        if found:
            return found
    return {}


def update_dataset_card(card: Any, dataset: Any, config_name: str = "default") -> Any:
    """Add the dataset's recorded metadata to a `DatasetCard` (e.g. the one `push_to_hub` wrote):
    a top-level `vqgan_datasets` YAML key (kept by later `push_to_hub` calls) and
    `dataset_info.description` (which `load_dataset` reads back into `ds.info.description`).
    Returns the card."""
    record: dict[str, Any] = {}
    for info in _infos(dataset):
        for name, spec in _parse_description(info.description).get("columns", {}).items():
            record.setdefault("columns", {})[name] = spec
    if not record:
        raise ValueError(f"the dataset carries no {METADATA_KEY} metadata (see write_metadata)")
    card.data[METADATA_KEY] = record
    info = card.data.get("dataset_info")
    entries = info if isinstance(info, list) else [info] if isinstance(info, dict) else []
    for entry in entries:
        if len(entries) == 1 or entry.get("config_name", "default") == config_name:
            entry["description"] = _format_description(entry.get("description"), record)
    if not entries:
        card.data["dataset_info"] = {"description": _format_description(None, record)}
    return card


def write_hub_files(
    dataset: Any,
    directory: str | os.PathLike,
    *,
    split: str | None = None,
    max_shard_size: int | str = "500MB",
) -> list[Path]:
    """Write what `push_to_hub` would upload, locally: `data/{split}-{i:05d}-of-{n:05d}.parquet`
    shards and a README.md card (dataset_info, configs, and the recorded metadata). `load_dataset`
    reads the directory back like the Hub repo. Returns the files written."""
    import pyarrow.parquet as pq
    from datasets import DatasetDict, DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.table import embed_table_storage
    from datasets.utils.metadata import MetadataConfigs
    from datasets.utils.py_utils import convert_file_size_to_int
    from huggingface_hub import DatasetCard, DatasetCardData

    root = Path(directory)
    (root / "data").mkdir(parents=True, exist_ok=True)
    splits = dict(dataset) if isinstance(dataset, DatasetDict) else {
        split or str(dataset.split or "train"): dataset
    }
    limit = convert_file_size_to_int(max_shard_size)
    written: list[Path] = []
    info = DatasetInfo(config_name="default", features=None, splits=SplitDict(),
                       download_size=0, dataset_size=0)
    for name, ds in splits.items():
        nbytes = ds._estimate_nbytes() if hasattr(ds, "_estimate_nbytes") else ds.data.nbytes
        num_shards = int(nbytes / limit) + 1
        for index in range(num_shards):
            shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
            shard = shard.with_format("arrow").map(embed_table_storage, batched=True,
                                                    keep_in_memory=True)
            path = root / "data" / f"{name}-{index:05d}-of-{num_shards:05d}.parquet"
            tmp = path.with_suffix(".parquet.tmp")
            shard.with_format(None).to_parquet(str(tmp))
            os.replace(tmp, path)
            written.append(path)
            info.download_size += path.stat().st_size
        info.features = Features(ds.features)
        info.splits.add(SplitInfo(name=name, num_bytes=nbytes, num_examples=len(ds)))
        info.dataset_size += nbytes
        pq.read_schema(written[-1])  # fail here, not on load, if a shard is unreadable
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": [
        {"split": name, "path": f"data/{name}-*"} for name in splits
    ]}}).to_dataset_card_data(card_data)
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n")
    has_metadata = any(_parse_description(i.description) for i in _infos(dataset))
    if has_metadata:
        card = update_dataset_card(card, dataset)
    readme = root / "README.md"
    card.save(str(readme))
    written.append(readme)
    return written


# ---------------------------------------------------------------------------------------------
# Ready instances for the default checkpoint: nothing is resolved or loaded until first use.

vqgan_tokenize = VQGANTokenizer()
vqgan_detokenize = VQGANDetokenizer()
