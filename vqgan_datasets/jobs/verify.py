"""Is a token shard output still what was written? Each stats file records its tar's size and
sha256; `output_damage` checks one shard (on every rerun), `verify_output` a whole output (the
`vqgan-datasets verify` command).
"""

from __future__ import annotations

import os
from typing import Any

from .. import storage
from .manifest import MANIFEST_NAME, STATS_SUFFIX, normalize_output, stats_path

__all__ = ["output_damage", "verify_output"]


def output_damage(target: str, stats: dict[str, Any], *, check_hash: bool | None) -> str | None:
    """Why the finished shard `target` no longer matches the size and sha256 its stats record,
    or None. The size is always checked; the hash when `check_hash`, or (None) when cheap: a
    local tar modified after its stats file was written. Stats without them are trusted."""
    size, digest = stats.get("output_bytes"), stats.get("output_sha256")
    actual = storage.file_size(target)
    if actual is None:
        return "the tar is missing"
    if size is not None and actual != size:
        return f"{actual} bytes, but {size} were written (truncated or replaced)"
    if check_hash is None:
        check_hash = storage.modified_after(target, stats_path(target))
    if digest is not None and check_hash and storage.sha256(target) != digest:
        return "its sha256 differs from the one recorded when it was written (damaged)"
    return None


def verify_output(output: str | os.PathLike) -> dict[str, Any]:
    """Check every shard of a token shard output folder: each tar against the size and sha256
    in its stats file (a tar whose stats record neither is read through as a tar), every
    shard the manifest lists as done present, none failed or unfinished. `"complete"` is
    False when any is bad; `"bad_shards"` names each one and why."""
    folder = normalize_output(output)
    if not storage.isdir(folder):
        raise FileNotFoundError(f"{os.fspath(output)}: no such folder (a token shard output)")
    names = storage.list_names(folder)
    problems: dict[str, str | None] = {}  # tar -> why it is bad, None: check it
    for name in sorted(names):
        if name.startswith("."):
            continue
        if name.endswith(STATS_SUFFIX):
            problems[storage.join(folder, name[: -len(STATS_SUFFIX)] + ".tar")] = None
    for name in sorted(names):
        target = storage.join(folder, name)
        if name.endswith(".tar") and not name.startswith(".") and target not in problems:
            problems[target] = "no stats file: not finished (a rerun converts it)"
    manifest = storage.read_json(storage.join(folder, MANIFEST_NAME)) or {}
    for shard in manifest.get("shards", []):
        target = storage.join(folder, storage.split(str(shard.get("output", "")))[1])
        if target in problems:
            continue
        if shard.get("status") in ("written", "finished"):
            problems[target] = f"{MANIFEST_NAME} lists it as done, but it is missing"
        else:
            problems[target] = f"not converted ({shard.get('error') or shard.get('status')})"
    if not problems:
        raise ValueError(f"{os.fspath(output)} holds no token shards (no NAME.tar, NAME"
                         f"{STATS_SUFFIX} or {MANIFEST_NAME}): not an output of encode from tar "
                         "shards")
    bad, checked = [], 0
    for target, why in problems.items():
        if why is None:
            why = _check(target)
            checked += storage.file_size(target) or 0
        if why is not None:
            bad.append({"output": target, "error": why})
    return {"output": os.fspath(output), "complete": not bad, "shards_total": len(problems),
            "shards_ok": len(problems) - len(bad), "bytes_checked": checked,
            "bad_shards": bad}


def _check(target: str) -> str | None:
    stats = storage.read_json(stats_path(target))
    if stats is None:
        return "its stats file cannot be read"
    if stats.get("output_sha256") is None and storage.file_size(target) is not None:
        try:  # recorded before sizes and hashes were: it must at least read as a whole tar
            for _ in storage.read_shard(target, on_skip=lambda member: None):
                pass
        except storage.ShardReadError as e:
            return str(e)
    return output_damage(target, stats, check_hash=True)
