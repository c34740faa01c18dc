"""Shard-to-shard tokenization: tar shards in, token tar shards out, every sample exactly once.

- reading: `expand_urls` (brace patterns, lists), `open_url` (local paths, `pipe:`, webdataset's
  schemes, any other `scheme://` through fsspec), `read_shard` (samples of one tar).
- `convert_shard`: the one place a shard is converted. The output tar is written to a hidden
  temporary name and renamed into place when complete; then `<name>.stats.json` is written, last:
  it is the completion marker. A shard whose marker and tar both exist is finished and never
  written again; anything else is redone from scratch, so a crash at any point loses nothing and
  duplicates nothing. `tokenize_shards` (here) and `vqgan_datasets.ray.tokenize` both call it.
- `tokenize_shards`: this process's share of the shards (shard i to JAX process i % count), one
  after the other. Under JAX multi-host every process then meets at a barrier and process 0
  writes one `manifest.json` for the whole output, from the stats files on disk.
- `write_manifest`: the same merge, for runs split some other way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import posixpath
import re
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from .images import OnError
from .metadata import METADATA_KEY, TokenizerSpec
from .modeling import VQModel
from .wds import (
    DEFAULT_IMAGE_KEY,
    StageStats,
    _as_model,
    _encode_stream,
    _EncodeOptions,
    _parse_keys,
    _Policy,
)

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ShardOptions",
    "ShardReadError",
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

STATS_SUFFIX = ".stats.json"
MANIFEST_NAME = "manifest.json"
_PART_PREFIX = ".manifest-part-"  # one per JAX process, merged and removed by process 0
_BARRIER = "vqgan_datasets.tokenize_shards"
_READ_THREADS = 16  # stats files read at once: listing a million-shard output is I/O bound

# Called as hook(url, samples_written) after every sample convert_shard writes. Tests use it to
# slow a run down and kill it mid-shard; nothing in the library sets it.
_after_sample_hook: Callable[[str, int], None] | None = None


class ShardReadError(OSError):
    """A shard could not be opened or read as a tar stream (missing, truncated, not a tar)."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"cannot read shard {url}: {reason}")

    def __reduce__(self):
        return type(self), (self.url, self.reason)


# ------------------------------------------------------------------------------ reading shards


def expand_urls(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from brace patterns ("a/{000..009}.tar"), "::"-joined lists, or a list."""
    import braceexpand

    if isinstance(inputs, (str, os.PathLike)):
        parts = os.fspath(inputs).split("::")
    else:
        parts = [os.fspath(p) for p in inputs]
    urls = [url for part in parts if part for url in braceexpand.braceexpand(part)]
    if not urls:
        raise ValueError(f"no input shards in {inputs!r}")
    return urls


def _scheme(url: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


def _gopen_handles(url: str) -> bool:
    from webdataset.gopen import gopen_schemes

    if url.startswith("pipe:") or url == "-":
        return True
    scheme = _scheme(url)
    return scheme in ("", "file") or scheme in gopen_schemes


def open_url(url: str) -> BinaryIO:
    """A readable binary stream: local paths, file://, pipe:, webdataset's schemes, else fsspec."""
    try:
        if _gopen_handles(url):
            from webdataset.gopen import gopen

            return gopen(url, "rb")
        import fsspec

        return fsspec.open(url, "rb").open()
    except Exception as e:
        raise ShardReadError(url, f"{type(e).__name__}: {e}") from e


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec(*schemes: str) -> None:
    """Let webdataset's own readers (WebDataset, tarfile_to_samples) open these URL schemes
    through fsspec, e.g. register_fsspec("s3", "memory"). Changes webdataset's global table, so
    it is the caller's explicit choice; tokenize_shards does not need it."""
    from webdataset.gopen import gopen_schemes

    for scheme in schemes:
        gopen_schemes[scheme.rstrip(":/")] = _gopen_fsspec


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one tar shard (raw bytes per field, `__key__`, `__url__`), in tar order.

    Any failure to open or read the tar stream raises ShardReadError naming the url.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_url(url)

    def reraise(exn: Exception) -> bool:
        raise exn

    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise)
        yield from group_by_keys(files, handler=reraise)
    except ShardReadError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:
        reason = str(e.args[0]) if e.args else type(e).__name__
        raise ShardReadError(url, f"{type(e).__name__}: {reason}") from e
    finally:
        with contextlib.suppress(Exception):
            stream.close()


