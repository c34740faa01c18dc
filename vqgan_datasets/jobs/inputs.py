"""What a source path holds: image files, a saved dataset, parquet files, or tar shards.

The jobs (`jobs`) and the CLI take one path or pattern per source; this module tells the kinds
apart and opens image sources as a `datasets.Dataset`. `datasets` is imported where it is used,
so that this module (like `jobs`) imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATASET_FILES", "IMAGE_SUFFIXES", "find_token_shards", "image_files",
           "is_shard_source", "open_images", "parquet_files", "row_names"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's


def is_shard_source(source: str | os.PathLike) -> bool:
    """Tar shards (a .tar path or pattern, a brace pattern, `pipe:`), as opposed to datasets."""
    text = os.fspath(source)
    return text.startswith("pipe:") or ".tar" in text or ("{" in text and ".." in text)


def open_images(source: str | os.PathLike, *, split: str = "train") -> Any:
    """Any image source as a `datasets.Dataset` with an `image` column (undecoded where possible)."""
    import datasets

    text = os.fspath(source)
    if text.startswith("imagefolder:"):
        loaded = datasets.load_dataset("imagefolder", data_dir=text.split(":", 1)[1], split=split)
        return loaded.cast_column("image", datasets.Image(decode=False))
    path = Path(text)
    if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    parquet = parquet_files(path)
    if parquet:
        return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split=split)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}), no parquet files and no saved "
                "dataset found"
            )
        return image_files(files, path)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return image_files([path], path.parent)
    raise FileNotFoundError(f"{text}: not an image folder, saved dataset, parquet file or image")


def image_files(files: Sequence[Path], root: Path) -> Any:
    """Image files as a dataset of (file_name relative to root, undecoded image path)."""
    import datasets

    return datasets.Dataset.from_dict(
        {"file_name": [str(p.relative_to(root)) for p in files], "image": [str(p) for p in files]},
        features=datasets.Features(
            {"file_name": datasets.Value("string"), "image": datasets.Image(decode=False)}
        ),
    )


def parquet_files(path: Path) -> list[Path]:
    """The parquet file at `path`, or every parquet file under the folder `path`."""
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return []


def find_token_shards(source: str | os.PathLike) -> list[str] | None:
    """The token shards of `source` (a folder of them, or a shard pattern/URL list), or None
    for a token dataset."""
    from .manifest import token_shard_urls

    text = os.fspath(source)
    path = Path(text)
    if is_shard_source(text):
        return token_shard_urls(text)
    if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
        return None
    return token_shard_urls(text) or None if path.is_dir() or "://" in text else None


def row_names(dataset: Any) -> list[str]:
    """A name per row: its file_name, key, id or path column, else its zero-padded index."""
    for column in ("file_name", "__key__", "key", "id", "path"):
        if column in dataset.column_names:
            return [str(v) for v in dataset[column]]
    width = len(str(max(len(dataset) - 1, 0)))
    return [f"{i:0{width}d}" for i in range(len(dataset))]
