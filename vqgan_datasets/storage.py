"""Where shards live: URLs, opening them (local, pipe:, webdataset's schemes, fsspec), reading a
tar's samples (every member a sample or counted), and writing files atomically on local disks
and object stores.

A leaf module: it imports only `tarsamples` (itself a leaf) from this package, so any layer may
use it (the model checkpoints' atomic write included). Output paths are local paths (file://
stripped) or fsspec URLs (s3://, memory://...); every helper here takes either. An OSError while
writing keeps its type and errno and names the file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from .tarsamples import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_SAMPLE_BYTES,
    SkippedMember,
    TarReadError,
    read_tar_samples,
)

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_SAMPLE_BYTES",
    "PipeStream",
    "ShardReadError",
    "SkippedMember",
    "atomic_write",
    "create_exclusive",
    "exists",
    "expand_urls",
    "file_size",
    "isdir",
    "join",
    "list_names",
    "makedirs",
    "modified_after",
    "named_errors",
    "open_url",
    "owner_tag",
    "parallel",
    "read_json",
    "read_shard",
    "register_fsspec",
    "remove",
    "sha256",
    "split",
    "temp_prefix",
    "write_json",
]

READ_THREADS = 16  # files read at once: listing a million-shard output is I/O bound

logger = logging.getLogger(__name__)

HOST = socket.gethostname()  # who writes, in temporary names and claims


class ShardReadError(TarReadError):
    """A shard could not be opened or read as a tar stream (missing, truncated, corrupt, not a
    tar); `offset` is the tar byte of the damage when known."""

    what = "shard"


# ------------------------------------------------------------------------------ reading


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


def scheme(url: str) -> str:
    """The URL's scheme, lower case ("" for a local path)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return match.group(1).lower() if match else ""


def _gopen_handles(url: str) -> bool:
    from webdataset.gopen import gopen_schemes

    if url.startswith("pipe:") or url == "-":
        return True
    name = scheme(url)
    return name in ("", "file") or name in gopen_schemes


def open_url(url: str) -> BinaryIO:
    """A readable binary stream: local paths, file://, pipe:, webdataset's schemes, else fsspec.

    A `pipe:` command's output ends with an OSError naming its exit status when it exits
    non-zero (an empty or cut stream would otherwise look like a damaged tar)."""
    try:
        if url.startswith("pipe:"):
            return PipeStream(url[len("pipe:"):])
        if _gopen_handles(url):
            from webdataset.gopen import gopen

            return gopen(url, "rb")
        import fsspec

        return fsspec.open(url, "rb").open()
    except Exception as e:
        raise ShardReadError(url, f"{type(e).__name__}: {e}") from e


class PipeStream:
    """The standard output of a shell command, read as a file; see `open_url`."""

    def __init__(self, command: str) -> None:
        import subprocess

        self.command = command
        self._process = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, bufsize=1 << 16)

    def read(self, n: int = -1) -> bytes:
        data = self._process.stdout.read(n)
        if not data and n != 0:
            self.check()
        return data

    def check(self) -> None:
        """Read the output to its end and wait for the command; OSError if it failed."""
        self._process.stdout.read()
        self._process.wait()
        self.raise_failure()

    def raise_failure(self, timeout: float = 0) -> None:
        """OSError naming the exit status if the command failed (waiting up to `timeout` s
        for it to end; one still running has not failed yet)."""
        import subprocess

        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout)
        status = self._process.returncode
        if status:
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise OSError(f"the command {self.command!r} {how}")

    def close(self) -> None:
        """Stop the command if it still runs (we stopped reading), quietly."""
        if self._process.poll() is None:
            self._process.kill()
        with contextlib.suppress(Exception):
            self._process.stdout.close()
        self._process.wait()


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    import fsspec

    return fsspec.open(url, mode).open()


def register_fsspec(*schemes: str) -> None:
    """Let webdataset's own readers (WebDataset, tarfile_to_samples) open these URL schemes
    through fsspec, e.g. register_fsspec("s3", "memory"). Changes webdataset's global table, so
    it is the caller's explicit choice; tokenize_shards does not need it."""
    from webdataset.gopen import gopen_schemes

    for name in schemes:
        gopen_schemes[name.rstrip(":/")] = _gopen_fsspec


