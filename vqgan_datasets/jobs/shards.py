"""Shard-to-shard tokenization, a whole run: `tokenize_shards`.

This process's share of the shards (shard i to JAX process i % count, then across torch
DataLoader workers; see `distributed.assign`), converted one after the other by
`convert.convert_shard` (exactly once, resumable). Under JAX multi-host every process then
meets at a barrier and process 0 writes one `manifest.json` for the whole output, from the
stats files on disk. `manifest.write_manifest` does the same merge for runs split some other
way.

The shard names (`convert_shard`, `ShardOptions`, `OutputInUseError`, `Manifest`,
`ShardReport`, `read_shard`, `expand_urls`, `open_url`, `register_fsspec`, `ShardReadError`,
`write_manifest`, `output_paths`) are importable from here, as they always were; they live in
convert.py, manifest.py and storage.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import storage
from ..handle import ModelHandle
from ..metadata import TokenizerSpec
from ..options import EncodeOptions, encode_options
from ..storage import ShardReadError, expand_urls, open_url, read_shard, register_fsspec
from . import distributed
from .convert import OutputInUseError, ShardOptions, convert_shard, engine_for, plan
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardReport,
    collect,
    log_summary,
    normalize_output,
    output_dir,
    output_paths,
    write_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "OutputInUseError",
    "ShardOptions",
    "ShardReadError",
    "RunInterrupted",
    "ShardReport",
    "convert_shard",
    "expand_urls",
    "open_url",
    "output_paths",
    "read_shard",
    "register_fsspec",
    "tokenize_shards",
    "write_manifest",
]

logger = logging.getLogger(__name__)

_PART_PREFIX = ".manifest-part-"  # one per JAX process, merged and removed by process 0
_BARRIER = "vqgan_datasets.tokenize_shards"


def tokenize_shards(
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    model: Any,
    options: EncodeOptions | None = None,
    image_size: int | None = None,
    image_key: str | Sequence[str] | None = None,
    output_key: str | None = None,
    keep_image: bool | None = None,
    on_error: str | None = None,
    error_key: str | None = None,
    batch_size: int | None = None,
    preprocess: str | None = None,
    workers: int | None = None,
    draft: bool | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_index: int | None = None,
    worker_count: int | None = None,
    overwrite: bool = False,
    on_sample_written: Callable[[str, int], Any] | None = None,
    verify: bool = False,
) -> Manifest:
    """Tokenize tar shards into tar shards: one output per input, same keys, tokens as .npy.

    `output` is a directory (outputs keep the input's file name, e.g. `00042.tar`) or a pattern
    with `{shard}` (the input's name without .tar) and/or `{index}` (its position in the input
    list). Each output is renamed into place when complete, then `<name>.stats.json` is written;
    a rerun skips shards whose stats and tar both exist, so a killed run resumes with every
    sample written exactly once. Settings: `options=EncodeOptions(...)` or the keyword
    shortcuts. A shard that cannot be read, or (on_error="raise", the default) holds a sample
    that cannot be encoded, is reported as failed with the reason and the sample's key (no
    stats, so a rerun retries it) and the others go on; "skip" and "null" act per sample.

    Shards are split across JAX processes (shard i to process i % count) and then across torch
    DataLoader workers, unless the arguments say otherwise. Under JAX multi-host (see
    `vqgan_datasets.jobs.distributed.initialize`) every process must call this with the same
    arguments: each converts its own shards, all meet at a barrier (also when one of them
    failed), and process 0 writes one `manifest.json` merged from the stats files on disk and
    returns it; the others return their own shards. Splits JAX does not coordinate (explicit
    process_index/process_count without jax.distributed, DataLoader workers) write one
    `manifest-<process>-of-<count>-worker-<w>.json` each; `write_manifest` merges them later.
    `on_sample_written(url, samples_read)` is called after each sample written.

    One writer per shard: each is written under its claim, so runs with the same settings
    may share an output (each converts what the other does not hold, then waits for the rest);
    a run while another live run with another tokenizer or other settings writes the output
    raises OutputInUseError at start. A finished shard whose tar no longer matches the size
    (always checked) or sha256 (checked when cheap, or every one with `verify=True`) its stats
    file records is converted again. An output that would overwrite an input raises
    `OutputIsInputError` before anything is read. KeyboardInterrupt stops the run: the
    manifest is written (shards not finished listed as failed) and `RunInterrupted` raised. Tar members that are not samples are counted by reason
    (`Manifest.members_skipped`); a truncated or corrupt input shard fails whole.
    """
    started = time.monotonic()
    handle = ModelHandle.of(model)
    opts = encode_options(options, image_size=image_size, image_key=image_key,
                          output_key=output_key, keep_image=keep_image, on_error=on_error,
                          error_key=error_key, batch_size=batch_size, preprocess=preprocess,
                          workers=workers, draft=draft)
    overwrite = overwrite or bool(getattr(opts, "overwrite", False))  # ShardOptions(overwrite=)
    spec = handle.spec(opts.image_size, preprocess=opts.preprocess)
    output = normalize_output(output)
    import jax

    jax_split = (jax.process_index(), jax.process_count())
    process = distributed.check_split(
        "process",
        jax_split[0] if process_index is None else process_index,
        jax_split[1] if process_count is None else process_count,
    )
    detected = (distributed.torch_worker() if worker_index is None or worker_count is None
                else (0, 1))
    worker = distributed.check_split(
        "worker",
        detected[0] if worker_index is None else worker_index,
        detected[1] if worker_count is None else worker_count,
    )
    coordinated = process[1] > 1 and process == jax_split and worker[1] == 1
    reports: dict[int, ShardReport] = {}
    run = functools.partial(_run, inputs, output, handle, spec, opts, (overwrite, verify),
                            process, worker, progress, on_sample_written, reports)
    if coordinated:
        return _tokenize_multihost(run, inputs, output, spec, process, started)

    interrupted = None
    try:
        manifest = run()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where the caller made it one
        # What was done is on disk: say so in the manifest, then stop as asked.
        interrupted = e
        manifest = _interrupted_manifest(inputs, output, spec, process, worker, reports)
    manifest.seconds = time.monotonic() - started
    name = MANIFEST_NAME if process[1] * worker[1] == 1 else (
        f"manifest-{process[0]:05d}-of-{process[1]:05d}-worker-{worker[0]:03d}.json"
    )
    manifest.path = storage.join(output_dir(output), name)
    storage.write_json(manifest.path, manifest.to_dict())
    log_summary(manifest)
    if interrupted is not None:
        raise RunInterrupted(manifest) from interrupted
    return manifest


class RunInterrupted(KeyboardInterrupt):
    """A shard run stopped by KeyboardInterrupt after writing its manifest (`.manifest`):
    shards written before are finished, the others are listed as not converted."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(f"interrupted; manifest {manifest.path}")
        self.manifest = manifest


