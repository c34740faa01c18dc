"""One tar shard in, one token shard out, exactly once: `convert_shard`, and the plan of a run.

The output tar is written to a hidden temporary name and renamed into place when complete;
then `<name>.stats.json` is written, last: it is the completion marker. A shard whose marker and
tar both exist is finished and never written again; anything else is redone from scratch, so a
crash at any point loses nothing and duplicates nothing. `tokenize_shards` (shards.py) and
`vqgan_datasets.ray.tokenize` both call `convert_shard`.

One writer per output shard: a shard is written only under its claim (`claims.py`), taken
after the finished check and followed by a fresh one, so two runs (or processes, or Ray
attempts) never write one shard at once, and leftover temporary files are removed only under
the claim, never from under a live writer. A run also holds a run record in the output folder
(`plan`): a run with another tokenizer or other settings is refused at start while it lives.

on_error: "skip" and "null" act per sample (counted in the stats file); "raise" (the default)
fails the shard: its report names the sample's key and why, nothing is written for it (a rerun
retries it), and a run's other shards go on. An unreadable shard fails the same way, and so
does a truncated or corrupt one (a deliberate choice: all or nothing per shard; its report
names the damage, its tar byte and the samples read before it). Tar members that are not
samples (links, no extension, duplicate keys, unsafe names, too large...) are counted by reason
in the stats file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .. import storage
from ..handle import ModelHandle
from ..metadata import METADATA_KEY, TokenizerSpec
from ..options import EncodeOptions, SampleError, StageStats
from ..storage import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_SAMPLE_BYTES, ShardReadError
from ..streams import DEFAULT_ERROR_KEY, DEFAULT_IMAGE_KEY, DEFAULT_OUTPUT_KEY, encode_stream
from ..tarsamples import TarSampleWriter
from . import claims
from .manifest import (
    ShardReport,
    output_dir,
    output_paths,
    report_from_stats,
    stats_path,
)
from .overlap import check_shard_outputs
from .verify import output_damage

__all__ = ["OutputInUseError", "Plan", "ShardOptions", "convert_shard", "engine_for", "plan",
           "shard_settings"]

logger = logging.getLogger(__name__)

SampleCallback = Callable[[str, int], Any]

RUN_PREFIX = ".vqgan-datasets-run-"  # a live run's record in its output folder
MAX_LISTED_MEMBERS = 100  # skipped tar members listed by name per stats file; counts stay exact


class OutputInUseError(ValueError):
    """Another live run is writing the output folder with another tokenizer or settings."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardOptions(EncodeOptions):
    """EncodeOptions plus `overwrite` (redo finished shards) and the tar reader's limits: a
    member whose header declares more than `max_member_bytes`, or that would take its sample
    past `max_sample_bytes`, is refused unread and counted ("too large")."""

    overwrite: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES

    def __post_init__(self, *aliases: Any) -> None:
        super().__post_init__(*aliases)
        for name in ("max_member_bytes", "max_sample_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def shard_settings(options: EncodeOptions) -> dict[str, Any]:
    """The settings recorded in each stats file: a rerun with other values refuses to mix its
    shards with the finished ones (on_error may change between runs)."""
    return {
        "image_key": ";".join(options.image_fields(DEFAULT_IMAGE_KEY.split(";"))),
        "output_key": options.output_field or DEFAULT_OUTPUT_KEY,
        "keep_image": options.keep_image,
        "on_error": options.on_error,
        "error_key": options.error_field or DEFAULT_ERROR_KEY,
    }


def engine_for(model: Any, options: EncodeOptions):
    """`model` if it is an Engine, else the cached engine of its (loaded) model."""
    from ..pipeline.engine import Engine, get_engine

    if isinstance(model, Engine):
        return model
    return get_engine(ModelHandle.of(model).load(), **options.engine_kwargs())


def convert_shard(
    url: str,
    output: str,
    *,
    model: Any,
    options: EncodeOptions | None = None,
    overwrite: bool | None = None,
    listing: set[str] | None = None,
    progress: Callable[[int], Any] | None = None,
    on_sample_written: SampleCallback | None = None,
    wait: bool = True,
    run_id: str | None = None,
    verify: bool = False,
) -> ShardReport:
    """Tokenize one tar shard into the tar `output`, exactly once; the report says what happened.

    `model`: a VQModel, a checkpoint path / Hub id, a ModelHandle, or an `Engine` (reused across
    calls). A shard already finished (stats file and tar present, same tokenizer and settings) is
    left alone and reported "finished", unless `overwrite` (default: `options.overwrite` for
    ShardOptions); a finished shard made by another tokenizer or with other settings raises.
    `listing`: the names in the output's folder when the run started, so a run over thousands
    of shards lists the folder once; with it, leftovers of interrupted runs are removed too.
    Without it the two files are looked up afresh (what a retried worker must do).
    `progress(n)` is called with the number of samples just read; `on_sample_written(url,
    samples_read)` after each sample is written (e.g. to watch or interrupt a run).
    The shard is written under its claim: while another live writer holds it, `wait` polls
    until it is free (then the shard is usually finished); `wait=False` returns at once with
    status "claimed" naming the holder. `run_id` goes into the claim, for those messages.
    A finished shard whose tar no longer matches its stats (`output_damage`; `verify`: check
    its sha256 in any case) is converted again.
    """
    options = options or EncodeOptions()
    if overwrite is None:
        overwrite = bool(getattr(options, "overwrite", False))
    engine = engine_for(model, options)
    spec = ModelHandle.of(engine.model).spec(options.image_size, preprocess=options.preprocess)
    settings = shard_settings(options)
    if not overwrite:
        done = finished(url, output, listing, spec, settings, verify, logging.INFO)
        if done is not None:
            return done
    claim_file = claims.claim_path(output)
    held = claims.claim(claim_file, {"run": run_id, "url": url}, wait=wait)
    if held is None:
        holder = claims.describe_claim(claims.read_claim(claim_file))
        return ShardReport(url=url, output=output, stats_path=stats_path(output),
                           status="claimed", error=f"{output} is being written by {holder}")
    try:
        # Afresh: another writer may have finished it since the listing (or while we waited).
        done = None if overwrite else finished(url, output, None, spec, settings, verify,
                                               logging.INFO)
        if done is not None:
            return done
        return _write_shard(url, output, listing, engine, options, spec, settings, progress,
                            on_sample_written)
    finally:
        held.release()


def finished(url: str, target: str, names: set[str] | None, spec: TokenizerSpec,
             settings: dict[str, Any], verify: bool = False,
             level: int = logging.WARNING) -> ShardReport | None:
    """The report of a shard an earlier run completed (stats JSON and tar both present, the
    tar as recorded: see `output_damage`; `verify` checks every hash), or None.

    Refuses to mix outputs: a finished shard made by another tokenizer, or with other fields
    (image_key, output_key, keep_image, error_key), raises. on_error may change between runs.
    """
    stats_file = stats_path(target)
    if names is not None:
        if storage.split(stats_file)[1] not in names or storage.split(target)[1] not in names:
            return None
    elif not storage.exists(stats_file) or not storage.exists(target):
        return None
    stats = storage.read_json(stats_file)
    if stats is None:  # unreadable: written atomically, so not ours; redo the shard
        return None
    why = _difference(stats.get(METADATA_KEY), stats.get("settings"), spec, settings)
    if why is not None:
        raise ValueError(f"{target} was {why}; write to another output, or pass --overwrite "
                         "(overwrite=True) to convert every shard again")
    damage = output_damage(target, stats, check_hash=verify or None)
    if damage is not None:
        logger.log(level, "%s: %s; converting it again", target, damage)
        return None
    return report_from_stats(url, target, stats_file, stats, "finished")


def _difference(recorded_spec: dict | None, recorded_settings: dict | None,
                spec: TokenizerSpec, settings: dict[str, Any]) -> str | None:
    """Why outputs recorded with these could not sit next to ours ("tokenized by another
    tokenizer (...)" / "written with other settings (...)"), or None. on_error may differ."""
    if recorded_spec is not None:
        try:
            theirs = TokenizerSpec.from_dict(recorded_spec)
        except (KeyError, TypeError, ValueError):
            theirs = None
        if theirs is None or theirs.fingerprint() != spec.fingerprint():
            why = (theirs.mismatch(spec) if theirs is not None else None) or "settings differ"
            return f"tokenized by another tokenizer ({why})"
    recorded = {k: v for k, v in (recorded_settings or {}).items() if k != "on_error"}
    wanted = {k: v for k, v in settings.items() if k != "on_error"}
    if recorded and recorded != wanted:
        changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
        return (f"written with other settings ({', '.join(changed)}: "
                f"{[recorded.get(k) for k in changed]} then, {[wanted[k] for k in changed]} now)")
    return None


def leftovers(target: str, names: set[str]) -> list[str]:
    """Temporary files of `target` and of its stats file that an interrupted attempt left."""
    folder, name = storage.split(target)
    prefixes = (storage.temp_prefix(name),
                storage.temp_prefix(storage.split(stats_path(target))[1]))
    return [storage.join(folder, n) for n in sorted(names) if n.startswith(prefixes)]


def _write_shard(url, target, names, engine, options, spec, settings, progress,
                 on_sample_written) -> ShardReport:
    """Write the shard; the caller holds its claim, so every temporary file of it is a dead
    writer's and may go."""
    started = time.monotonic()
    stats_file = stats_path(target)
    # A stale marker must go before the tar is replaced: a crash between the two renames must
    # never leave an old stats file next to a new tar.
    if names is None or storage.split(stats_file)[1] in names:
        storage.remove(stats_file)
    for leftover in leftovers(target, names or set()):
        logger.info("removing %s, left by an interrupted run", leftover)
        storage.remove(leftover)
    stats = StageStats()
    members = _Members()
    counted = 0
    stream_options = options.replace(image_size=spec.image_size)
    samples = storage.read_shard(
        url, on_skip=members.add,
        max_member_bytes=getattr(options, "max_member_bytes", DEFAULT_MAX_MEMBER_BYTES),
        max_sample_bytes=getattr(options, "max_sample_bytes", DEFAULT_MAX_SAMPLE_BYTES))
    try:
        with storage.atomic_write(target) as f:
            # Fields go out as _tar_fields made them; the bytes are counted and hashed as they go.
            written = _Digest(f)
            writer = TarSampleWriter(written)
            try:
                for sample in encode_stream(samples, engine, stream_options, stats):
                    writer.write(_tar_fields(sample))
                    if progress is not None:
                        progress(stats.samples_in - counted)
                    counted = stats.samples_in
                    if on_sample_written is not None:
                        on_sample_written(url, counted)
            except BaseException:
                # Close the tar stream while its file is open (the temp file is removed next);
                # left to the garbage collector it would write to a closed file.
                with contextlib.suppress(Exception):
                    writer.close()
                raise
            if progress is not None:
                progress(stats.samples_in - counted)
            writer.close()  # the tar end blocks; the file itself is closed by atomic_write
    except (ShardReadError, SampleError) as e:
        if isinstance(e, ShardReadError):
            why = "unreadable"
            error = (f"{e}; {stats.samples_in} samples read before it, none written (a damaged "
                     "shard fails whole)")
        else:
            why, error = "on_error='raise'", str(e)
        logger.error("%s (%s); the shard is left unfinished and a rerun will retry it", e, why)
        return ShardReport(url=url, output=target, stats_path=stats_file, status="failed",
                           samples_in=stats.samples_in, encoded=stats.encoded,
                           skipped=stats.skipped, failed=stats.failed,
                           seconds=time.monotonic() - started, errors=stats.errors,
                           error=error, members_skipped=dict(members.counts))
    seconds = time.monotonic() - started
    record = {
        "url": url,
        "output": target,
        "samples_in": stats.samples_in,
        "encoded": stats.encoded,
        "skipped": stats.skipped,
        "failed": stats.failed,
        "errors": stats.errors,
        "errors_not_listed": stats.errors_not_listed,
        "members_skipped": dict(members.counts),
        "members_skipped_list": members.listed,
        "members_skipped_not_listed": members.not_listed,
        "seconds": round(seconds, 3),
        "images_per_second": round(stats.encoded / seconds, 2) if seconds > 0 else 0.0,
        "output_bytes": written.size,  # checked on every rerun, and by `verify`
        "output_sha256": written.hexdigest(),
        "settings": settings,
        METADATA_KEY: spec.to_dict(),
    }
    storage.write_json(stats_file, record)  # last: the completion marker
    if stats.skipped or stats.failed:
        logger.warning("%s: %d of %d samples skipped, %d failed (on_error=%r); see %s",
                       url, stats.skipped, stats.samples_in, stats.failed,
                       options.on_error, stats_file)
    if members.counts:
        logger.warning("%s: %d tar members are not samples (%s); see %s", url,
                       sum(members.counts.values()), members.summary(), stats_file)
    return ShardReport(url=url, output=target, stats_path=stats_file, status="written",
                       samples_in=stats.samples_in, encoded=stats.encoded,
                       skipped=stats.skipped, failed=stats.failed, seconds=seconds,
                       errors=stats.errors, members_skipped=dict(members.counts))


class _Digest:
    """A file being written, with the size and sha256 of what went into it."""

    def __init__(self, f: Any) -> None:
        import hashlib

        self._f, self._hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _tar_fields(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample as its output members: the input's fields byte for byte (webdataset's encoder
    would gzip a ".gz" field a second time, and refuses or drops fields starting with "_"),
    our own fields (tokens, error) encoded by their extension, `__key__` and no other metadata."""
    from webdataset.writer import default_handlers, encode_based_on_extension1

    out = {"__key__": sample["__key__"]}
    for name, value in sample.items():
        if name.startswith("__") and name.endswith("__"):
            continue
        if not isinstance(value, (bytes, bytearray, memoryview)):
            value = encode_based_on_extension1(value, name, default_handlers)
        out[name] = value
    return out


class _Members:
    """Tar members that did not become samples: counted by reason, the first few listed."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.listed: list[dict[str, Any]] = []
        self.not_listed = 0

    def add(self, member: storage.SkippedMember) -> None:
        self.counts[member.reason] += 1
        if len(self.listed) < MAX_LISTED_MEMBERS:
            self.listed.append({"name": member.name, "reason": member.reason,
                                "detail": member.detail})
        else:
            self.not_listed += 1

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))