def read_shard(
    url: str,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    on_skip: Callable[[SkippedMember], Any] | None = None,
) -> Iterator[dict]:
    """The samples of one tar shard (raw bytes per field, `__key__`, `__url__`), in tar order.

    Read by `tarsamples.read_tar_samples`: members above `max_member_bytes` are refused by their
    header, unread; every member that is not a sample field goes to `on_skip` (without one, one
    warning counts them by reason). A failure to open or read the stream raises ShardReadError
    naming the url (after the samples before the damage).
    """
    stream = open_url(url)
    counts: collections.Counter = collections.Counter()

    def skipped(member: SkippedMember) -> None:
        counts[member.reason] += 1
        if on_skip is not None:
            on_skip(member)

    try:
        yield from read_tar_samples(stream, url, max_member_bytes=max_member_bytes,
                                    max_sample_bytes=max_sample_bytes, on_skip=skipped)
        if isinstance(stream, PipeStream):  # a whole tar, then a failure: the shard failed
            stream.check()
    except TarReadError as e:
        raise ShardReadError(url, _pipe_reason(stream, e.reason), e.offset) from e
    except OSError as e:
        raise ShardReadError(url, str(e)) from e
    finally:
        with contextlib.suppress(Exception):
            stream.close()
        if counts and on_skip is None:
            logger.warning("%s: %d tar members are not samples (%s)", url, sum(counts.values()),
                           ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())))


def _pipe_reason(stream: Any, reason: str) -> str:
    """A pipe's damaged stream is first of all its command's failure, when it failed."""
    if not isinstance(stream, PipeStream) or "the command" in reason:
        return reason
    try:
        stream.raise_failure(timeout=2)  # the end of its output comes just before its exit
    except OSError as e:
        return f"{e} ({reason})"
    return reason


# ------------------------------------------------------------------------------ files


def is_local(path: str) -> bool:
    return not scheme(path)


def _fs(path: str):
    import fsspec.core

    return fsspec.core.url_to_fs(path)


def split(path: str) -> tuple[str, str]:
    """(folder, name) of a local path or URL."""
    return os.path.split(path) if is_local(path) else posixpath.split(path)


def join(directory: str, name: str) -> str:
    return os.path.join(directory, name) if is_local(directory) else f"{directory.rstrip('/')}/{name}"


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.exists(inner)


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(path)
    fs, inner = _fs(path)
    return fs.isdir(inner)


def remove(path: str) -> None:
    """Remove a file; a missing one is fine."""
    if is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner)


def makedirs(directory: str) -> None:
    if is_local(directory):
        os.makedirs(directory or ".", exist_ok=True)
    else:
        fs, inner = _fs(directory)
        fs.makedirs(inner, exist_ok=True)


def file_size(path: str) -> int | None:
    """The size in bytes of the file at `path`, or None when there is none."""
    try:
        if is_local(path):
            return os.path.getsize(path)
        fs, inner = _fs(path)
        return int(fs.size(inner))
    except (OSError, ValueError, TypeError):
        return None


def modified_after(path: str, other: str) -> bool:
    """Whether the local file `path` was modified after `other` (False when unknown)."""
    if not (is_local(path) and is_local(other)):
        return False
    try:
        return os.stat(path).st_mtime_ns > os.stat(other).st_mtime_ns
    except OSError:
        return False


def sha256(path: str) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB pieces."""
    import hashlib

    digest = hashlib.sha256()
    with named_errors(path, "reading"):
        if is_local(path):
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        else:
            fs, inner = _fs(path)
            f = fs.open(inner, "rb")
        with f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def list_names(directory: str) -> set[str]:
    """File names in `directory`, listed once per run: one listing instead of a stat (or, on
    object stores, a request) per shard."""
    if is_local(directory):
        return set(os.listdir(directory or "."))
    fs, inner = _fs(directory)
    return {posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)}


def temp_prefix(name: str) -> str:
    """How atomic_write's temporary files for `name` begin (a rerun sweeps them)."""
    return f".{name}.tmp-"