# ------------------------------------------------------------------------------ output files
# Output paths are local paths (file:// already stripped) or fsspec URLs (s3://, memory://...).


def _is_local(path: str) -> bool:
    return not _scheme(path)


def _fs(path: str):
    import fsspec.core

    return fsspec.core.url_to_fs(path)


def _split(path: str) -> tuple[str, str]:
    return os.path.split(path) if _is_local(path) else posixpath.split(path)


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name) if _is_local(directory) else f"{directory.rstrip('/')}/{name}"


def _exists(path: str) -> bool:
    if _is_local(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.exists(inner)


def _remove(path: str) -> None:
    if _is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner)


def _makedirs(directory: str) -> None:
    if _is_local(directory):
        os.makedirs(directory or ".", exist_ok=True)
    else:
        fs, inner = _fs(directory)
        fs.makedirs(inner, exist_ok=True)


def _list_names(directory: str) -> set[str]:
    """File names in `directory`, listed once per run: one listing instead of a stat (or, on
    object stores, a request) per shard."""
    if _is_local(directory):
        return set(os.listdir(directory or "."))
    fs, inner = _fs(directory)
    return {posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)}


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


@contextlib.contextmanager
def _atomic_write(final: str):
    """Yields a binary file; on success the bytes are on disk (fsync) and renamed to `final`.

    On failure the temporary file is removed. A reader never sees a partial `final`: a crash
    leaves at most a hidden `.<name>.tmp-*` file, which the next run removes. Temporary names
    are unique per attempt, so two writers of one shard (a task Ray retried while the first
    attempt still ran) never write into the same file; the last rename wins, whole.
    """
    directory, name = _split(final)
    temp = _join(directory, f"{_temp_prefix(name)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if _is_local(final):
            with open(temp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
            _fsync_dir(directory)
        else:
            fs, inner = _fs(temp)
            with fs.open(inner, "wb") as f:
                yield f
            fs.mv(inner, _fs(final)[1])
    except BaseException:
        with contextlib.suppress(Exception):
            _remove(temp)
        raise


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is; not possible on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(final: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    with _atomic_write(final) as f:
        f.write(text.encode("utf-8"))


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        if _is_local(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        fs, inner = _fs(path)
        with fs.open(inner, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _parallel(function: Callable, items: Sequence) -> list:
    """function(item) for every item, in order, on a few threads (file reads wait on I/O)."""
    if len(items) < 4:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(_READ_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


# ------------------------------------------------------------------------------ reports


@dataclasses.dataclass
class ShardReport:
    """One input shard: where it went and what happened to its samples."""

    url: str
    output: str
    stats_path: str
    status: str  # "written" (this run), "finished" (by an earlier run), "failed"
    samples_in: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: str | None = None  # why the whole shard failed (status "failed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardReport:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class Manifest:
    """The result of a run: every shard it covers, and totals.

    From `tokenize_shards` on one process, or on JAX process 0 of a multi-host run (every shard
    of every process, merged from the stats files), or from `vqgan_datasets.ray.tokenize`.
    Other processes of a multi-host run get their own shards only; `path` still names the one
    merged manifest.
    """

    output: str
    shards: list[ShardReport]
    spec: dict[str, Any]
    process_index: int = 0
    process_count: int = 1
    worker_index: int = 0
    worker_count: int = 1
    seconds: float = 0.0
    path: str | None = None  # where the manifest JSON was written

    @property
    def written(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "written"]

    @property
    def finished(self) -> list[ShardReport]:
        """Shards an earlier run completed; left as they were."""
        return [s for s in self.shards if s.status == "finished"]

    @property
    def failed_shards(self) -> list[ShardReport]:
        return [s for s in self.shards if s.status == "failed"]

    @property
    def totals(self) -> dict[str, int]:
        """Sample counts over every completed shard (written now or before)."""
        done = [s for s in self.shards if s.status != "failed"]
        return {name: sum(getattr(s, name) for s in done)
                for name in ("samples_in", "encoded", "skipped", "failed")}

    @property
    def images_per_second(self) -> float:
        encoded = sum(s.encoded for s in self.written)
        return encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "worker_index": self.worker_index,
            "worker_count": self.worker_count,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "shards_written": len(self.written),
            "shards_finished_before": len(self.finished),
            "shards_failed": len(self.failed_shards),
            "totals": self.totals,
            METADATA_KEY: self.spec,
            "shards": [s.to_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> Manifest:
        return cls(
            output=data["output"], shards=[ShardReport.from_dict(s) for s in data["shards"]],
            spec=data.get(METADATA_KEY, {}), process_index=data.get("process_index", 0),
            process_count=data.get("process_count", 1), worker_index=data.get("worker_index", 0),
            worker_count=data.get("worker_count", 1), seconds=data.get("seconds", 0.0), path=path,
        )


def _log_summary(manifest: Manifest, what: str = "tokenize_shards") -> None:
    totals = manifest.totals
    logger.info(
        "%s: %d shards written, %d finished before, %d failed; %d samples, "
        "%d encoded, %d skipped, %d failed; %.1f images/s over %.1f s; manifest %s",
        what, len(manifest.written), len(manifest.finished), len(manifest.failed_shards),
        totals["samples_in"], totals["encoded"], totals["skipped"], totals["failed"],
        manifest.images_per_second, manifest.seconds, manifest.path,
    )
    for report in manifest.failed_shards[:20]:
        logger.error("shard not converted: %s", report.error)
    if len(manifest.failed_shards) > 20:
        logger.error("... and %d more; the manifest lists them", len(manifest.failed_shards) - 20)


# ------------------------------------------------------------------------------ output names


def _shard_stem(url: str, index: int) -> str:
    """The input's file name without .tar/.tgz/.tar.gz; for pipe: commands, the last tar name."""
    names = re.findall(r"([^\s/|<>;'\"]+)\.(?:tar\.gz|tgz|tar)(?=$|[\s'\";|?#])", url)
    if names:
        return names[-1]
    base = posixpath.basename(url.split("?")[0].rstrip("/"))
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", base)
    return stem if stem and not url.startswith("pipe:") else f"{index:05d}"


def _output_path(output: str, url: str, index: int) -> str:
    stem = _shard_stem(url, index)
    if "{shard" in output or "{index" in output:
        return output.format(shard=stem, index=index)
    return _join(output, stem + ".tar")


def _normalize_output(output: str | os.PathLike) -> str:
    return re.sub(r"^file://", "", os.fspath(output))


def output_paths(urls: Sequence[str], output: str | os.PathLike) -> list[str]:
    """The output tar of every input shard: `output/<input name>.tar`, or `output` formatted
    with `{shard}` (the input's name without .tar) and `{index}` (its position). Two inputs
    that would share an output raise."""
    output = _normalize_output(output)
    outputs = [_output_path(output, url, i) for i, url in enumerate(urls)]
    clashes = [o for o, n in collections.Counter(outputs).items() if n > 1]
    if clashes:
        raise ValueError(
            f"several input shards map to the output {clashes[0]!r}; use a pattern with "
            "{index} (e.g. 'out/{index:05d}.tar') or inputs with distinct file names"
        )
    return outputs


def _stats_path(output_file: str) -> str:
    return re.sub(r"\.tar$", "", output_file) + STATS_SUFFIX


def _output_dir(output: str) -> str:
    """Where the manifest goes: the directory, or a pattern's directory before any field."""
    return _split(output.split("{", 1)[0])[0] if "{" in output else output


# ------------------------------------------------------------------------------ convert_shard


@dataclasses.dataclass(frozen=True)
class ShardOptions:
    """How shards are converted. All but `batch_size`, `draft` and `overwrite` are recorded in
    each stats file; a rerun with other values refuses to mix its shards with the finished ones
    (on_error may change between runs)."""

    image_size: int | None = None  # default: the model's resolution
    image_key: str | tuple[str, ...] = DEFAULT_IMAGE_KEY
    output_key: str = "vqgan.npy"
    keep_image: bool = False
    on_error: OnError = "skip"
    error_key: str = "vqgan_error"
    batch_size: int = 8  # per device
    draft: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        _Policy(self.on_error)
        object.__setattr__(self, "image_key", _parse_keys(self.image_key, "image_key"))
        if isinstance(self.batch_size, bool) or int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    def settings(self) -> dict[str, Any]:
        return {"image_key": ";".join(self.image_key), "output_key": self.output_key,
                "keep_image": self.keep_image, "on_error": self.on_error,
                "error_key": self.error_key}

    def _encode_options(self, spec: TokenizerSpec) -> _EncodeOptions:
        return _EncodeOptions(
            image_keys=self.image_key, output_key=self.output_key, image_size=spec.image_size,
            keep_image=self.keep_image, error_key=self.error_key, token_dtype=spec.token_dtype,
            draft=self.draft, policy=_Policy(self.on_error),
        )


def _engine_for(model: Any, options: ShardOptions):
    from .engine import Engine, get_engine

    if isinstance(model, Engine):
        return model
    return get_engine(_as_model(model), batch_size=options.batch_size)


def convert_shard(
    url: str,
    output: str,
    *,
    model: VQModel | str | Any,
    options: ShardOptions | None = None,
    listing: set[str] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ShardReport:
    """Tokenize one tar shard into the tar `output`, exactly once; the report says what happened.

    `model`: a VQModel, a checkpoint path / Hub id, or an `Engine` (reused across calls). A shard
    already finished (stats file and tar present, same tokenizer and settings) is left alone and
    reported "finished", unless `options.overwrite`; a finished shard made by another tokenizer
    or with other settings raises. `listing`: the names in the output's folder when the run
    started, so a run over thousands of shards lists the folder once; with it, leftovers of
    interrupted runs are removed too. Without it the two files are looked up afresh (what a
    retried worker must do). `progress(n)` is called with the number of samples just read.
    An unreadable shard raises ShardReadError under on_error="raise", else it is reported
    "failed" (no stats file, so a rerun retries it).
    """
    options = options or ShardOptions()
    engine = _engine_for(model, options)
    spec = TokenizerSpec.from_model(engine.model, options.image_size, draft=options.draft)
    settings = options.settings()
    if not options.overwrite:
        done = _finished(url, output, listing, spec, settings)
        if done is not None:
            return done
    return _write_shard(url, output, listing, engine, options, spec, settings, progress)


def _finished(url: str, target: str, names: set[str] | None, spec: TokenizerSpec,
              settings: dict[str, Any]) -> ShardReport | None:
    """The report of a shard an earlier run completed (stats JSON and tar both present), or None.

    Refuses to mix outputs: a finished shard made by another tokenizer, or with other fields
    (image_key, output_key, keep_image, error_key), raises. on_error may change between runs.
    """
    stats_file = _stats_path(target)
    if names is not None:
        if _split(stats_file)[1] not in names or _split(target)[1] not in names:
            return None
    elif not _exists(stats_file) or not _exists(target):
        return None
    stats = _read_json(stats_file)
    if stats is None:  # unreadable: written atomically, so not ours; redo the shard
        return None
    recorded = stats.get(METADATA_KEY)
    if recorded is not None:
        try:
            theirs = TokenizerSpec.from_dict(recorded)
        except (KeyError, TypeError, ValueError):
            theirs = None
        if theirs is None or theirs.fingerprint() != spec.fingerprint():
            why = (theirs.mismatch(spec) if theirs is not None else None) or "settings differ"
            raise ValueError(
                f"{target} was tokenized by another tokenizer ({why}); write to another "
                "output or pass overwrite=True"
            )
    recorded = {k: v for k, v in stats.get("settings", {}).items() if k != "on_error"}
    wanted = {k: v for k, v in settings.items() if k != "on_error"}
    if recorded and recorded != wanted:
        changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
        raise ValueError(
            f"{target} was written with other settings ({', '.join(changed)}: "
            f"{[recorded.get(k) for k in changed]} then, {[wanted[k] for k in changed]} now); "
            "write to another output or pass overwrite=True"
        )
    return _report_from_stats(url, target, stats_file, stats, "finished")


def _report_from_stats(url: str, target: str, stats_file: str, stats: dict[str, Any],
                       status: str) -> ShardReport:
    return ShardReport(
        url=url, output=target, stats_path=stats_file, status=status,
        samples_in=int(stats.get("samples_in", 0)), encoded=int(stats.get("encoded", 0)),
        skipped=int(stats.get("skipped", 0)), failed=int(stats.get("failed", 0)),
        seconds=float(stats.get("seconds", 0.0)), errors=list(stats.get("errors", [])),
    )


def _leftovers(target: str, names: set[str]) -> list[str]:
    """Temporary files of `target` and of its stats file that an interrupted attempt left."""
    folder, name = _split(target)
    prefixes = (_temp_prefix(name), _temp_prefix(_split(_stats_path(target))[1]))
    return [_join(folder, n) for n in sorted(names) if n.startswith(prefixes)]


def _write_shard(url, target, names, engine, options, spec, settings, progress) -> ShardReport:
    from webdataset import TarWriter

    started = time.monotonic()
    stats_file = _stats_path(target)
    # A stale marker must go before the tar is replaced: a crash between the two renames must
    # never leave an old stats file next to a new tar.
    if names is None or _split(stats_file)[1] in names:
        _remove(stats_file)
    for leftover in _leftovers(target, names or set()):
        logger.info("removing %s, left by an interrupted run", leftover)
        _remove(leftover)
    stats = StageStats()
    counted = 0
    encode_options = options._encode_options(spec)
    try:
        with _atomic_write(target) as f:
            writer = TarWriter(f)
            try:
                for sample in _encode_stream(read_shard(url), engine, encode_options, stats):
                    writer.write(sample)
                    if progress is not None:
                        progress(stats.samples_in - counted)
                    counted = stats.samples_in
                    if _after_sample_hook is not None:
                        _after_sample_hook(url, counted)
            except BaseException:
                # Close the tar stream while its file is open (the temp file is removed next);
                # left to the garbage collector it would write to a closed file.
                with contextlib.suppress(Exception):
                    writer.close()
                raise
            if progress is not None:
                progress(stats.samples_in - counted)
            writer.close()  # the tar end blocks; the file itself is closed by _atomic_write
    except ShardReadError as e:
        if options.on_error == "raise":
            raise
        logger.error("%s; the shard is left unfinished and a rerun will retry it", e)
        return ShardReport(url=url, output=target, stats_path=stats_file, status="failed",
                           samples_in=stats.samples_in, encoded=stats.encoded,
                           skipped=stats.skipped, failed=stats.failed,
                           seconds=time.monotonic() - started, errors=stats.errors,
                           error=str(e))
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
        "seconds": round(seconds, 3),
        "images_per_second": round(stats.encoded / seconds, 2) if seconds > 0 else 0.0,
        "settings": settings,
        METADATA_KEY: spec.to_dict(),
    }
    _write_json(stats_file, record)  # last: the completion marker
    if stats.skipped or stats.failed:
        logger.warning("%s: %d of %d samples skipped, %d failed (on_error=%r); see %s",
                       url, stats.skipped, stats.samples_in, stats.failed,
                       options.on_error, stats_file)
    return ShardReport(url=url, output=target, stats_path=stats_file, status="written",
                       samples_in=stats.samples_in, encoded=stats.encoded,
                       skipped=stats.skipped, failed=stats.failed, seconds=seconds,
                       errors=stats.errors)


# ------------------------------------------------------------------------------ planning a run


@dataclasses.dataclass
class _Plan:
    """What a run must do with its shards, found before anything is written."""

    urls: list[str]
    outputs: list[str]
    directory: str  # where the manifest goes
    listings: dict[str, set[str]]  # output folder -> names in it when the run started
    finished: dict[int, ShardReport]  # shard index -> report, for shards already done

    def listing(self, index: int) -> set[str]:
        return self.listings[_split(self.outputs[index])[0]]


def _plan(urls: list[str], output: str, mine: Sequence[int] | None, spec: TokenizerSpec,
          options: ShardOptions) -> _Plan:
    """Name the outputs, list each output folder once and read the stats of every finished
    shard among `mine` (None: all). Every finished shard is checked before anything is written:
    a mismatch must stop the run before it adds a single shard made with other settings."""
    outputs = output_paths(urls, output)
    indices = range(len(urls)) if mine is None else mine
    directory = _output_dir(output)
    _makedirs(directory)
    listings: dict[str, set[str]] = {}
    for i in indices:
        folder = _split(outputs[i])[0]
        if folder not in listings:
            _makedirs(folder)
            listings[folder] = _list_names(folder)
    plan = _Plan(urls, outputs, directory, listings, {})
    if not options.overwrite:
        settings = options.settings()
        found = _parallel(
            lambda i: _finished(urls[i], outputs[i], plan.listing(i), spec, settings),
            list(indices),
        )
        plan.finished = {i: r for i, r in zip(indices, found, strict=True) if r is not None}
    return plan


# ------------------------------------------------------------------------------ tokenize_shards


def _assign(count: int, process: tuple[int, int], worker: tuple[int, int]) -> list[int]:
    """Shard i goes to process i % P; within a process, its j-th shard to worker j % W."""
    from .distributed import process_split

    mine = process_split(range(count), *process)
    return mine[worker[0]::worker[1]]


def _check_split(name: str, index: int, count: int) -> tuple[int, int]:
    if isinstance(index, bool) or isinstance(count, bool) or count < 1 or not 0 <= index < count:
        raise ValueError(f"{name}_index must be in [0, {name}_count); got {index} of {count}")
    return int(index), int(count)


def _torch_worker() -> tuple[int, int]:
    """(id, count) inside a torch DataLoader worker, else (0, 1). Only looks if torch is already
    imported: a process that never imported torch is not one of its workers."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (int(info.id), int(info.num_workers)) if info is not None else (0, 1)


def tokenize_shards(
    inputs: str | Sequence[str],
    output: str | os.PathLike,
    *,
    model: VQModel | str,
    image_size: int | None = None,
    image_key: str | Sequence[str] = DEFAULT_IMAGE_KEY,
    output_key: str = "vqgan.npy",
    keep_image: bool = False,
    on_error: OnError = "skip",
    error_key: str = "vqgan_error",
    batch_size: int = 8,
    draft: bool = True,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_index: int | None = None,
    worker_count: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Tokenize tar shards into tar shards: one output per input, same keys, tokens as .npy.

    `output` is a directory (outputs keep the input's file name, e.g. `00042.tar`) or a pattern
    with `{shard}` (the input's name without .tar) and/or `{index}` (its position in the input
    list). Each output is renamed into place when complete, then `<name>.stats.json` is written;
    a rerun skips shards whose stats and tar both exist, so a killed run resumes with every
    sample written exactly once. A shard that cannot be read raises under on_error="raise",
    else it is reported as failed (no stats, so a rerun retries it) and the others go on.

    Shards are split across JAX processes (shard i to process i % count) and then across torch
    DataLoader workers, unless the arguments say otherwise. Under JAX multi-host (see
    `vqgan_datasets.distributed.initialize`) every process must call this with the same
    arguments: each converts its own shards, all meet at a barrier (also when one of them
    failed), and process 0 writes one `manifest.json` merged from the stats files on disk and
    returns it; the others return their own shards. Splits JAX does not coordinate (explicit
    process_index/process_count without jax.distributed, DataLoader workers) write one
    `manifest-<process>-of-<count>-worker-<w>.json` each; `write_manifest` merges them later.
    """
    started = time.monotonic()
    model = _as_model(model)
    options = ShardOptions(image_size=image_size, image_key=image_key, output_key=output_key,
                           keep_image=keep_image, on_error=on_error, error_key=error_key,
                           batch_size=batch_size, draft=draft, overwrite=overwrite)
    spec = TokenizerSpec.from_model(model, image_size, draft=draft)
    output = _normalize_output(output)
    import jax

    jax_split = (jax.process_index(), jax.process_count())
    process = _check_split(
        "process",
        jax_split[0] if process_index is None else process_index,
        jax_split[1] if process_count is None else process_count,
    )
    detected = _torch_worker() if worker_index is None or worker_count is None else (0, 1)
    worker = _check_split(
        "worker",
        detected[0] if worker_index is None else worker_index,
        detected[1] if worker_count is None else worker_count,
    )
    coordinated = process[1] > 1 and process == jax_split and worker[1] == 1
    run = functools.partial(_run, inputs, output, model, spec, options, process, worker,
                            progress)
    if coordinated:
        return _tokenize_multihost(run, inputs, output, spec, process, started)

    manifest = run()
    manifest.seconds = time.monotonic() - started
    name = MANIFEST_NAME if process[1] * worker[1] == 1 else (
        f"manifest-{process[0]:05d}-of-{process[1]:05d}-worker-{worker[0]:03d}.json"
    )
    manifest.path = _join(_output_dir(output), name)
    _write_json(manifest.path, manifest.to_dict())
    _log_summary(manifest)
    return manifest


def _run(inputs, output, model, spec, options, process, worker, progress) -> Manifest:
    """This process's (and worker's) shards, one after the other; their manifest, unwritten."""
    urls = expand_urls(inputs)
    mine = _assign(len(urls), process, worker)
    plan = _plan(urls, output, mine, spec, options)
    reports: list[ShardReport] = []
    engine = None

    from tqdm.auto import tqdm

    bar = tqdm(total=None, unit="img", desc=f"tokenize 0/{len(mine)} shards", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for done, i in enumerate(mine):
            report = plan.finished.get(i)
            if report is None:
                if engine is None:  # compiled only when there is work: a no-op rerun is quick
                    engine = _engine_for(model, options)
                report = convert_shard(plan.urls[i], plan.outputs[i], model=engine,
                                       options=options, listing=plan.listing(i),
                                       progress=bar.update)
            reports.append(report)
            bar.set_description_str(f"tokenize {done + 1}/{len(mine)} shards")
    finally:
        bar.close()
    return Manifest(output=output, shards=reports, spec=spec.to_dict(),
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
    from .distributed import barrier

    index, count = process
    directory = _output_dir(output)
    part = _join(directory, f"{_PART_PREFIX}{index:05d}-of-{count:05d}.json")
    own: Manifest | None = None
    error: BaseException | None = None
    try:
        own = run()
    except BaseException as e:
        error = e
        raise
    finally:
        # What this process did, for process 0 to merge: shard statuses and why shards failed
        # (the stats files hold the counts, but a failed shard has no stats file). Best effort:
        # nothing may keep a process from the barrier.
        with contextlib.suppress(Exception):
            if index != 0:
                _write_json(part, {
                    "process_index": index,
                    "error": None if error is None else f"{type(error).__name__}: {error}",
                    "shards": [] if own is None else [s.to_dict() for s in own.shards],
                })
        barrier(f"{_BARRIER}:converted")
    merged = None
    try:
        if index == 0:
            merged = _merge(expand_urls(inputs), output, spec, count, own)
            merged.seconds = time.monotonic() - started
            merged.path = _join(directory, MANIFEST_NAME)
            _write_json(merged.path, merged.to_dict())
            for i in range(1, count):
                _remove(_join(directory, f"{_PART_PREFIX}{i:05d}-of-{count:05d}.json"))
            _log_summary(merged)
    finally:
        barrier(f"{_BARRIER}:manifest")  # so that manifest.json exists when any process returns
    if merged is not None:
        return merged
    own.seconds = time.monotonic() - started
    own.path = _join(directory, MANIFEST_NAME)
    return own


def _merge(urls: list[str], output: str, spec: TokenizerSpec, count: int,
           own: Manifest | None) -> Manifest:
    """One manifest for every shard: counts from the stats files, statuses from the processes'
    parts (`own` is process 0's, in memory)."""
    directory = _output_dir(output)
    statuses: dict[str, ShardReport] = {}
    process_errors: dict[int, str] = {}
    for i in range(1, count):
        part = _read_json(_join(directory, f"{_PART_PREFIX}{i:05d}-of-{count:05d}.json")) or {}
        if part.get("error"):
            process_errors[i] = f"process {i} failed: {part['error']}"
        for shard in part.get("shards", []):
            statuses[shard["output"]] = ShardReport.from_dict(shard)
    for shard in own.shards if own is not None else []:
        statuses[shard.output] = shard
    manifest = _collect(urls, output, statuses, lambda i: process_errors.get(i % count))
    manifest.spec = spec.to_dict()
    manifest.process_count = count
    return manifest


def _collect(urls: list[str], output: str, statuses: dict[str, ShardReport],
             process_error: Callable[[int], str | None] = lambda i: None) -> Manifest:
    """Every shard's report from its stats file on disk; `statuses` (by output path) says
    written or finished, and why a shard failed. A shard with no stats file is not done,
    whatever anyone reported. The spec is the first stats file's."""
    outputs = output_paths(urls, output)

    def report(i: int) -> tuple[ShardReport, dict | None]:
        target, known = outputs[i], statuses.get(outputs[i])
        stats_file = _stats_path(target)
        stats = _read_json(stats_file) if _exists(target) else None
        if stats is not None:
            status = known.status if known is not None and known.status != "failed" else "finished"
            return (_report_from_stats(urls[i], target, stats_file, stats, status),
                    stats.get(METADATA_KEY))
        if known is not None and known.status == "failed":
            return known, None
        why = process_error(i) or "no stats file"
        return ShardReport(url=urls[i], output=target, stats_path=stats_file, status="failed",
                           error=f"{urls[i]} not finished ({why}); a rerun converts it"), None

    found = _parallel(report, range(len(urls)))
    spec = next((s for _, s in found if s), {})
    return Manifest(output=output, shards=[r for r, _ in found], spec=spec)


def write_manifest(inputs: str | Sequence[str], output: str | os.PathLike) -> Manifest:
    """Write `manifest.json` for an output from the stats files on disk, e.g. after processes
    that JAX did not coordinate each converted their share. Shards without a stats file are
    listed as failed (a rerun converts them)."""
    output = _normalize_output(output)
    manifest = _collect(expand_urls(inputs), output, {})
    manifest.path = _join(_output_dir(output), MANIFEST_NAME)
    _write_json(manifest.path, manifest.to_dict())
    _log_summary(manifest, "write_manifest")
    return manifest