# ------------------------------------------------------------------------------ planning a run


@dataclasses.dataclass
class Plan:
    """What a run must do with its shards, found before anything is written. Holds the run's
    record in the output folder until `close()`."""

    urls: list[str]
    outputs: list[str]
    directory: str  # where the manifest goes
    listings: dict[str, set[str]]  # output folder -> names in it when the run started
    finished: dict[int, ShardReport]  # shard index -> report, for shards already done
    run_id: str = ""
    record: claims.Claim | None = None

    def listing(self, index: int) -> set[str]:
        return self.listings[storage.split(self.outputs[index])[0]]

    def remove_leftovers(self, indices: Sequence[int], *, fresh: bool) -> None:
        """Remove the temporary files interrupted attempts left for these shards (from the
        run's listing, or from a new one after the run), each under the shard's claim: a shard
        a live writer holds is left alone."""
        listings = self.listings
        if fresh:
            folders = {storage.split(self.outputs[i])[0] for i in indices}
            listings = {folder: storage.list_names(folder) for folder in folders}
        for i in indices:
            target = self.outputs[i]
            found = leftovers(target, listings[storage.split(target)[0]])
            if not found:
                continue
            held = claims.claim(claims.claim_path(target), {"run": self.run_id})
            if held is None:
                continue
            with held:
                for leftover in found:
                    logger.info("removing %s, left by an interrupted attempt", leftover)
                    storage.remove(leftover)

    def close(self) -> None:
        """Remove the run's record: the output folder is free for other runs."""
        if self.record is not None:
            self.record.release()
            self.record = None