def owner_tag() -> str:
    """This process in temporary file names: host and pid (a file's writer is never a guess)."""
    return f"{re.sub(r'[^A-Za-z0-9_.]', '_', HOST)[:32]}-{os.getpid()}"


@contextlib.contextmanager
def atomic_write(final: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; on success the bytes are on disk (fsync) and renamed to `final`.

    On failure the temporary file is removed. A reader never sees a partial `final`: a crash
    leaves at most a hidden `.<name>.tmp-<host>-<pid>-*` file, which the next writer of `final`
    removes. Temporary names are unique per attempt, so two writers of one file (a task Ray
    retried while the first attempt still ran) never write into the same file; the last rename
    wins, whole. An OSError of the file itself (ENOSPC, EROFS...) keeps its type and errno and
    names `final`. New files get the usual permissions (0666 less the umask).
    """
    final = os.fspath(final)
    directory, name = split(final)
    temp = join(directory, f"{temp_prefix(name)}{owner_tag()}-{uuid.uuid4().hex[:8]}")
    local = is_local(final)
    with named_errors(final, "creating a temporary file for"):
        if local:
            f = open(temp, "wb")  # noqa: SIM115 - closed below, before the rename
        else:
            fs, inner = _fs(temp)
            f = fs.open(inner, "wb")
    try:
        try:
            yield _NamedFile(f, final)
        except BaseException:
            with contextlib.suppress(Exception):
                getattr(f, "discard", f.close)()  # fsspec files: do not upload a partial file
            raise
        with named_errors(final, "writing"):
            if local:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(temp, final)
                _fsync_dir(directory)
            else:
                f.close()
                fs.mv(inner, _fs(final)[1])
    except BaseException:
        with contextlib.suppress(Exception):
            remove(temp)
        raise


class _NamedFile:
    """The file atomic_write yields: its OSErrors name the file being written."""

    def __init__(self, f: BinaryIO, final: str):
        self._f, self._final = f, final

    def write(self, data: Any) -> int:
        with named_errors(self._final, "writing"):
            return self._f.write(data)

    def flush(self) -> None:
        with named_errors(self._final, "writing"):
            self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def named_errors(path: str, doing: str) -> Iterator[None]:
    """OSErrors of the block re-raised with the same type and errno, naming `path` (ENOSPC
    alone does not say which file filled the disk)."""
    try:
        yield
    except OSError as e:
        named = _named(e, path, doing)
        if named is e:
            raise
        raise named from e


def _named(e: OSError, path: str, doing: str) -> OSError:
    if path in str(e) or type(e).__module__ != "builtins":  # named already, or not ours to remake
        return e
    text = f"{e.strerror or e} ({doing} {path})"
    return type(e)(e.errno, text, e.filename) if e.errno is not None else type(e)(text)


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is; not possible on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create `path` holding `data`, whole, unless it exists (then False). Exclusive on local
    disks (a hard link); on object stores where fsspec can (mode "xb"), else best effort."""
    with named_errors(path, "creating"):
        if is_local(path):
            temp = join(split(path)[0], f"{temp_prefix(split(path)[1])}{owner_tag()}-"
                                        f"{uuid.uuid4().hex[:8]}")
            try:
                with open(temp, "wb") as f:
                    f.write(data)
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temp)
            return True
        fs, inner = _fs(path)
        try:
            with fs.open(inner, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive mode on this store
            if fs.exists(inner):
                return False
            fs.pipe(inner, data)
        return True


def write_json(final: str, data: dict[str, Any]) -> None:
    """`data` as indented, sorted JSON, written atomically (errors name `final`)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    with atomic_write(final) as f:
        f.write(text.encode("utf-8"))


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when it is missing or unreadable."""
    try:
        if is_local(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        fs, inner = _fs(path)
        with fs.open(inner, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None


def parallel(function: Callable, items: Sequence) -> list:
    """function(item) for every item, in order, on a few threads (file reads wait on I/O)."""
    if len(items) < 4:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(function, items))

