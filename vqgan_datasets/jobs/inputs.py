"""What a source path holds: image files, a saved dataset, parquet files, or tar shards.

The jobs (`jobs`) and the CLI take one path or pattern per source; this module tells the kinds
apart and opens image sources as a `datasets.Dataset`. `datasets` is imported where it is used,
so that this module (like `jobs`) imports without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATASET_FILES", "IMAGE_SUFFIXES", "TAR_SUFFIXES", "find_token_shards", "image_files",
           "is_shard_source", "open_images", "parquet_files", "row_names", "source_files",
           "token_shard_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's


TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")  # braceexpand's {a..b} and {a,b}


def is_shard_source(source: str | os.PathLike) -> bool:
    """Tar shards, as opposed to datasets, decided by what the path is: an existing folder is
    not (images or a saved dataset), an existing file is when its name ends like a tar; other
    text by its syntax: `pipe:`, a brace pattern, a "::" list, a tar name or URL."""
    text = os.fspath(source)
    if text.startswith("pipe:"):
        return True
    local = text[len("file://"):] if text.startswith("file://") else text
    if "://" not in local:
        if os.path.isdir(local):
            return False
        if os.path.isfile(local):
            return local.lower().endswith(TAR_SUFFIXES)
    if "::" in text or _BRACES.search(text):
        return True
    return text.split("?", 1)[0].rstrip("/").lower().endswith(TAR_SUFFIXES)


def open_images(source: str | os.PathLike, *, split: str = "train") -> Any:
    """Any image source as a `datasets.Dataset` with an `image` column (undecoded where possible)."""
    import datasets

    from ..hf.arrow import load_from_disk

    text = os.fspath(source)
    if text.startswith("imagefolder:"):
        loaded = datasets.load_dataset("imagefolder", data_dir=text.split(":", 1)[1], split=split)
        return loaded.cast_column("image", datasets.Image(decode=False))
    path = Path(text)
    if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
        loaded = load_from_disk(path)
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


def source_files(source: str | os.PathLike) -> list[str]:
    """The files an image source or token dataset reads, for the check that no output is one
    of them: a saved dataset's folder whole, parquet files, image files (and imagefolder's
    metadata files); other sources as given."""
    text = os.fspath(source)
    folder = text.split(":", 1)[1] if text.startswith("imagefolder:") else text
    path = Path(folder)
    if not path.is_dir():
        return [text]
    if any((path / name).is_file() for name in DATASET_FILES):
        return [str(p) for p in path.rglob("*") if p.is_file()]
    parquet = parquet_files(path)
    if parquet and not text.startswith("imagefolder:"):
        card = [path / "README.md"] if (path / "README.md").is_file() else []  # a Hub layout
        return [str(p) for p in (*parquet, *card)]
    return [str(p) for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES or p.name.startswith("metadata.")
            or p.name == "README.md"]


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
    if path.is_dir():  # a saved dataset, a folder of parquet files, or of token shards
        if any((path / name).is_file() for name in DATASET_FILES):
            return None
        return token_shard_urls(text) or None
    if is_shard_source(text):
        return token_shard_urls(text)
    return token_shard_urls(text) or None if "://" in text else None


def token_shard_files(urls: Sequence[str]) -> list[str]:
    """What decoding token shards reads: the shards, their stats files, their folders'
    manifest.json."""
    from .. import storage
    from .manifest import MANIFEST_NAME, stats_path

    folders = {storage.split(u)[0] for u in urls}
    return [*urls, *map(stats_path, urls), *(storage.join(f, MANIFEST_NAME) for f in folders)]


def row_names(dataset: Any) -> list[str]:
    """A name per row: its file_name, key, id or path column, else its zero-padded index."""
    for column in ("file_name", "__key__", "key", "id", "path"):
        if column in dataset.column_names:
            return [str(v) for v in dataset[column]]
    width = len(str(max(len(dataset) - 1, 0)))
    return [f"{i:0{width}d}" for i in range(len(dataset))]
