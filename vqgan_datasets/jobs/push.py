"""`vqgan-datasets push`: token outputs → a Hub dataset repo, resumable after an interruption.

A token dataset (a `save_to_disk` directory, one split or several) goes up in the Hub's parquet
layout (`write_hub_files`: `data/{split}-*.parquet`, each file carrying the tokenizer record in
its schema). A folder of token shards goes up as it is (`data/*.tar`), with each shard's stats
file, which holds the record, under `stats/`. Either way a README.md card records the tokenizer,
so `load_dataset(repo)` and `VQGANDetokenizer.from_dataset(repo)` need nothing else.

The files go up in commits of at most COMMIT_FILES files and COMMIT_BYTES bytes; the card comes
last, with the removal of files an earlier push left that this one does not have. A rerun after
an interruption compares each file with the repo (size and sha256) and sends only what is
missing, so a large push never starts again from zero.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .inputs import DATASET_FILES, find_token_shards
from .overlap import check_outputs

__all__ = ["COMMIT_BYTES", "COMMIT_FILES", "push"]

logger = logging.getLogger(__name__)

COMMIT_FILES = 100  # files per commit: far below the Hub's limits, so each commit is quick
COMMIT_BYTES = 4 * 2**30  # bytes per commit: what an interruption can cost at most
CARD = "README.md"
_OURS = ("data/", "stats/")  # where a push puts files: earlier ones there may be removed


def push(
    source: str | os.PathLike,
    repo_id: str,
    *,
    dry_run: str | os.PathLike | None = None,
    private: bool = False,
    token: str | bool | None = None,
    max_shard_size: int | str = "500MB",
) -> dict[str, Any]:
    """Upload `source` (a token dataset directory or a folder of token shards) to the Hub
    dataset repo `repo_id` (created if missing). `dry_run`: write exactly the files that would
    be uploaded into that folder instead (it then reads back with `load_dataset(dry_run)`).
    Returns a summary: files, bytes, what was uploaded now and what the repo already had."""
    if dry_run is not None:  # before anything is read: the dry run must not write over its source
        check_outputs([source], folders=[dry_run])
    with tempfile.TemporaryDirectory(prefix="vqgan-datasets-push-") as scratch:
        plan = _plan(Path(os.fspath(source)), Path(scratch), max_shard_size)
        size = sum(local.stat().st_size for _, local in plan)
        if dry_run is not None:
            for path_in_repo, local in plan:
                _place(local, Path(dry_run) / path_in_repo)
            return {"dry_run": os.fspath(dry_run), "files": len(plan), "bytes": size,
                    "repo_id": repo_id}
        return _upload(plan, repo_id, private=private, token=token) | {"files": len(plan),
                                                                         "bytes": size}


def _plan(source: Path, scratch: Path, max_shard_size: int | str) -> list[tuple[str, Path]]:
    """(path in the repo, local file) for everything a push uploads; generated files go into
    `scratch`. The card is last."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory (expected a token dataset "
                                "directory or a folder of token shards)")
    if any((source / name).is_file() for name in DATASET_FILES):
        from ..hf.arrow import load_from_disk
        from ..hf.hub import RecordNotFound, read_column_metadata, write_hub_files

        dataset = load_from_disk(source)
        try:
            read_column_metadata(dataset)  # a dataset without a record is refused, saying why
        except RecordNotFound:
            raise
        except ValueError:
            pass  # several token columns, each recorded
        files = write_hub_files(dataset, scratch, max_shard_size=max_shard_size)
        plan = [(f.relative_to(scratch).as_posix(), f) for f in files]
        return sorted(plan, key=lambda item: item[0] == CARD)
    urls = find_token_shards(source)
    if not urls:
        raise ValueError(f"{source}: neither a token dataset (save_to_disk: {', '.join(DATASET_FILES)})"
                         " nor a folder of token shards (*.tar with .stats.json)")
    return _shard_plan(source, [Path(u) for u in urls], scratch)


