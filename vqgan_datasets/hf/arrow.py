"""How the Hugging Face adapters talk to `datasets`: batch kinds, Arrow in and out, dataset info.

Every reliance on `datasets` internals (anything not in its documented API) is in this file, so
that a new `datasets` release is checked here and nowhere else. Checked against datasets 5.2.0
(pyarrow 26). The internals used:

- `LazyBatch` (what an unformatted `Dataset.map` hands a batched function): its `pa_table` and
  `keys_to_format` attributes, `del batch[name]` and `batch[name] = arrow_array`, and the fact
  that `map` writes the batch's own entries plus what the function returns, Arrow arrays with
  their type (a returned dict may not hold Arrow arrays); `LazyRow` is the unbatched case.
- `Dataset._estimate_nbytes`, `datasets.table.embed_table_storage`,
  `datasets.utils.py_utils.convert_file_size_to_int`, `datasets.info.DatasetInfosDict` and
  `datasets.utils.metadata.MetadataConfigs`: how `push_to_hub` sizes, embeds and describes
  its parquet shards, reused by `hf_hub.write_hub_files` to write the same layout offline.
- `datasets.arrow_writer.get_parquet_column_options` / `get_writer_batch_size_from_features`
  and `config.DEFAULT_CDC_OPTIONS`: how `Dataset.to_parquet` writes a shard, repeated by
  `write_parquet`, which also puts key-value metadata in the file's schema (to_parquet cannot).
- A split saved with no rows: `save_to_disk` writes no data file for it (unless given
  `num_shards`) and leaves `"_data_files": []` in its `state.json`, which `load_from_disk`
  cannot read back; `save_to_disk`/`load_from_disk` here handle both sides. And `map` returns
  a dataset with no rows as it is, without calling the function (`fill_empty_splits`).
- `IterableDataset._ex_iterable` (and each wrapper's `ex_iterable`), whose innermost
  `kwargs["files"]` lists the data files of a stream read by a packaged builder: how
  `stream_files` finds the parquet files behind `load_dataset("parquet", ..., streaming=True)`,
  since `datasets` reads their features but not the rest of their schema metadata.

How the one-liner `Dataset.map(tok, batched=True)` gets a fixed-size token column and drops the
image column: the tokenizer reads the image column straight from the batch's Arrow table (so
datasets never decodes it), deletes the image entry from the batch, and stores the tokens *in*
the batch as a `pyarrow.FixedSizeListArray`. A returned `pa.Table` would keep the type too but
make `map` ignore the caller's `remove_columns`, so tables are returned only to an
arrow-formatted dataset. Other formats, `input_columns=` and `IterableDataset.map` pass plain
values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "KEY_COLUMNS",
    "arrow_codes",
    "arrow_images",
    "arrow_table",
    "as_input",
    "batch_kind",
    "card_data",
    "check_batched",
    "column_names",
    "decodes_images",
    "embed_storage",
    "empty_split",
    "estimate_nbytes",
    "features_of",
    "fill_empty_splits",
    "fixed_size_list",
    "image_array",
    "infos",
    "is_decoded_file",
    "is_map_style",
    "is_unformatted_dataset",
    "key_values",
    "load_from_disk",
    "parse_size",
    "path_of",
    "python_codes",
    "save_to_disk",
    "set_lazy_columns",
    "stream_files",
    "take",
    "token_rows",
    "write_parquet",
]

KEY_COLUMNS = ("__key__", "key", "id")  # a column that names rows in error messages


# ---------------------------------------------------------------------------------------------
# Batch kinds: LazyBatch (unformatted Dataset.map), tables (arrow format), dicts
# (IterableDataset.map, other formats, transforms) and plain lists (input_columns=[...]).


def batch_kind(batch: Any) -> str:
    """"lazy" (unformatted Dataset.map), "table" (arrow format), "dict" (IterableDataset.map,
    other formats, transforms) or "column" (input_columns=[...])."""
    if _is_lazy(batch):
        return "lazy"
    if hasattr(batch, "column_names") and hasattr(batch, "schema"):  # pyarrow.Table
        return "table"
    return "dict" if isinstance(batch, Mapping) else "column"


def column_names(batch: Any, kind: str) -> list[str]:
    """The column names of a batch of kind "lazy", "table" or "dict"."""
    return list(batch.column_names) if kind == "table" else list(batch)


def arrow_table(batch: Any, kind: str):
    """The `pa.Table` behind a "lazy" or "table" batch."""
    return batch.pa_table if kind == "lazy" else batch


def _is_lazy(batch: Any) -> bool:
    """An unformatted Dataset.map batch (datasets' LazyBatch), whose Arrow table we can read."""
    if not (hasattr(batch, "pa_table") and hasattr(batch, "keys_to_format")):
        return False
    if type(batch).__name__ == "LazyRow":
        raise TypeError("this function works on batches: call map(..., batched=True)")
    return True


def set_lazy_columns(batch: Any, *, drop: Iterable[str] = (),
                     columns: Mapping[str, Any] | None = None) -> None:
    """Delete `drop` from a LazyBatch and store `columns` (Arrow arrays) in it: `map` writes the
    batch's own entries with their Arrow types, which a returned dict could not carry."""
    for name in drop:
        del batch[name]
    for name, values in (columns or {}).items():
        batch[name] = values


def check_batched(values: Any, column: str, *, row_is_list: bool = False) -> None:
    """Refuse a single row (map without batched=True), which would be read as a batch."""
    single = isinstance(values, (str, bytes, dict)) or hasattr(values, "convert")  # PIL image
    if row_is_list and isinstance(values, (list, tuple)) and values:
        single = isinstance(values[0], (int, np.integer))
    if single:
        raise TypeError(
            f"column {column!r} holds one row, not a batch: call map(..., batched=True)"
        )


# ---------------------------------------------------------------------------------------------
# Images in


def arrow_images(column) -> list:
    """An image column's Arrow data as inputs `images.load_image` takes, without decoding."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind}:
        return column.to_pylist()  # [{"bytes": ..., "path": ...}], as Image(decode=False) gives
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        return column.to_pylist()
    leaf = _leaf_dtype(kind)
    return [None if v is None else _nested_array(v, leaf) for v in column.to_pylist()]


def _leaf_dtype(kind) -> np.dtype | None:
    """The numpy dtype of a (nested, possibly extension-typed) list column's values, or None."""
    import pyarrow as pa

    for _ in range(32):  # nesting depth; images have at most 3 levels
        kind = getattr(kind, "storage_type", kind)  # datasets' Array2D/3D extension types
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
                or pa.types.is_fixed_size_list(kind)):
            break
        kind = kind.value_type
    try:
        return np.dtype(kind.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return None


def _nested_array(value: Any, leaf: np.dtype | None) -> Any:
    """A row of nested lists as an array of the column's own value type (uint8 stays uint8,
    float stays float: the dtype rules of array inputs apply). Other value types, and rows that
    are not rectangular, are passed on as lists, which `images.load_image` reads as numpy
    would, refusing what array inputs refuse, by name."""
    if leaf is None or not (leaf in (np.uint8, np.uint16, np.bool_) or leaf.kind == "f"):
        return value
    try:
        return np.asarray(value, dtype=leaf)
    except (ValueError, TypeError, OverflowError):
        return value


def as_input(value: Any) -> Any:
    """A formatted value (torch/tf tensor, ...) as an input `images.load_image` takes.

    `with_format("torch")` gives images channels-first (C, H, W); a torch tensor whose first
    axis is 1, 3 or 4 channels and whose last axis is not is turned back into (H, W, C).
    """
    if value is None or isinstance(value, (str, bytes, dict, np.ndarray)):
        return value
    if hasattr(value, "numpy") and not hasattr(value, "convert"):  # torch / tf tensors
        array = np.asarray(value)
        if _is_torch(value) and array.ndim == 3 and array.shape[0] in (1, 3, 4) \
                and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        return array
    return value


def _is_torch(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def is_decoded_file(value: Any) -> bool:
    """A PIL image decoded from an encoded file (what datasets' `Image()` hands a map)."""
    return hasattr(value, "convert") and getattr(value, "format", None) is not None


def path_of(value: Any) -> str | None:
    """The file path an image input came from, if it says (for error messages)."""
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return getattr(value, "filename", None) or None


def key_values(batch: Any, *, lazy: bool) -> tuple[str, list] | None:
    """(name, values) of the batch's first KEY_COLUMNS column, or None. `lazy`: an Arrow table."""
    names = batch.column_names if lazy else list(batch)
    for name in KEY_COLUMNS:
        if name in names:
            values = batch[name].to_pylist() if lazy else list(batch[name])
            return name, values
    return None


def take(values: Any, ok: np.ndarray) -> Any:
    """The rows of a column (numpy, Arrow or a list) where `ok` is True."""
    if isinstance(values, np.ndarray):
        return values[ok]
    if hasattr(values, "filter") and hasattr(values, "type"):  # pyarrow
        import pyarrow as pa

        return values.filter(pa.array(ok))
    return [v for v, good in zip(values, ok, strict=True) if good]


# ---------------------------------------------------------------------------------------------
# Tokens out and in


def fixed_size_list(tokens: np.ndarray, nulls=None):
    """[n, L] → an Arrow fixed_size_list<L> array (`nulls`: a boolean array, True = null row)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(tokens).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, tokens.shape[1], mask=nulls)


def arrow_codes(column) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size or variable) list column → int codes [n_valid, L] and the validity mask."""
    return _equal_rows(*token_rows(column, arrow=True))


def python_codes(values: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """A batch of token rows (lists or arrays, None = null) → codes [n_valid, L] and the mask."""
    return _equal_rows(*token_rows(list(values), arrow=False))


def _equal_rows(lengths: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = lengths >= 0
    present = lengths[valid]
    if not len(present):
        return np.zeros((0, 0), np.int32), valid
    if (present != present[0]).any():
        raise ValueError(f"token rows have different lengths ({sorted(set(present.tolist()))[:4]}...)")
    return flat.reshape(len(present), int(present[0])), valid


def token_rows(values: Any, *, arrow: bool) -> tuple[np.ndarray, np.ndarray]:
    """A batch of token rows, Arrow (`arrow`) or Python (lists/arrays, None = null) → each
    row's length (-1 for a null row) and the non-null rows' values, concatenated."""
    if arrow:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        present = column.filter(pa.array(valid)) if not valid.all() else column
        lengths = np.full(len(column), -1, dtype=np.int64)
        if pa.types.is_fixed_size_list(present.type):
            lengths[valid] = present.type.list_size
        elif len(present):
            lengths[valid] = pc.list_value_length(present).to_numpy(zero_copy_only=False)
        flat = present.flatten().to_numpy(zero_copy_only=False) if len(present) else np.zeros(0)
        return lengths, flat
    rows = [None if r is None else np.asarray(r).reshape(-1) for r in values]
    lengths = np.array([-1 if r is None else len(r) for r in rows], dtype=np.int64)
    present = [r for r in rows if r is not None]
    return lengths, np.concatenate(present) if present else np.zeros(0, np.int64)


def image_array(images: list):
    """PIL images (None = null) → an Arrow array in `Image()`'s storage (PNG bytes, as datasets
    stores PIL images)."""
    import pyarrow as pa
    from datasets import Image

    feature = Image()
    encoded = [None if im is None else feature.encode_example(im) for im in images]
    return pa.array(encoded, type=feature.pa_type)


# ---------------------------------------------------------------------------------------------
# Datasets, their features and info


def decodes_images(feature: Any) -> bool:
    """Whether `feature` is an `Image()` that datasets decodes to PIL before a map call."""
    return type(feature).__name__ == "Image" and bool(getattr(feature, "decode", False))


def is_map_style(dataset: Any) -> bool:
    """A `Dataset` or `DatasetDict` (written to Arrow files by map), not a stream."""
    from datasets import Dataset, DatasetDict

    return isinstance(dataset, (Dataset, DatasetDict))


def is_unformatted_dataset(dataset: Any) -> bool:
    """A `Dataset` (or every split of a `DatasetDict`) with no format set: map hands LazyBatches."""
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        return all(is_unformatted_dataset(d) for d in dataset.values())
    return isinstance(dataset, Dataset) and dataset.format.get("type") is None


def features_of(dataset: Any):
    """The `Features` of a dataset (the first split of a dict), or None where unknown."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        first = next(iter(dataset.values()), None)
        return None if first is None else first.features
    return getattr(dataset, "features", None)


def empty_split(dataset: Any, features: Any) -> Any:
    """A 0-row `Dataset` with `features`, keeping `dataset`'s split name and description."""
    from datasets import Dataset

    out = Dataset.from_dict({name: [] for name in features}, features=features,
                            split=dataset.split)
    out.info.description = dataset.info.description
    return out


def fill_empty_splits(dataset: Any, column: str, output_features: Callable[[Any], Any]) -> Any:
    """`map`'s output with every 0-row split lacking `column` given `output_features(its
    features)`: datasets' `map` returns an empty dataset as it is (the caller's
    remove_columns applied), without calling the function."""
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        return DatasetDict({name: fill_empty_splits(split, column, output_features)
                            for name, split in dataset.items()})
    if not is_map_style(dataset) or len(dataset) or column in dataset.features:
        return dataset
    return empty_split(dataset, output_features(dataset.features))


def save_to_disk(dataset: Any, path: str | os.PathLike) -> None:
    """`dataset.save_to_disk(path)` (a Dataset or DatasetDict) that a 0-row split survives:
    datasets writes no data file for one unless told to write one, then cannot load it."""
    if hasattr(dataset, "features"):
        dataset.save_to_disk(os.fspath(path), num_shards=None if len(dataset) else 1)
    else:
        dataset.save_to_disk(os.fspath(path),
                             num_shards={name: 1 for name, split in dataset.items() if not len(split)})


def load_from_disk(path: str | os.PathLike) -> Any:
    """`datasets.load_from_disk(path)`, also for a split saved with no data file (0 rows, as
    datasets' `save_to_disk` leaves one), which datasets itself fails to read."""
    import json

    import datasets

    root = os.fspath(path)
    state = os.path.join(root, "state.json")
    if "://" not in root and os.path.isdir(root) and os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            saved = json.load(f)
        if isinstance(saved, dict) and saved.get("_data_files") == []:
            info = datasets.DatasetInfo.from_directory(root)
            return datasets.Dataset.from_dict({name: [] for name in info.features or {}},
                                              features=info.features, info=info,
                                              split=saved.get("_split"))
    splits_file = os.path.join(root, "dataset_dict.json")
    if "://" not in root and os.path.isfile(splits_file):
        with open(splits_file, encoding="utf-8") as f:
            names = json.load(f).get("splits", [])
        return datasets.DatasetDict({name: load_from_disk(os.path.join(root, name))
                                     for name in names})
    return datasets.load_from_disk(root)


def infos(dataset: Any) -> list:
    """The `DatasetInfo` of each split of a Dataset, IterableDataset, DatasetDict or DatasetInfo."""
    from datasets import DatasetInfo

    if isinstance(dataset, DatasetInfo):
        return [dataset]
    if isinstance(dataset, Mapping) and not hasattr(dataset, "info"):  # DatasetDict-like
        return [d.info for d in dataset.values()]
    info = getattr(dataset, "info", None)
    if info is None:
        raise TypeError(
            f"expected a Dataset, IterableDataset or DatasetDict, got {type(dataset).__name__}"
        )
    return [info]


# ---------------------------------------------------------------------------------------------
# What push_to_hub does to a split, for writing its layout offline.


def parse_size(size: int | str) -> int:
    """"500MB" → bytes, as push_to_hub's max_shard_size."""
    from datasets.utils.py_utils import convert_file_size_to_int

    return convert_file_size_to_int(size)


def estimate_nbytes(dataset: Any) -> int:
    """The bytes push_to_hub counts for a split (embedded files included)."""
    if hasattr(dataset, "_estimate_nbytes"):
        return dataset._estimate_nbytes()
    return dataset.data.nbytes


def embed_storage(shard: Any) -> Any:
    """A shard with external files (image paths) embedded as bytes, as push_to_hub uploads it."""
    from datasets.table import embed_table_storage

    return shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)


def card_data(info: Any, split_names: Sequence[str]):
    """A `DatasetCardData` with push_to_hub's `dataset_info` and `configs` (one per split, files
    `data/{split}-*`) for the default config."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs({"default": {"data_files": [
        {"split": name, "path": f"data/{name}-*"} for name in split_names
    ]}}).to_dataset_card_data(data)
    return data


def write_parquet(dataset: Any, path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """Write `dataset` (a map-style split) to one parquet file as `Dataset.to_parquet` does (row
    groups, column options, content-defined chunking), with `metadata` added to the file's
    schema metadata, where `pyarrow.parquet.read_schema`/`read_table` find it."""
    import pyarrow.parquet as pq
    from datasets import config
    from datasets.arrow_writer import (
        get_parquet_column_options,
        get_writer_batch_size_from_data_size,
        get_writer_batch_size_from_features,
    )

    features = dataset.features
    schema = features.arrow_schema
    schema = schema.with_metadata({**(schema.metadata or {}),
                                   **{k.encode(): v.encode() for k, v in metadata.items()}})
    rows = (get_writer_batch_size_from_features(features)
            or get_writer_batch_size_from_data_size(len(dataset), estimate_nbytes(dataset)))
    arrow = dataset.with_format("arrow")
    with pq.ParquetWriter(os.fspath(path), schema=schema, write_page_index=True,
                          use_content_defined_chunking=config.DEFAULT_CDC_OPTIONS,
                          **get_parquet_column_options(features, schema)) as writer:
        for start in range(0, len(dataset), rows):
            writer.write_table(arrow[start:start + rows])
        if not len(dataset):
            writer.write_table(schema.empty_table())


def stream_files(dataset: Any) -> list[str]:
    """The data files behind an IterableDataset read by a packaged builder (e.g. parquet from
    `load_dataset(..., streaming=True)`), through any map/shuffle/filter wrappers; [] if none."""
    iterable = getattr(dataset, "_ex_iterable", None)
    for _ in range(100):  # wrappers nest; a bound, not a loop that could spin
        if iterable is None:
            break
        kwargs = getattr(iterable, "kwargs", None)
        if isinstance(kwargs, Mapping) and "files" in kwargs:
            files = kwargs["files"]
            return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
        iterable = getattr(iterable, "ex_iterable", None)
    return []
