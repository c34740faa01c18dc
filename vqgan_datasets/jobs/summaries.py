"""What a job's summary says about the inputs it could not use: the first few by name, and
where every one of them is listed (a summary stays one screen however many there are)."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import storage
from .inputs import row_names

if TYPE_CHECKING:
    from .manifest import Manifest

__all__ = ["LISTED", "NAME_COLUMNS", "SKIPPED_FILE", "row_failures", "sample_errors"]

LISTED = 10  # inputs named in a summary
NAME_COLUMNS = ("file_name", "__key__", "key", "id", "path")  # what row_names reads, in order
SKIPPED_FILE = "skipped_inputs.json"  # written into a datasets output under on_error="skip"


def row_failures(dataset: Any, tokens: Any, output_column: str, error_column: str | None,
                 output: str | os.PathLike) -> dict[str, Any]:
    """The rows of `dataset` that `tokens` (its tokenized output, saved in `output`) skipped or
    kept as nulls: the first LISTED by name, and where the full list is."""
    listed: dict[str, Any] = {}
    skipped_file = Path(output) / SKIPPED_FILE
    if len(tokens) < len(dataset):  # skipped rows are gone from the output: named by difference
        if any(name in dataset.column_names for name in NAME_COLUMNS):
            kept = collections.Counter(row_names(tokens))
            skipped = [name for name in row_names(dataset) if not _take(kept, name)]
            with storage.atomic_write(skipped_file) as f:
                f.write(json.dumps({"skipped_inputs": skipped}, indent=1).encode())
            listed |= {"skipped_inputs": skipped[:LISTED], "skipped_list": str(skipped_file)}
        else:
            listed["skipped_list"] = ("none: the input has no name column "
                                      f"({', '.join(NAME_COLUMNS)}); --on-error null keeps such "
                                      "rows, with the reason, as null tokens")
    elif skipped_file.exists():  # from an earlier run into the same output
        skipped_file.unlink()
    column = tokens.data.column(output_column)
    if column.null_count:
        import pyarrow.compute as pc

        rows = pc.indices_nonzero(column.is_null()).to_pylist()[:LISTED]
        first = tokens.select(rows)  # null rows stay in place: an output row is an input row
        named = any(name in first.column_names for name in NAME_COLUMNS)
        names = row_names(first) if named else [str(row) for row in rows]
        reasons = (first[error_column] if error_column and error_column in first.column_names
                   else [None] * len(names))
        listed["null_inputs"] = [{"name": name, "error": reason}
                                 for name, reason in zip(names, reasons, strict=True)]
        listed["null_list"] = (f"the rows of {os.fspath(output)} whose {output_column!r} is null"
                               + (f" ({error_column!r} says why)" if error_column else ""))
    return listed


def _take(counts: collections.Counter, name: str) -> bool:
    if counts[name] > 0:
        counts[name] -= 1
        return True
    return False


def sample_errors(manifest: Manifest) -> dict[str, Any]:
    """The first samples that shards skipped or kept as nulls, and the stats files that list
    them all (each shard's stats file lists its own)."""
    done = [s for s in manifest.shards if s.status in ("written", "finished") and
            (s.skipped or s.failed)]
    if not done:
        return {}
    first = [{"shard": s.url, **error} for s in done for error in s.errors][:LISTED]
    return {"sample_errors": first, "sample_errors_listed_in": [s.stats_path for s in done][:LISTED]
            + ([f"... and {len(done) - LISTED} more stats files (the manifest names them)"]
               if len(done) > LISTED else [])}