def _shard_plan(source: Path, shards: list[Path], scratch: Path) -> list[tuple[str, Path]]:
    from .. import storage
    from ..metadata import METADATA_KEY, TokenizerSpec
    from .manifest import stats_path

    names = {shard.name for shard in shards}
    unfinished = sorted(p.name for p in source.glob("*.tar") if p.name not in names)
    if unfinished:
        raise ValueError(f"{source}: {len(unfinished)} shards have no stats file, so their run "
                         f"did not finish ({', '.join(unfinished[:5])}); rerun the encode first")
    plan: list[tuple[str, Path]] = []
    spec: TokenizerSpec | None = None
    column = None
    for shard in shards:
        stats_file = Path(stats_path(str(shard)))
        stats = storage.read_json(str(stats_file))
        record = stats.get(METADATA_KEY) if isinstance(stats, dict) else None
        if not record:
            raise ValueError(f"{stats_file}: no tokenizer record ({METADATA_KEY})")
        theirs = TokenizerSpec.from_dict(record)
        if spec is not None and theirs.fingerprint() != spec.fingerprint():
            raise ValueError(f"{shard} was tokenized otherwise than {shards[0]}: "
                             f"{theirs.mismatch(spec) or 'their records differ'}")
        spec = theirs
        column = (stats.get("settings") or {}).get("output_key") or "vqgan.npy"
        plan += [(f"data/{shard.name}", shard), (f"stats/{stats_file.name}", stats_file)]
    card = scratch / CARD
    card.write_text(_shard_card(spec, column), encoding="utf-8")
    return [*plan, (CARD, card)]


def _shard_card(spec: Any, column: str) -> str:
    """A card that points `load_dataset` at the shards and records the tokenizer."""
    from datasets import DatasetInfo
    from huggingface_hub import DatasetCard

    from ..hf.hub import update_dataset_card, write_metadata

    card = DatasetCard("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                       "    path: data/*.tar\n---\n")
    info = write_metadata(DatasetInfo(), spec, column)
    return str(update_dataset_card(card, info))


def _place(local: Path, target: Path) -> None:
    """`local` at `target`: a hard link where the file system allows (shards are written once,
    never changed in place), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(local, target)
    except OSError:
        shutil.copyfile(local, target)


def _upload(plan: list[tuple[str, Path]], repo_id: str, *, private: bool,
            token: str | bool | None) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    remote = _remote_files(api, repo_id)
    missing = [(p, f) for p, f in plan if not _same(remote.get(p), f)]
    data = [(p, f) for p, f in missing if p != CARD]
    commits = list(_batches(data))
    for number, batch in enumerate(commits, 1):
        logger.info("commit %d of %d: %d files", number, len(commits), len(batch))
        api.create_commit(repo_id, repo_type="dataset",
                          operations=[CommitOperationAdd(p, str(f)) for p, f in batch],
                          commit_message=f"Upload VQGAN tokens (part {number} of {len(commits)})")
    planned = {p for p, _ in plan}
    stale = sorted(p for p in remote if p.startswith(_OURS) and p not in planned)
    last = [CommitOperationAdd(p, str(f)) for p, f in missing if p == CARD]
    last += [CommitOperationDelete(p) for p in stale]
    if last:  # the card last: it names the new files only when they are all there
        api.create_commit(repo_id, repo_type="dataset", operations=last,
                          commit_message="Update the dataset card (vqgan_datasets record)")
    return {"repo": str(url), "uploaded": len(missing), "already_there": len(plan) - len(missing),
            "removed": stale, "commits": len(commits) + bool(last)}


def _remote_files(api: Any, repo_id: str) -> dict[str, Any]:
    """The repo's files by path (its tree with sizes and LFS hashes)."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f for f in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True)
            if isinstance(f, RepoFile)}


def _same(remote: Any, local: Path) -> bool:
    """Whether the repo's file is already this one: same size, same sha256 (LFS files) or
    same git blob id (small files)."""
    if remote is None or remote.size != local.stat().st_size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == _digest(local, hashlib.sha256())
    blob = hashlib.sha1(f"blob {remote.size}\0".encode())  # git's object id of the file
    return remote.blob_id == _digest(local, blob)


def _digest(path: Path, hasher: Any) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _batches(files: list[tuple[str, Path]]) -> Iterator[list[tuple[str, Path]]]:
    batch: list[tuple[str, Path]] = []
    size = 0
    for path_in_repo, local in files:
        nbytes = local.stat().st_size
        if batch and (len(batch) >= COMMIT_FILES or size + nbytes > COMMIT_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((path_in_repo, local))
        size += nbytes
    if batch:
        yield batch
