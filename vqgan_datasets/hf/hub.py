"""Where a token dataset records how its tokens were made, and the Hub files that carry it.

The record (`TokenizerSpec` per token column, as `{"columns": {name: spec}}`) lives in:
- `info.description` of a Dataset/IterableDataset, which survives map/select/save_to_disk and
  comes back from the dataset card's `dataset_info.description` on `load_dataset(DIR or repo)`;
- the dataset card's own `vqgan_datasets` YAML key, which later `push_to_hub` calls keep;
- each parquet file `write_hub_files` writes, as schema key-value metadata `vqgan_datasets`
  (`pyarrow.parquet.read_schema(f).metadata`), so a file read alone still names its tokenizer.

`read_column_metadata` looks in whichever the source has: a dataset's info; the parquet files
behind a stream; a `pyarrow` Table or Schema; a path (dataset directory, Hub layout folder,
parquet file or glob, README.md) or a Hub repo id. One form cannot carry it:
`load_dataset("parquet", data_files=...)` without streaming reads only the features of the
files' metadata and keeps no link to the files; its error says to pass the files instead.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..metadata import METADATA_KEY, TokenizerSpec
from . import arrow as hf_arrow

__all__ = [
    "RecordNotFound",
    "read_column_metadata",
    "read_metadata",
    "update_dataset_card",
    "write_hub_files",
    "write_metadata",
]

class RecordNotFound(ValueError):
    """The source carries no tokenizer record; the message says where one could come from."""


_DESCRIPTION_LINE = re.compile(rf"^{METADATA_KEY}: (\{{.*\}})\s*$", re.MULTILINE)


def _parse_description(description: str | None) -> dict[str, Any]:
    match = _DESCRIPTION_LINE.search(description or "")
    return json.loads(match.group(1)) if match else {}


def _format_description(description: str | None, record: Mapping[str, Any]) -> str:
    line = f"{METADATA_KEY}: {json.dumps(record, sort_keys=True)}"
    text = _DESCRIPTION_LINE.sub("", description or "").rstrip()
    return f"{text}\n\n{line}" if text else line


def write_metadata(dataset: Any, spec: TokenizerSpec, column: str = "vqgan_tokens") -> Any:
    """Record that `column` holds tokens made by `spec`; returns `dataset` (its info is updated
    in place; every split of a DatasetDict). Several token columns can be recorded."""
    features = hf_arrow.features_of(dataset)
    if features is not None:
        if column not in features:
            raise ValueError(f"no column {column!r} to describe (columns: {list(features)})")
        length = getattr(features[column], "length", None)
        if length not in (None, -1, spec.sequence_length):
            raise ValueError(
                f"column {column!r} holds {length} tokens per row, the spec {spec.sequence_length}"
            )
    for info in hf_arrow.infos(dataset):
        record = _parse_description(info.description)
        record.setdefault("columns", {})[column] = spec.to_dict()
        info.description = _format_description(info.description, record)
    return dataset


def read_metadata(source: Any, column: str | None = None) -> TokenizerSpec:
    """The `TokenizerSpec` recorded for `column` (default: the only token column recorded).

    `source`: a Dataset, IterableDataset (its info, else the parquet files it streams),
    DatasetDict or DatasetInfo; a pyarrow Table or Schema (`pq.read_table(f)`); a path: a folder
    (README.md card, `save_to_disk`'s dataset_info.json, or data/*.parquet), a parquet file or
    glob, a README.md; or a Hub dataset repo id, whose card is read.
    """
    return read_column_metadata(source, column)[1]


def read_column_metadata(source: Any, column: str | None = None) -> tuple[str, TokenizerSpec]:
    """(column, its recorded `TokenizerSpec`), as `read_metadata`, also naming the column found
    when `column` is None. Raises `RecordNotFound` (a ValueError) saying what to pass instead."""
    columns, where, hint = _find_record(source)
    if not columns:
        raise RecordNotFound(
            f"no {METADATA_KEY} metadata in {where}. {hint}To decode anyway, pass model= (the "
            "model that made the tokens) to VQGANDetokenizer.from_dataset."
        )
    if column is None:
        if len(columns) > 1:
            raise ValueError(f"several token columns are recorded ({sorted(columns)}); pass column=")
        column = next(iter(columns))
    if column not in columns:
        raise ValueError(f"no metadata for column {column!r}; recorded: {sorted(columns)}")
    return column, TokenizerSpec.from_dict(columns[column])


_NOT_RECORDED = (
    "A plain ds.map(tokenizer, batched=True) records nothing: tokenize with "
    "tokenizer.apply(ds), or record it with write_metadata(ds, tokenizer.spec). "
)


_NOT_IN_FILES = (
    "Parquet files written by write_hub_files or examples/push_to_hub.py carry the record; "
    "datasets' own push_to_hub writes none, but the repo's README.md card may: try "
    "VQGANDetokenizer.from_dataset('ORG/NAME') or load_dataset('ORG/NAME'). "
)


def _find_record(source: Any) -> tuple[dict[str, Any], str, str]:
    """(recorded columns, where we looked, a hint for the error message) for any source."""
    if isinstance(source, (str, os.PathLike)):
        return _path_record(os.fspath(source))
    if hasattr(source, "metadata") and hasattr(source, "names"):  # pyarrow Schema
        return _schema_record(source.metadata), "this Arrow schema's metadata", ""
    if hasattr(source, "schema") and hasattr(source, "column_names") \
            and not hasattr(source, "info"):  # pyarrow Table
        return _schema_record(source.schema.metadata), "this Arrow table's schema metadata", ""
    columns: dict[str, Any] = {}
    for info in hf_arrow.infos(source):
        columns.update(_parse_description(info.description).get("columns", {}))
    if columns:
        return columns, "this dataset's info", ""
    files = hf_arrow.stream_files(source)
    parquet = [f for f in files if f.split("?")[0].endswith(".parquet")]
    if parquet:
        where = f"this stream's info or the schema of {parquet[0]}"
        return _schema_record(_read_schema(parquet[0]).metadata), where, _NOT_IN_FILES
    if any(getattr(i, "builder_name", None) == "parquet" for i in hf_arrow.infos(source)):
        return {}, "this dataset's info", (
            "It was read by load_dataset('parquet', ...), which keeps only the features from "
            "the files' metadata, not the tokenizer record that files written by "
            "write_hub_files (or examples/push_to_hub.py) carry. Pass the files or their folder "
            "instead of the loaded dataset, e.g. VQGANDetokenizer.from_dataset('DIR/data/"
            "*.parquet') or read_metadata('DIR'); or load the folder with load_dataset('DIR'), "
            "which reads the record from its README.md card; or stream the files "
            "(streaming=True), where the record is found. "
        )
    return {}, "this dataset's info", _NOT_RECORDED


def _path_record(path: str) -> tuple[dict[str, Any], str, str]:
    """The record of a local path (dataset directory, Hub layout folder, parquet file or glob,
    README.md) or, if nothing local has that name, of a Hub dataset repo's card."""
    local = Path(path)
    if glob.has_magic(path) or local.suffix == ".parquet":
        files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not files:
            raise FileNotFoundError(f"no files match {path!r}")
        return (_schema_record(_read_schema(files[0]).metadata), f"the schema of {files[0]}",
                _NOT_IN_FILES)
    if local.is_dir():
        if (local / "README.md").is_file():
            record = _card_record(local / "README.md")
            if record:
                return record.get("columns", {}), f"the dataset card {local / 'README.md'}", ""
        info = local / "dataset_info.json"  # save_to_disk: one split, or a DatasetDict's first
        if not info.is_file() and (local / "dataset_dict.json").is_file():
            info = next(iter(sorted(local.glob("*/dataset_info.json"))), info)
        if info.is_file():
            description = json.loads(info.read_text()).get("description")
            where = f"{info}"
            return _parse_description(description).get("columns", {}), where, _NOT_RECORDED
        files = sorted(local.glob("data/*.parquet")) or sorted(local.glob("*.parquet"))
        if files:
            return (_schema_record(_read_schema(str(files[0])).metadata),
                    f"the schema of {files[0]}", "")
        return {}, f"{path!r} (no README.md card, dataset_info.json or parquet files)", ""
    if local.is_file():
        return _card_record(local).get("columns", {}), f"the dataset card {path!r}", ""
    return _card_record(path).get("columns", {}), f"the dataset card of {path!r}", ""


def _schema_record(metadata: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY.encode())
    return json.loads(raw).get("columns", {}) if raw else {}


def _read_schema(path: str):
    """A parquet file's Arrow schema (metadata included), local or remote (fsspec URL)."""
    import pyarrow.parquet as pq

    if "://" not in path:
        return pq.read_schema(path)
    import fsspec

    with fsspec.open(path, "rb") as f:
        return pq.read_schema(f)


def _card_record(source: str | os.PathLike) -> dict[str, Any]:
    """The record in a dataset card: a README.md path or a Hub dataset repo id."""
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(source, repo_type="dataset")
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
    record = _record_of(dataset)
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


def _record_of(dataset: Any) -> dict[str, Any]:
    """The record of every split's info, merged: {"columns": {name: spec}} or {}."""
    record: dict[str, Any] = {}
    for info in hf_arrow.infos(dataset):
        for name, spec in _parse_description(info.description).get("columns", {}).items():
            record.setdefault("columns", {})[name] = spec
    return record


def write_hub_files(
    dataset: Any,
    directory: str | os.PathLike,
    *,
    split: str | None = None,
    max_shard_size: int | str = "500MB",
) -> list[Path]:
    """Write what `push_to_hub` would upload, locally: `data/{split}-{i:05d}-of-{n:05d}.parquet`
    shards and a README.md card (dataset_info, configs, and the recorded metadata). `load_dataset`
    reads the directory back like the Hub repo. Each shard also carries the record in its schema
    metadata (key `vqgan_datasets`), so the files keep it when read alone. Returns the files
    written; upload the folder as it is (`HfApi.upload_folder`) to publish it."""
    import pyarrow.parquet as pq
    from datasets import DatasetDict, DatasetInfo, Features, SplitDict, SplitInfo
    from huggingface_hub import DatasetCard

    root = Path(directory)
    (root / "data").mkdir(parents=True, exist_ok=True)
    splits = dict(dataset) if isinstance(dataset, DatasetDict) else {
        split or str(dataset.split or "train"): dataset
    }
    limit = hf_arrow.parse_size(max_shard_size)
    written: list[Path] = []
    info = DatasetInfo(config_name="default", features=None, splits=SplitDict(),
                       download_size=0, dataset_size=0)
    record = _record_of(dataset)
    metadata = {METADATA_KEY: json.dumps(record, sort_keys=True)} if record else {}
    for name, ds in splits.items():
        nbytes = hf_arrow.estimate_nbytes(ds)
        num_shards = int(nbytes / limit) + 1
        for index in range(num_shards):
            shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
            shard = hf_arrow.embed_storage(shard)
            path = root / "data" / f"{name}-{index:05d}-of-{num_shards:05d}.parquet"
            tmp = path.with_suffix(".parquet.tmp")
            hf_arrow.write_parquet(shard.with_format(None), tmp, metadata)
            os.replace(tmp, path)
            written.append(path)
            info.download_size += path.stat().st_size
        info.features = Features(ds.features)
        info.splits.add(SplitInfo(name=name, num_bytes=nbytes, num_examples=len(ds)))
        info.dataset_size += nbytes
        pq.read_schema(written[-1])  # fail here, not on load, if a shard is unreadable
    card = DatasetCard(f"---\n{hf_arrow.card_data(info, list(splits)).to_yaml()}\n---\n")
    if record:
        card = update_dataset_card(card, dataset)
    readme = root / "README.md"
    card.save(str(readme))
    written.append(readme)
    return written