def plan(urls: list[str], output: str, mine: Sequence[int] | None, spec: TokenizerSpec,
         options: EncodeOptions, *, overwrite: bool = False, run_id: str | None = None,
         verify: bool = False) -> Plan:
    """Name the outputs, take the run's record, list each output folder once and read the
    stats of every finished shard among `mine` (None: all). Every finished shard is checked
    before anything is written: a mismatch must stop the run before it adds a single shard
    made with other settings. So must another live run with other settings (OutputInUseError).
    The caller closes the plan when the run ends."""
    check_shard_outputs(urls, output)  # before anything is written
    outputs = output_paths(urls, output)
    indices = range(len(urls)) if mine is None else mine
    directory = output_dir(output)
    storage.makedirs(directory)
    settings = shard_settings(options)
    result = Plan(urls, outputs, directory, {}, {}, run_id or uuid.uuid4().hex)
    result.record = _take_record(directory, result.run_id, spec, settings)
    try:
        # Listed after our record exists: of two runs started together, one sees the other.
        result.listings[directory] = storage.list_names(directory)
        _check_runs(directory, result.listings[directory], result.record, spec, settings)
        for i in indices:
            folder = storage.split(outputs[i])[0]
            if folder not in result.listings:
                storage.makedirs(folder)
                result.listings[folder] = storage.list_names(folder)
        _sweep_claims([outputs[i] for i in indices], result.listings)
        if not overwrite:
            found = storage.parallel(
                lambda i: finished(urls[i], outputs[i], result.listing(i), spec, settings,
                                   verify),
                list(indices),
            )
            result.finished = {i: r for i, r in zip(indices, found, strict=True)
                               if r is not None}
    except BaseException:
        result.close()
        raise
    return result