def _interrupted_manifest(inputs, output, spec, process, worker, reports) -> Manifest:
    """This run's shards as the disk has them (a stats file: done), after an interruption."""
    urls = expand_urls(inputs)
    mine = distributed.assign(len(urls), process, worker)
    outputs = output_paths(urls, output)
    found = collect(urls, output, {outputs[i]: r for i, r in reports.items()},
                    lambda i: "the run was interrupted")
    return Manifest(output=output, shards=[found.shards[i] for i in mine], spec=spec.to_dict(),
                    process_index=process[0], process_count=process[1],
                    worker_index=worker[0], worker_count=worker[1])


def _run(inputs, output, handle, spec, options, redo, process, worker, progress,
         on_sample_written, reports: dict[int, ShardReport]) -> Manifest:
    """This process's (and worker's) shards, one after the other; their manifest, unwritten.
    `reports` fills in as shards end (what an interrupted run did).

    A shard another live writer holds (a concurrent run with the same settings) is put off,
    and waited for after the others: by then it is usually finished, and is reported so."""
    urls = expand_urls(inputs)
    mine = distributed.assign(len(urls), process, worker)
    overwrite, verify = redo
    todo = plan(urls, output, mine, spec, options, overwrite=overwrite, verify=verify)
    engine = None

    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="img", desc=f"tokenize 0/{len(mine)} shards", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        put_off: list[int] = []
        for wait, indices in ((False, mine), (True, put_off)):
            for i in indices:
                report = todo.finished.get(i)
                if report is None:
                    if engine is None:  # compiled only when there is work: a no-op rerun is quick
                        engine = engine_for(handle, options)
                    report = convert_shard(todo.urls[i], todo.outputs[i], model=engine,
                                           options=options, overwrite=overwrite,
                                           listing=todo.listing(i), progress=bar.update,
                                           on_sample_written=on_sample_written, wait=wait,
                                           run_id=todo.run_id, verify=verify)
                    if report.status == "claimed":
                        logger.info("%s; converting the other shards first", report.error)
                        put_off.append(i)
                        continue
                reports[i] = report
                bar.set_description_str(f"tokenize {len(reports)}/{len(mine)} shards")
    finally:
        bar.close()
        todo.close()
    return Manifest(output=output, shards=[reports[i] for i in mine], spec=spec.to_dict(),
                    process_index=process[0], process_count=process[1],
                    worker_index=worker[0], worker_count=worker[1])


