"""`VQGANDetokenizer`: token columns back into PIL images, for `map`, transforms and streams.

Like the tokenizer it pickles to its small identity (weights digest, config, compute dtype,
columns, grid), and `from_dataset` finds the model from the metadata recorded with the tokens.
It reads the same `EncodeOptions` as the tokenizer the other way round: tokens from
`output_field`, images into `image_field`, so `VQGANDetokenizer(model, options=tok.options)`
undoes `tok`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..handle import ModelHandle
from ..metadata import FORMAT_VERSION, TokenizerSpec
from ..models.config import VQGANConfig
from ..options import EncodeOptions, SampleError, encode_options
from . import arrow as hf_arrow
from .hub import RecordNotFound, read_column_metadata
from .model import DEFAULT_MODEL, check_fork_safety, load_model, sent_to_worker_pool
from .tokenize import MapStats

__all__ = ["VQGANDetokenizer"]

logger = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0


class VQGANDetokenizer:
    """Tokens → PIL images, for `map(batched=True)`, `with_transform`/`set_transform` (only the
    rows accessed are decoded) and `IterableDataset.map` (streamed, nothing materialized).

    With `map` on an unformatted `Dataset` the token column is dropped unless `keep_tokens`,
    and the images are written as an `Image()` feature; `IterableDataset.map` (and `map` on a
    formatted dataset) keeps it, as datasets merges a function's output into each row:
    `detok.apply(ds)` drops it for every kind. As a transform, every other column is returned
    unchanged. `grid` (h, w) defaults to a square. `token_column` (default
    "vqgan_tokens"), `output_column` (the images, default "image") and `batch_size` (per device;
    None: the engine's default) may also come from `options`, read as the tokenizer's: tokens in
    its output_field, images in its image_field.

    Rows are never dropped. A null token row (the tokenizer's on_error="null" failures) becomes
    a None image, counted in `stats.nulls` and warned. A row that cannot be decoded (a token id
    outside the codebook, a length other than the grid's, non-integer values) raises a
    `SampleError` naming the row (its dataset index with `with_indices=True`, else its
    __key__/key/id, else its position in the batch), the position and value, under the default
    `on_error="raise"`; under "null" (or "skip") it becomes a None image, counted and warned.
    """

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        options: EncodeOptions | None = None,
        token_column: str | None = None,
        output_column: str | None = None,
        keep_tokens: bool = False,
        batch_size: int | None = None,
        revision: str | None = None,
        value_range: Any = None,
        dtype: Any = None,
        grid: tuple[int, int] | None = None,
        on_error: str | None = None,
    ) -> None:
        options = encode_options(options, output_field=token_column, image_field=output_column,
                                 batch_size=batch_size, on_error=on_error)
        handle = ModelHandle.of(model, revision=revision, dtype=dtype, value_range=value_range)
        self._init(handle, options, keep_tokens, grid)

    def _init(self, handle: ModelHandle | None, options: EncodeOptions, keep_tokens: bool,
              grid: Any, identity: tuple | None = None) -> None:
        """`handle` None: an unpickled copy of a detokenizer built on an in-memory VQModel,
        known by its `identity` (config, digest, commit, compute dtype) alone."""
        image = options.image_field or "image"
        if isinstance(image, tuple):
            if len(image) != 1:
                raise ValueError(f"a datasets detokenizer writes one image column, got {image!r}")
            image = image[0]
        self.options = options.replace(image_field=image,
                                       output_field=options.output_field or "vqgan_tokens")
        self.keep_tokens = bool(keep_tokens)
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self._source = handle
        self._identity = identity
        self.stats = MapStats()
        self._last_warning = 0.0
        self._parent_warned = False  # unpickled in a pool worker whose parent warned
        self._nonce: str | None = None

    @property
    def token_column(self) -> str:
        return self.options.output_field

    @property
    def output_column(self) -> str:
        """The image column written."""
        return self.options.image_field

    @property
    def batch_size(self) -> int | None:
        return self.options.batch_size

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

        `dataset`: a Dataset, IterableDataset or DatasetDict; or where the record is when the
        loaded dataset lost it: a folder (`write_hub_files` layout, `save_to_disk`), parquet
        files (a path or glob), a pyarrow Table, a Hub repo id. Without `model` the recorded
        model (Hub id and commit, or local directory) is used; with one, it must be the model
        that made the tokens: tokens from other weights, another codebook or value range are
        refused with the reason. With `model` and no record at all, the model is taken as given.
        """
        try:
            column, recorded = read_column_metadata(dataset, token_column)
        except RecordNotFound:
            if model is None:
                raise
            logger.warning("no tokenizer record in the dataset: decoding with %r unchecked "
                           "(wrong weights would give wrong images without an error)", model)
            return cls(model, token_column=token_column, value_range=value_range, **kwargs)
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
                f"the tokens in {column!r} cannot be decoded by {detok._ref or 'this model'}:"
                f" {reason}"
            )
        return detok

    def spec_for(self, image_size: int | None = None) -> TokenizerSpec:
        """This model's spec (for comparing with recorded metadata); no weights are read."""
        config, digest, commit, dtype = self._describe()
        return TokenizerSpec.describe(config, digest, model_name=self._ref, revision=commit,
                                      image_size=image_size, compute_dtype=dtype)

    def _describe(self) -> tuple[VQGANConfig, str, str | None, str]:
        if self._source is None:
            return self._identity
        return (*self._source.describe(), self._source.dtype)

    @property
    def _ref(self) -> str | None:
        return None if self._source is None else self._source.ref

    @property
    def loaded(self) -> bool:
        """Whether this process has loaded the weights (the first call does)."""
        return self._source is not None and self._source.loaded

    @property
    def model(self):
        """The VQModel, loaded on first access."""
        return load_model(self._source, repr(self), warn_fork=not self._parent_warned)

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

    def apply(self, dataset: Any, **map_kwargs: Any) -> Any:
        """`dataset.map(self, batched=True, ...)` with one result for every kind of dataset: the
        images added, the token column dropped unless keep_tokens. (A stream's or a formatted
        dataset's `map` merges the function's output into each row, so the column would stay;
        those get `remove_columns=[token_column]` and `features=`.)"""
        map_kwargs["batched"] = True
        if not self.keep_tokens and not hf_arrow.is_unformatted_dataset(dataset):
            removed = list(map_kwargs.get("remove_columns") or [])
            map_kwargs["remove_columns"] = removed + [self.token_column] * (
                self.token_column not in removed)
            features = hf_arrow.features_of(dataset)
            if features is not None and "features" not in map_kwargs:
                map_kwargs["features"] = self.features(
                    {k: v for k, v in features.items() if k not in map_kwargs["remove_columns"]})
        out = dataset.map(self, **map_kwargs)  # an empty split: not called, columns given here
        return hf_arrow.fill_empty_splits(out, self.output_column, self.features)

    def __reduce__(self):
        pool = sent_to_worker_pool(repr(self))
        state = {
            "model": self._ref,
            "token_column": self.token_column,
            "output_column": self.output_column,
            "keep_tokens": self.keep_tokens,
            "grid": None if self.grid is None else list(self.grid),
            "on_error": self.options.on_error,
        }
        try:
            config, digest, commit, dtype = self._describe()
        except Exception as e:  # a Hub model not in the cache, offline: see VQGANTokenizer
            logger.debug("%r: model not described for pickling: %s", self, e)
            self._nonce = self._nonce or uuid.uuid4().hex
            source = self._source
            state.update(revision=source.revision, compute_dtype=source.dtype,
                         value_range=source.value_range, nonce=self._nonce)
            return _rebuild_detokenizer, (state, pool)
        state.update(weights_digest=digest, config=config.to_dict(), compute_dtype=dtype,
                     format_version=FORMAT_VERSION, revision=commit)
        return (_rebuild_detokenizer, (state, True)) if pool else (_rebuild_detokenizer, (state,))

    def __copy__(self) -> VQGANDetokenizer:
        return self

    def __deepcopy__(self, memo: dict) -> VQGANDetokenizer:
        return self

    def __repr__(self) -> str:
        return (f"VQGANDetokenizer({self._ref or 'in-memory VQModel'!r}, "
                f"{self.token_column!r} → {self.output_column!r})")

    def __call__(self, batch: Any, indices: Sequence[int] | None = None) -> Any:
        """One `map(batched=True)` call or one transform call; `indices` comes from
        `with_indices=True` and names the rows in errors."""
        check_fork_safety(repr(self))
        if isinstance(indices, (int, np.integer)):  # with_rank=True alone passes the rank
            indices = None
        kind = hf_arrow.batch_kind(batch)
        if kind == "column":
            raise TypeError("VQGANDetokenizer needs the whole batch: do not pass input_columns")
        if self.token_column not in hf_arrow.column_names(batch, kind):
            raise KeyError(
                f"no column {self.token_column!r} in the batch (columns: "
                f"{hf_arrow.column_names(batch, kind)}); pass token_column="
            )
        if kind in ("lazy", "table"):
            table = hf_arrow.arrow_table(batch, kind)
            lengths, flat = hf_arrow.token_rows(table[self.token_column], arrow=True)
            keys = hf_arrow.key_values(table, lazy=True)
        else:
            values = batch[self.token_column]
            hf_arrow.check_batched(values, self.token_column, row_is_list=True)
            lengths, flat = hf_arrow.token_rows(values, arrow=False)
            keys = hf_arrow.key_values(batch, lazy=False)
        images = self._decode(lengths, flat, _RowNames(keys, indices, self.token_column))
        if kind == "lazy":
            hf_arrow.set_lazy_columns(batch, drop=() if self.keep_tokens else (self.token_column,))
            return {self.output_column: images}  # written as an Image() feature
        if kind == "table":
            keep = [n for n in batch.column_names if n != self.token_column or self.keep_tokens]
            images_column = hf_arrow.image_array(images)
            return batch.select(keep).append_column(self.output_column, images_column)
        # A transform's output replaces the batch, so every other column is returned too (in
        # IterableDataset.map they are merged back unchanged).
        out = {k: v for k, v in batch.items() if k != self.token_column or self.keep_tokens}
        out[self.output_column] = images
        return out

    def _decode(self, lengths: np.ndarray, flat: np.ndarray, names: _RowNames) -> list:
        """Rows of tokens → PIL images; a null row → None; a row that cannot be decoded raises
        naming it (on_error="raise") or becomes None (otherwise), counted and warned."""
        from PIL import Image

        n = len(lengths)
        codes, good, failures = self._check(lengths, flat, names)
        images: list = [None] * n
        if codes.shape[0]:
            from ..pipeline.engine import get_engine

            engine = get_engine(self.model, **self.options.engine_kwargs())
            pixels = engine.decode(codes, grid=self.grid)
            for row, image in zip(np.flatnonzero(good), pixels, strict=True):
                images[row] = Image.fromarray(image)
        nulls = int((lengths < 0).sum())
        self.stats.rows += n
        self.stats.decoded += int(codes.shape[0])
        self.stats.nulls += nulls + len(failures)
        if nulls or failures:
            self._warn(n, nulls, failures, names, lengths)
        return images

    def _check(self, lengths: np.ndarray, flat: np.ndarray, names: _RowNames):
        """(codes [m, L] of the decodable rows, which rows they are, {row: reason} of the rows
        that cannot be decoded); raises for the first such row under on_error="raise"."""
        valid = lengths >= 0
        starts = np.zeros(len(lengths), np.int64)
        starts[valid] = np.concatenate([[0], np.cumsum(lengths[valid])[:-1]])
        expected = None
        if self.grid is not None:
            expected = self.grid[0] * self.grid[1]
        elif valid.any():
            expected = int(lengths[valid][0])
        else:
            return np.zeros((0, 0), np.int64), np.zeros(len(lengths), dtype=bool), {}
        failures: dict[int, str] = {}
        grid = f"grid {self.grid[0]}x{self.grid[1]}" if self.grid else "like the batch's first row"
        for row in np.flatnonzero(valid & (lengths != expected)):
            failures[int(row)] = f"has {lengths[row]} tokens, expected {expected} ({grid})"
        rows = np.flatnonzero(valid & (lengths == expected))
        take = starts[rows][:, None] + np.arange(expected)[None, :]
        codes = flat[take] if len(rows) else np.zeros((0, expected), np.int64)
        size = self._describe()[0].n_embed
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            integral = np.isfinite(codes) & (codes == np.round(codes))
            for i in np.flatnonzero(~integral.all(axis=1)):
                pos = int(np.flatnonzero(~integral[i])[0])
                failures[int(rows[i])] = (f"token at position {pos} is {codes[i, pos]!r}, not an "
                                          f"integer id in [0, {size})")
            codes = np.where(integral, codes, 0).astype(np.int64)
        bad = (codes < 0) | (codes >= size)
        for i in np.flatnonzero(bad.any(axis=1)):
            if int(rows[i]) in failures:
                continue
            pos = np.flatnonzero(bad[i])
            failures[int(rows[i])] = (
                f"token id {int(codes[i, pos[0]])} at position {int(pos[0])} is outside the "
                f"codebook [0, {size})" + (f" ({len(pos)} bad ids in this row)" if len(pos) > 1
                                           else ""))
        if failures and self.options.on_error == "raise":
            row = min(failures)
            raise names.error(row, failures[row] + "; pass on_error='null' to get None images "
                              "for such rows")
        keep = np.array([int(r) not in failures for r in rows], dtype=bool)
        good = np.zeros(len(lengths), dtype=bool)
        good[rows[keep]] = True
        return codes[keep], good, failures

    def _warn(self, n: int, nulls: int, failures: dict[int, str], names: _RowNames,
              lengths: np.ndarray) -> None:
        """Null rows and undecodable rows become None images: counted, logged, never silent."""
        for row in np.flatnonzero(lengths < 0):
            logger.debug("%s: null tokens, None image", names.where(int(row)))
        for row, reason in failures.items():
            logger.debug("%s: %s; None image", names.where(row), reason)
        now = time.monotonic()
        if now - self._last_warning < _WARN_EVERY_S:
            return
        self._last_warning = now
        first = (f"; first: {names.where(min(failures))}: {failures[min(failures)]}"
                 if failures else "")
        logger.warning(
            "%d of %d rows in this batch became None images: %d with null tokens (e.g. rows "
            "the tokenizer could not read under on_error='null'), %d that cannot be decoded%s "
            "(in all so far: %d None of %d rows; detok.stats has the counts, the DEBUG log of "
            "%s names each row)", nulls + len(failures), n, nulls, len(failures), first,
            self.stats.nulls, self.stats.rows, __name__,
        )


class _RowNames:
    """How error messages name a row of a batch: its dataset index (map with_indices=True), its
    key column (__key__/key/id), or its position in the batch."""

    def __init__(self, keys: tuple[str, list] | None, indices: Sequence[int] | None,
                 column: str) -> None:
        self.keys = keys
        self.indices = None if indices is None else list(indices)
        self.column = column

    def key(self, row: int) -> Any:
        if self.indices is not None:
            return int(self.indices[row])
        return None if self.keys is None else self.keys[1][row]

    def where(self, row: int) -> str:
        if self.indices is not None:
            return f"dataset row {int(self.indices[row])}"
        if self.keys is not None:
            return f"row {self.keys[0]}={self.keys[1][row]!r}"
        return f"row {row} of this batch"

    def error(self, row: int, reason: str) -> SampleError:
        hint = ""
        if self.indices is None and self.keys is None:
            hint = (f" (add a {'/'.join(hf_arrow.KEY_COLUMNS)} column or call map(..., "
                    "with_indices=True) to have rows named by key or dataset index)")
        return SampleError(f"column {self.column!r}, {self.where(row)}{hint}: {reason}",
                           self.key(row))


def _rebuild_detokenizer(state: Mapping[str, Any], pool: bool = False) -> VQGANDetokenizer:
    identity = None
    if "config" not in state:  # pickled before its model could be described
        handle = ModelHandle(state["model"], revision=state["revision"],
                             dtype=state["compute_dtype"], value_range=state["value_range"])
    else:
        config = VQGANConfig.from_dict(state["config"])
        identity = (config, state["weights_digest"], state["revision"], state["compute_dtype"])
        handle = None
        if state["model"] is not None:
            handle = ModelHandle(state["model"], revision=state["revision"],
                                 dtype=state["compute_dtype"], value_range=config.value_range)
            handle.expect(*identity[:3])
    detok = VQGANDetokenizer.__new__(VQGANDetokenizer)
    options = EncodeOptions(output_field=state["token_column"], image_field=state["output_column"],
                            on_error=state.get("on_error", "raise"))
    detok._init(handle, options, state["keep_tokens"], state["grid"], identity)
    detok._parent_warned = pool
    return detok