def _take_record(directory: str, run_id: str, spec: TokenizerSpec,
                 settings: dict[str, Any]) -> claims.Claim:
    """This run's record in `directory`, held until the run ends: what it writes, and with
    which tokenizer and settings, for other runs to check."""
    name = f"{RUN_PREFIX}{storage.owner_tag()}-{run_id[:12]}.json"
    info = {"run": run_id, "output": directory, "settings": settings, METADATA_KEY: spec.to_dict()}
    own = claims.claim(storage.join(directory, name), info)
    if own is None:  # a name of our own: nobody else can hold it
        raise OutputInUseError(f"cannot take the run record {name} in {directory}")
    return own


def _check_runs(directory: str, names: set[str], own: claims.Claim, spec: TokenizerSpec,
                settings: dict[str, Any]) -> None:
    """Refuse this run while another live run with another tokenizer or other settings writes
    `directory`; remove the records of runs that died."""
    for other in sorted(names):
        if not other.startswith(RUN_PREFIX) or other == storage.split(own.path)[1]:
            continue
        record = _live_record(storage.join(directory, other))
        if record is None:
            continue
        why = _difference(record.get(METADATA_KEY), record.get("settings"), spec, settings)
        if why is not None:
            raise OutputInUseError(
                f"{directory} is being written by another live run "
                f"({claims.describe_claim(record)}, run {str(record.get('run'))[:12]}): its "
                f"shards are {why}. This run ({claims.describe_claim(own.record)}, run "
                f"{str(own.record.get('run'))[:12]}) was refused; wait for the other to end, "
                "or write to another output"
            )


def _live_record(path: str) -> dict[str, Any] | None:
    """The record of a live run, or None (a dead run's record is removed on the way)."""
    probe = claims.claim(path)
    if probe is not None:  # its owner is gone
        logger.info("removing %s, left by a run that ended without removing it", path)
        probe.release()
        return None
    for _ in range(20):  # the owner writes its record just after taking it
        record = claims.read_claim(path)
        if record:
            return record
        time.sleep(0.05)
    return {}


def _sweep_claims(targets: Sequence[str], listings: dict[str, set[str]]) -> None:
    """Remove the claim files dead writers left (a kill between a shard's stats file and its
    claim's removal leaves one behind a finished shard)."""
    for target in targets:
        path = claims.claim_path(target)
        folder, name = storage.split(path)
        if name in listings[folder]:
            held = claims.claim(path)
            if held is not None:
                held.release()