def _tokenize_multihost(run: Callable[[], Manifest], inputs, output: str, spec: TokenizerSpec,
                        process: tuple[int, int], started: float) -> Manifest:
    """`run` on every JAX process, then one manifest from process 0.

    Every process reaches each barrier whatever happened before it (try/finally): a process
    that raised still meets the others, then re-raises, so the rest never wait for a peer that
    left. A process that dies (killed, preempted) cannot; JAX's coordination service notices
    its missing heartbeats and ends the survivors (after `heartbeat_timeout_seconds`, 100 s by
    default), so a multi-host run never hangs for ever on a dead peer. Nothing is lost either
    way: the stats files on disk are the truth, and a rerun of every process resumes.
    """
    index, count = process
    directory = output_dir(output)
    part = storage.join(directory, _part_name(index, count))
    own: Manifest | None = None
    error: BaseException | None = None
    try:
        own = run()
    except BaseException as e:  # re-raised after the last barrier: the others wait there too
        error = e
    finally:
        # What this process did, for process 0 to merge: shard statuses and why shards failed
        # (the stats files hold the counts, but a failed shard has no stats file). Best effort:
        # nothing may keep a process from the barrier.
        with contextlib.suppress(Exception):
            if index != 0:
                storage.write_json(part, {
                    "process_index": index,
                    "error": None if error is None else f"{type(error).__name__}: {error}",
                    "shards": [] if own is None else [s.to_dict() for s in own.shards],
                })
        distributed.barrier(f"{_BARRIER}:converted")
    merged = None
    try:
        if index == 0:
            own_error = None if error is None else f"{type(error).__name__}: {error}"
            merged = _merge(expand_urls(inputs), output, spec, count, own, own_error)
            merged.seconds = time.monotonic() - started
            merged.path = storage.join(directory, MANIFEST_NAME)
            storage.write_json(merged.path, merged.to_dict())
            for i in range(1, count):
                storage.remove(storage.join(directory, _part_name(i, count)))
            log_summary(merged)
    finally:
        # So that manifest.json exists when any process returns.
        distributed.barrier(f"{_BARRIER}:manifest")
    if error is not None:
        raise error
    if merged is not None:
        return merged
    own.seconds = time.monotonic() - started
    own.path = storage.join(directory, MANIFEST_NAME)
    return own


def _part_name(index: int, count: int) -> str:
    return f"{_PART_PREFIX}{index:05d}-of-{count:05d}.json"


def _merge(urls: list[str], output: str, spec: TokenizerSpec, count: int,
           own: Manifest | None, own_error: str | None = None) -> Manifest:
    """One manifest for every shard: counts from the stats files, statuses from the processes'
    parts (`own` is process 0's, in memory; `own_error` why its run raised)."""
    directory = output_dir(output)
    statuses: dict[str, ShardReport] = {}
    process_errors: dict[int, str] = {} if own_error is None else {0: f"process 0 failed: "
                                                                      f"{own_error}"}
    for i in range(1, count):
        part = storage.read_json(storage.join(directory, _part_name(i, count))) or {}
        if part.get("error"):
            process_errors[i] = f"process {i} failed: {part['error']}"
        for shard in part.get("shards", []):
            statuses[shard["output"]] = ShardReport.from_dict(shard)
    for shard in own.shards if own is not None else []:
        statuses[shard.output] = shard
    manifest = collect(urls, output, statuses, lambda i: process_errors.get(i % count))
    manifest.spec = spec.to_dict()
    manifest.process_count = count
    return manifest
