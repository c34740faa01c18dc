"""`VQGANTokenizer`: a batched `datasets` map function, image column → fixed-length tokens.

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
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..handle import ModelHandle
from ..metadata import TokenizerSpec
from ..models.config import VQGANConfig
from ..options import EncodeOptions, encode_options
from . import arrow as hf_arrow
from .hub import write_metadata
from .model import DEFAULT_MODEL, check_fork_safety, load_model, sent_to_worker_pool

__all__ = ["MapStats", "VQGANTokenizer"]

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0
_warned_decoded = False
# datasets' own decode rate, one core (benchmarks/hf_oneliner.py, 2-core dev machine).
_SERIAL_DECODE = "400-600 images/s for 400-1100 px JPEGs, measured"
# The settings that change what a tokenizer writes: its pickle (the fingerprint) holds these,
# not batch_size or workers, so that those can change without missing the cache.
_OUTPUT_SETTINGS = ("image_field", "output_field", "error_field", "on_error", "keep_image",
                    "preprocess")


@dataclasses.dataclass
class MapStats:
    """Counts over a tokenizer's (or detokenizer's) life in this process."""

    rows: int = 0
    encoded: int = 0
    skipped: int = 0  # dropped under on_error="skip"
    nulls: int = 0  # written as null under on_error="null"
    decoded: int = 0


class VQGANTokenizer:
    """A batched `map` function: an image column → a fixed-length token column.

    `ds.map(tok, batched=True)` (or `IterableDataset.map`): the image column may hold an `Image`
    feature (decoded or `decode=False`), paths, encoded bytes, arrays (HWC; the torch format's
    CHW tensors are transposed back). On an unformatted Dataset the one-liner reads the encoded
    bytes, never decoding in this process; where datasets has decoded them (streams, formats)
    it warns once, naming `apply`, which avoids that. The output column holds h*w
    tokens in raster order, in the smallest unsigned dtype for the codebook (uint16 for 16,384
    codes) unless `token_dtype` says otherwise, as an Arrow fixed_size_list. The image column is
    dropped unless `keep_image`.

    `model`: a Hub id, a local directory, a `VQModel` or a `ModelHandle`; loaded on the first
    call, never at construction or pickling. `dtype`: the compute dtype (default float32, or the
    given VQModel's). `value_range`: overrides the checkpoint's. `revision`: a Hub branch, tag or
    commit. Everything else is an `EncodeOptions`: pass `options=`, or its fields as keywords
    (a keyword given overrides the same field of `options`): `image_column` (default "image"),
    `output_column` ("vqgan_tokens"), `error_column` (f"{output_column}_error"), `image_size`
    (the model's resolution), `on_error` ("raise" names the row; "skip" drops it, counted and
    logged; "null" writes null tokens and the reason), `preprocess` ("exact" or "fast"),
    `batch_size` (per device; None: the engine's default for the backend), `workers`
    (preprocessing processes), `keep_image`, `token_dtype`. `draft` is deprecated and ignored.
    Unpickled copies (`num_proc` workers) use the default batch_size and workers.
    """

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        options: EncodeOptions | None = None,
        image_column: str | None = None,
        output_column: str | None = None,
        image_size: int | None = None,
        dtype: Any = None,
        value_range: Any = None,
        on_error: str | None = None,
        batch_size: int | None = None,
        keep_image: bool | None = None,
        revision: str | None = None,
        error_column: str | None = None,
        preprocess: str | None = None,
        workers: int | None = None,
        token_dtype: str | None = None,
        draft: bool | None = None,
    ) -> None:
        options = encode_options(
            options, image_column=image_column, output_column=output_column,
            error_column=error_column, image_size=image_size, on_error=on_error,
            batch_size=batch_size, keep_image=keep_image, preprocess=preprocess,
            workers=workers, token_dtype=token_dtype, draft=draft,
        )
        handle = ModelHandle.of(model, revision=revision, dtype=dtype, value_range=value_range)
        self._init(handle, _resolved(options))

    def _init(self, handle: ModelHandle | None, options: EncodeOptions) -> None:
        """`handle` None: an unpickled copy of a tokenizer built on an in-memory VQModel."""
        self.options = options
        self._source = handle
        self._spec: TokenizerSpec | None = None
        self._spec_of: tuple | None = None  # the model's description it was made from
        self.stats = MapStats()
        self._last_warning = 0.0
        self._parent_warned = False  # unpickled in a pool worker whose parent warned
        self._unhashed: str | None = None  # why __reduce__ could not describe the model
        self._nonce: str | None = None
        if handle is not None and handle.loaded:
            self.spec  # noqa: B018 - a VQModel is here already: check image_size now

    # -- settings (read-only: they are in the fingerprint) ---------------------------------------

    @property
    def image_column(self) -> str:
        return self.options.image_field

    @property
    def output_column(self) -> str:
        return self.options.output_field

    @property
    def error_column(self) -> str:
        return self.options.error_field

    @property
    def on_error(self) -> str:
        return self.options.on_error

    @property
    def keep_image(self) -> bool:
        return self.options.keep_image

    @property
    def image_size(self) -> int | None:
        return self.options.image_size

    @property
    def preprocess(self) -> str:
        return self.options.preprocess

    @property
    def batch_size(self) -> int | None:
        return self.options.batch_size

    # -- identity ------------------------------------------------------------------------------

    @property
    def spec(self) -> TokenizerSpec:
        """What makes these tokens; computed without loading the weights (again when the given
        VQModel's params were replaced since: the fingerprint follows the weights)."""
        described = None if self._source is None else self._source.describe()
        if self._spec is None or described is not self._spec_of:
            spec = self._source.spec(self.options.image_size, preprocess=self.options.preprocess)
            self._spec, self._spec_of = _with_token_dtype(spec, self.options.token_dtype), described
        return self._spec

    @property
    def loaded(self) -> bool:
        """Whether this process has loaded the weights (the first call does)."""
        return self._source is not None and self._source.loaded

    @property
    def model(self):
        """The VQModel, loaded on first access."""
        return load_model(self._source, repr(self), warn_fork=not self._parent_warned)

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
        pool = sent_to_worker_pool(repr(self))
        try:
            spec = self.spec
        except Exception as e:  # e.g. a Hub model not in the cache, offline
            # datasets hashes this pickle and hides any error behind "couldn't be hashed";
            # pickle what is known instead (never a cache hit: a per-object nonce), and the
            # first call raises the real, actionable error.
            self._unhashed = f"{type(e).__name__}: {e}"
            logger.debug("%r: model not described for pickling: %s", self, self._unhashed)
            return _rebuild_unresolved, (self._unresolved_state(), pool)
        state = {
            "identity": spec.identity(),
            "model": spec.model_name,
            "revision": spec.revision,
            "options": {name: getattr(self.options, name) for name in _OUTPUT_SETTINGS},
        }
        return (_rebuild_tokenizer, (state, True)) if pool else (_rebuild_tokenizer, (state,))

    def _unresolved_state(self) -> dict[str, Any]:
        source = self._source
        self._nonce = self._nonce or uuid.uuid4().hex
        return {
            "model": source.ref, "revision": source.revision, "dtype": source.dtype,
            "value_range": source.value_range, "nonce": self._nonce,
            "options": {name: getattr(self.options, name)
                        for name in (*_OUTPUT_SETTINGS, "image_size", "token_dtype")},
        }

    def __copy__(self) -> VQGANTokenizer:
        return self  # immutable as far as its output goes; copies must keep an in-memory model

    def __deepcopy__(self, memo: dict) -> VQGANTokenizer:
        return self

    def __repr__(self) -> str:
        model = (self._source and self._source.ref) or "in-memory VQModel"
        size = self.image_size or "model resolution"
        return (f"VQGANTokenizer({model!r}, image_size={size}, {self.image_column!r} → "
                f"{self.output_column!r}, on_error={self.on_error!r}, "
                f"preprocess={self.preprocess!r})")

    # -- the map function ----------------------------------------------------------------------

    def __call__(self, batch: Any, indices: Sequence[int] | None = None) -> Any:
        """One `map(batched=True)` call; `indices` comes from `with_indices=True`."""
        check_fork_safety(repr(self))
        if isinstance(indices, (int, np.integer)):  # with_rank=True alone passes the rank
            indices = None
        kind = hf_arrow.batch_kind(batch)
        if kind != "column" and self.image_column not in hf_arrow.column_names(batch, kind):
            raise KeyError(
                f"no column {self.image_column!r} in the batch (columns: "
                f"{hf_arrow.column_names(batch, kind)}); pass image_column="
            )
        if kind in ("lazy", "table"):
            table = hf_arrow.arrow_table(batch, kind)
            values = hf_arrow.arrow_images(table[self.image_column])
            keys = hf_arrow.key_values(table, lazy=True)
        elif kind == "dict":
            hf_arrow.check_batched(batch[self.image_column], self.image_column)
            values = [hf_arrow.as_input(v) for v in batch[self.image_column]]
            keys = hf_arrow.key_values(batch, lazy=False)
        else:  # map(..., input_columns=[image_column]) passes the column alone
            hf_arrow.check_batched(batch, self.image_column)
            values = [hf_arrow.as_input(v) for v in batch]
            keys = None
        if kind in ("dict", "column"):
            self._warn_if_decoded(values)
        tokens, ok, errors = self._encode(values, keys, indices)
        return self._output(batch, kind, tokens, ok, errors)

    def _warn_if_decoded(self, values: list) -> None:
        """Once per process: images that datasets decoded before the call (an `Image()` column
        in a stream, a formatted dataset or input_columns=) when the encoded bytes would do."""
        global _warned_decoded
        if _warned_decoded or not any(hf_arrow.is_decoded_file(v) for v in values):
            return
        _warned_decoded = True
        column = self.image_column
        logger.warning(
            "%r received images that datasets had already decoded, one at a time in this "
            "process, before the call (an Image() column in a stream, a formatted dataset or "
            "input_columns=). That serial decode caps the pipeline at one core's rate (%s), "
            "where encoded bytes are decoded in the tokenizer's worker processes: call "
            "tok.apply(ds) (e.g. vqgan_tokenize.apply(ds)), or first ds = "
            "ds.cast_column(%r, Image(decode=False)).", self, _SERIAL_DECODE, column,
        )

    def _encode(self, values: list, keys: tuple[str, list] | None, indices):
        from ..pipeline.engine import get_engine

        spec = self.spec
        if self._unhashed is not None:
            logger.warning(
                "%r: this map's output is cached under a random fingerprint (never reused): "
                "the model could not be described when datasets hashed the tokenizer (%s)",
                self, self._unhashed)
            self._unhashed = None
        n = len(values)
        tokens = np.zeros((n, spec.sequence_length), dtype=spec.token_dtype)
        ok = np.zeros(n, dtype=bool)
        errors: list[str | None] = [None] * n
        if n:
            engine = get_engine(self.model, **self.options.engine_kwargs())
            results = engine.encode_iter(
                values, image_size=spec.image_size, keys=range(n), on_error="null",
                preprocess=self.options.preprocess,
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
        from ..pipeline.images import ImageDecodeError

        what = f"column {self.image_column!r}: {reason}"
        if keys is not None:
            return ImageDecodeError(what, keys[1][row])
        if indices is not None:
            return ImageDecodeError(what, int(indices[row]))
        path = hf_arrow.path_of(values[row])
        where = f"row {row} of this map batch" + (f" (path {path!r})" if path else "")
        return ImageDecodeError(
            f"{where}, {what}. Add a {'/'.join(hf_arrow.KEY_COLUMNS)} column or call "
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
            table = hf_arrow.arrow_table(batch, kind)
            mask = pa.array(ok) if skip else None
            columns = {
                name: table[name].filter(mask) if skip else table[name]
                for name in table.column_names
                if name != self.image_column or self.keep_image
            }
            nulls = None if (skip or not null or ok.all()) else pa.array(~ok)
            columns[self.output_column] = hf_arrow.fixed_size_list(
                tokens[ok] if skip else tokens, nulls)
            if null:
                columns[self.error_column] = pa.array(errors, type=pa.string())
            if kind == "table":  # with_format("arrow"): map takes a table as the new rows
                return pa.table(columns)
            # A LazyBatch: the outputs go into the batch itself (see hf_arrow).
            hf_arrow.set_lazy_columns(
                batch,
                drop=() if self.keep_image else (self.image_column,),
                columns={name: values for name, values in columns.items()
                         if skip or name not in table.column_names},
            )
            return {}
        out: dict[str, Any] = {}
        if kind == "dict" and skip:
            for name, values in batch.items():
                if name != self.image_column or self.keep_image:
                    out[name] = hf_arrow.take(values, ok)
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
        plain = hf_arrow.is_unformatted_dataset(dataset) and not map_kwargs.get("input_columns")
        features = hf_arrow.features_of(dataset)
        image_feature = None if features is None else features.get(self.image_column)
        if not plain and not self.keep_image and hf_arrow.decodes_images(image_feature):
            # Elsewhere datasets would decode every image with PIL before the call (and fail on
            # a broken one, whatever on_error says); raw bytes also skip a PIL round trip.
            # With keep_image the column is left as it is, so that its rows stay images.
            from datasets import Image

            dataset = dataset.cast_column(self.image_column, Image(decode=False))
            features = hf_arrow.features_of(dataset)
        if not plain:
            if not self.keep_image and self.image_column not in (map_kwargs.get("remove_columns") or []):
                map_kwargs["remove_columns"] = list(map_kwargs.get("remove_columns") or []) + [
                    self.image_column
                ]
            if features is not None and "features" not in map_kwargs:
                removed = set(map_kwargs.get("remove_columns") or [])
                kept = {k: v for k, v in features.items() if k not in removed}
                map_kwargs["features"] = self.features(kept)
        if self.keep_image and "writer_batch_size" not in map_kwargs and hf_arrow.is_map_style(dataset):
            map_kwargs["writer_batch_size"] = 100
        out = dataset.map(self, **map_kwargs)  # an empty split: not called, columns given here
        out = hf_arrow.fill_empty_splits(out, self.output_column, self.features)
        return write_metadata(out, self.spec, self.output_column)


def _resolved(options: EncodeOptions) -> EncodeOptions:
    """`options` with this adapter's default column names filled in; one image column."""
    image = options.image_field or "image"
    if isinstance(image, tuple):
        if len(image) != 1:
            raise ValueError(f"a datasets tokenizer reads one image column, got {image!r}")
        image = image[0]
    output = options.output_field or "vqgan_tokens"
    return options.replace(image_field=image, output_field=output,
                           error_field=options.error_field or f"{output}_error")


def _with_token_dtype(spec: TokenizerSpec, token_dtype: str | None) -> TokenizerSpec:
    """`spec` storing tokens as `token_dtype` (None: the smallest unsigned dtype), checked to
    hold every code of the codebook."""
    if token_dtype is None or token_dtype == spec.token_dtype:
        return spec
    if np.iinfo(token_dtype).max < spec.codebook_size - 1:
        raise ValueError(
            f"token_dtype {token_dtype} cannot hold codes up to {spec.codebook_size - 1} "
            f"(codebook of {spec.codebook_size}); use {spec.token_dtype} or wider"
        )
    return dataclasses.replace(spec, token_dtype=token_dtype)


def _rebuild_unresolved(state: Mapping[str, Any], pool: bool = False) -> VQGANTokenizer:
    """A tokenizer pickled before its model could be described: described where it runs."""
    handle = ModelHandle(state["model"], revision=state["revision"], dtype=state["dtype"],
                         value_range=state["value_range"])
    tok = VQGANTokenizer.__new__(VQGANTokenizer)
    tok._init(handle, EncodeOptions(**state["options"]))
    tok._parent_warned = pool
    return tok


def _rebuild_tokenizer(state: Mapping[str, Any], pool: bool = False) -> VQGANTokenizer:
    identity = dict(state["identity"])
    options = EncodeOptions(image_size=identity["image_size"],
                            token_dtype=identity["token_dtype"], **state["options"])
    spec = TokenizerSpec.from_dict({**identity, "model_name": state["model"],
                                    "revision": state["revision"]})
    tok = VQGANTokenizer.__new__(VQGANTokenizer)
    handle = None
    if state["model"] is not None:
        handle = ModelHandle(state["model"], revision=state["revision"],
                             dtype=identity["compute_dtype"], value_range=identity["value_range"])
        handle.expect(VQGANConfig.from_dict(spec.config), spec.weights_digest, spec.revision)
    tok._init(handle, options)
    tok._spec = spec
    tok._parent_warned = pool
    return tok
