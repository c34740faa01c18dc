"""Tar stream → samples, with every member accounted for and memory bounded by the headers.

`read_tar_samples` yields webdataset-style samples (``__key__``, ``__url__`` and one bytes value
per field, split like webdataset 1.0.2: key = path up to the first dot of the basename, field =
the rest, lowercased), identical to webdataset's for a well-formed tar. Differences, all for
ill-formed input: every member that does not end up in a sample is passed to ``on_skip`` as a
`SkippedMember` with one of `SKIP_REASONS`, never dropped silently:

- "directory" (benign), "not a regular file" (symlinks, hard links, devices, FIFOs),
  "metadata" (webdataset's ``__name__`` entries), "no extension" (or an empty one, ``a.``);
- "unsafe name": absolute paths, ``..`` components, an empty key (basename starting with a dot),
  control characters, names that are not UTF-8, reserved fields (``a.__key__``); never yielded;
- "too large": a header declaring more than ``max_member_bytes``, or a member that would take
  its sample past ``max_sample_bytes``; refused on the declared size and skipped unread;
- "duplicate key": a group whose key already had a group earlier in the tar (not adjacent):
  the later group is refused whole, so no two samples share a key;
- "duplicate field": the same key and field twice in one group: the later member is refused and
  the sample keeps the first value;
- "truncated": the members of the group in progress when the stream turned out damaged.

Damage (truncated or corrupt data, a missing end-of-archive block, a bad header) is a deliberate
partial result: the samples completed before it are yielded, the group in progress is reported
as "truncated" and *not* yielded (it may lack fields), then `TarReadError` is raised naming the
url, what went wrong and the tar byte offset. The caller keeps the good samples and records the
rest of the shard as failed; members after the damage cannot be seen and are not reported.

Memory: one group is held at a time, at most ``max_sample_bytes`` of member data, plus a
transient copy of the member being read (≤ 2 × ``max_member_bytes``), plus the set of keys seen
(for duplicate detection). Refused members are skipped in fixed-size reads. Gzip, bzip2 and xz
are decompressed here a bounded chunk per read, not by tarfile's ``r|*`` (which inflated a
471-byte .tar.bz2 declaring a 400 MB member into one buffer and was still copying it after six
minutes). Time: decompression may expand the input at most `MAX_EXPANSION` times (beyond the first
64 MiB), so skipping costs time proportional to the compressed size; extended headers (PAX, GNU
long names) above `MAX_HEADER_BYTES` are refused. Both are damage (`TarReadError`).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_SAMPLE_BYTES",
    "MAX_EXPANSION",
    "MAX_HEADER_BYTES",
    "SKIP_REASONS",
    "SkippedMember",
    "TarReadError",
    "TarSampleWriter",
    "read_tar_samples",
]

DEFAULT_MAX_MEMBER_BYTES = 256 << 20  # one field (an image file) above this is not a sample
DEFAULT_MAX_SAMPLE_BYTES = 1 << 30  # all fields of one key together
MAX_HEADER_BYTES = 1 << 20  # PAX / GNU long-name header data; real ones are a few hundred bytes
MAX_EXPANSION = 2000  # decompressed / compressed bytes; gzip tops out at ~1032, real shards ~1-20
_CHUNK = 1 << 20
_EXPANSION_FLOOR = 64 << 20  # small inputs are never refused for their ratio

SKIP_REASONS = (
    "directory",
    "not a regular file",
    "metadata",
    "no extension",
    "unsafe name",
    "too large",
    "duplicate key",
    "duplicate field",
    "truncated",
)

_LINK_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_DRIVE = re.compile(r"[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls
_METADATA = re.compile(r"__[^/]*__($|/)")  # webdataset's own entries, e.g. "__index__"


@dataclasses.dataclass(frozen=True)
class SkippedMember:
    """A tar member that is not part of any yielded sample, and why (`SKIP_REASONS`)."""

    url: str
    name: str  # as in the header; may hold control characters (use repr() to log it)
    reason: str
    detail: str  # human-readable specifics, e.g. "symlink to x.jpg", "declares 3000000000 bytes"
    size: int  # declared data size in bytes
    key: str | None = None  # the sample key, when the name had a safe one


class TarReadError(OSError):
    """The tar stream of `url` is truncated, corrupt or not a tar; `offset` is the tar byte."""

    what = "tar"  # how the message names the stream

    def __init__(self, url: str, reason: str, offset: int | None = None):
        self.url = url
        self.reason = reason
        self.offset = offset
        where = "" if offset is None else f" at tar byte {offset}"
        super().__init__(f"cannot read {self.what} {url}: {reason}{where}")

    def __reduce__(self):
        return type(self), (self.url, self.reason, self.offset)


def read_tar_samples(
    stream: BinaryIO,
    url: str,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    on_skip: Callable[[SkippedMember], None] | None = None,
) -> Iterator[dict]:
    """Yield the samples of the tar (plain, .gz, .bz2 or .xz) read from `stream`, in tar order.

    Members that are not yielded go to `on_skip`; damage raises `TarReadError` after the samples
    before it (see the module docstring). `stream` needs only `read(n)` and is not closed.
    """
    if max_member_bytes < 0 or max_sample_bytes < 0:
        raise ValueError(
            f"max_member_bytes and max_sample_bytes must be >= 0, got {max_member_bytes} "
            f"and {max_sample_bytes}"
        )
    return _samples(stream, url, max_member_bytes, max_sample_bytes, on_skip or _ignore)


def _samples(
    stream: BinaryIO,
    url: str,
    max_member_bytes: int,
    max_sample_bytes: int,
    report: Callable[[SkippedMember], None],
) -> Iterator[dict]:
    group: dict | None = None  # the sample being assembled
    pending: list[tarfile.TarInfo] = []  # its members so far, reported if damage strikes
    group_bytes = 0
    refused_key = False  # the current group repeats an earlier key
    seen: set[str] = set()

    def fail(err: TarReadError, current: tarfile.TarInfo | None = None) -> TarReadError:
        key = None if group is None else group["__key__"]
        for info in pending + ([current] if current is not None else []):
            report(SkippedMember(url, info.name, "truncated", str(err), info.size, key))
        return err

    def skip(info: tarfile.TarInfo, reason: str, detail: str, key: str | None = None) -> None:
        report(SkippedMember(url, info.name, reason, detail, info.size, key))

    raw = _tar_bytes(stream, url)

    def broken(e: BaseException, offset: int | None) -> TarReadError:
        if raw.error is not None:  # the root cause, seen before tarfile noticed the short stream
            e, offset = raw.error, raw.error_offset
        return _as_read_error(e, url, offset)

    try:
        tar = _open_tar(raw)
    except _READ_ERRORS as e:
        raise broken(e, 0) from e
    with tar:
        while True:
            try:
                info = tar.next()
            except _READ_ERRORS as e:
                raise fail(broken(e, tar.offset)) from e
            tar.members.clear()  # streaming: keep no history of headers
            if info is None:
                break
            key, field, reason, detail = _classify(info)
            if reason is not None:
                skip(info, reason, detail, key)
                continue
            if group is None or key != group["__key__"]:
                if group is not None and len(group) > 2:
                    yield group
                group, pending, group_bytes = {"__key__": key, "__url__": url}, [], 0
                refused_key = key in seen
                seen.add(key)
            if refused_key:
                skip(info, "duplicate key", f"key {key!r} had a sample earlier in the tar", key)
            elif field in group:
                skip(info, "duplicate field", f"field {field!r} of {key!r} seen before", key)
            elif info.size > max_member_bytes:
                detail = f"declares {info.size} bytes, larger than {max_member_bytes} bytes"
                skip(info, "too large", detail, key)
            elif group_bytes + info.size > max_sample_bytes:
                skip(info, "too large", f"sample would exceed {max_sample_bytes} bytes", key)
            else:
                try:
                    data = _read_member(tar, info)
                except _READ_ERRORS as e:
                    raise fail(broken(e, info.offset_data), info) from e
                group[field] = data
                group_bytes += info.size
                pending.append(info)
    if group is not None and len(group) > 2:
        yield group


def _ignore(member: SkippedMember) -> None:
    pass


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """The member's data, read in chunks so the peak is twice its size, not three or four."""
    out = bytearray(info.size)
    view, done = memoryview(out), 0
    with tar.extractfile(info) as f:
        while done < info.size:
            n = f.readinto(view[done : done + _CHUNK])
            if not n:
                raise tarfile.ReadError(f"{info.name!r} ends after {done} bytes")
            done += n
    return bytes(out)


def _open_tar(data: _TarBytes) -> tarfile.TarFile:
    return tarfile.open(
        fileobj=data,
        mode="r|",
        tarinfo=_CheckedTarInfo,
        encoding="utf-8",
        errors="surrogateescape",
    )


def _classify(info: tarfile.TarInfo) -> tuple[str | None, str, str | None, str]:
    """(key, field, skip reason or None, detail) for one member, from its header alone."""
    if info.isdir():
        return None, "", "directory", "a directory entry"
    if not info.isreg():
        kind = _LINK_KINDS.get(info.type, f"member type {info.type!r}")
        target = f" to {info.linkname!r}" if info.issym() or info.islnk() else ""
        return None, "", "not a regular file", kind + target
    problem = _unsafe(info.name)
    if problem is not None:
        return None, "", "unsafe name", problem
    if _METADATA.match(info.name):
        return None, "", "metadata", "a webdataset metadata entry"
    key, field = _split(info.name)
    if not field:
        return None, "", "no extension", "nothing after a dot in the basename"
    if field.startswith("__") and field.endswith("__"):
        return key, field, "unsafe name", f"reserved field name {field!r}"
    return key, field, None, ""


def _unsafe(name: str) -> str | None:
    """Why `name` is not a safe relative member name, or None when it is."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if _CONTROL.search(name):
        return "control character in name"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    base = name.rpartition("/")[2]
    if "." in base and base.startswith("."):
        return "empty key (basename starts with a dot)"
    return None


def _split(name: str) -> tuple[str, str]:
    """(key, field): the key ends at the first dot of the basename; the field is lowercased."""
    base = name.rpartition("/")[2]
    stem, dot, field = base.partition(".")
    if not dot:
        return name, ""
    return name[: len(name) - len(base)] + stem, field.lower()


def _as_read_error(e: BaseException, url: str, offset: int | None) -> TarReadError:
    if isinstance(e, TarReadError):
        return e
    if isinstance(e, _Damage):
        return TarReadError(url, str(e), e.offset)
    message = str(e) or type(e).__name__
    if isinstance(e, EOFError):
        message = f"compressed stream ends early ({message})"
    return TarReadError(url, f"{type(e).__name__}: {message}", offset)


class _Damage(tarfile.TarError):
    """Raised inside tarfile's header parsing; becomes a TarReadError naming the url."""

    def __init__(self, reason: str, offset: int):
        super().__init__(reason)
        self.offset = offset


class _CheckedTarInfo(tarfile.TarInfo):
    """Headers that turn tarfile's silent stops into errors and refuse oversized extensions."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tarfile_.fileobj.tell()
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        if len(buf) == 0:
            reason = "empty stream" if offset == 0 else "stream ends without end-of-archive block"
            raise _Damage(reason, offset)
        if len(buf) < tarfile.BLOCKSIZE:
            raise _Damage(f"truncated header ({len(buf)} of 512 bytes)", offset)
        if buf.count(0) == tarfile.BLOCKSIZE:
            raise tarfile.EOFHeaderError("end of archive")  # the clean end
        try:
            obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        except tarfile.HeaderError as e:
            hint = " (not a tar archive?)" if offset == 0 else ""
            raise _Damage(f"invalid header: {e}{hint}", offset) from None
        obj.offset = offset
        if obj.size < 0:
            raise _Damage(f"negative size {obj.size} in header", offset)
        if obj.type in _EXTENSION_TYPES and obj.size > MAX_HEADER_BYTES:
            raise _Damage(f"extended header of {obj.size} bytes (limit {MAX_HEADER_BYTES})", offset)
        return obj._proc_member(tarfile_)  # tarfile's documented extension point


_EXTENSION_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _Source:
    """The caller's stream with its sniffed first bytes put back; counts the bytes read."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream, self.consumed = head, stream, 0

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            out = self._stream.read(n)
        elif n < 0:
            out, self._head = self._head + self._stream.read(), b""
        else:
            out, self._head = self._head[:n], self._head[n:]
        self.consumed += len(out)
        return out


class _TarBytes:
    """Uncompressed tar bytes for tarfile. A read error ends the stream and is kept as the cause:
    tarfile reads ahead, and raising mid-read would discard the good bytes it had gathered."""

    def __init__(self, inner: BinaryIO | _Source, source: _Source, compressed: bool):
        self._inner, self._source, self._compressed = inner, source, compressed
        self.produced = 0
        self.error: BaseException | None = None
        self.error_offset = 0

    def read(self, n: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:  # read1: one decompression step, so an error cannot swallow bytes already made
            out = self._inner.read1(n) if self._compressed else self._inner.read(n)
        except _READ_ERRORS as e:
            self.error, self.error_offset = e, self.produced
            return b""
        self.produced += len(out)
        limit = max(_EXPANSION_FLOOR, MAX_EXPANSION * self._source.consumed)
        if self._compressed and self.produced > limit:
            reason = f"decompresses to over {MAX_EXPANSION} times its size (compression bomb?)"
            self.error, self.error_offset = _Damage(reason, self.produced), self.produced
            return b""
        return out


def _tar_bytes(stream: BinaryIO, url: str) -> _TarBytes:
    """`stream` as uncompressed tar bytes; each read decompresses a bounded amount."""
    head = b""
    try:
        while len(head) < 10 and (more := stream.read(10 - len(head))):
            head += more
    except _READ_ERRORS as e:
        raise _as_read_error(e, url, 0) from e
    source = _Source(head, stream)
    if head.startswith(b"\x1f\x8b\x08"):
        return _TarBytes(gzip.GzipFile(fileobj=source, mode="rb"), source, True)
    if re.match(rb"BZh[1-9](1AY&SY|\x17rE8P)", head):
        return _TarBytes(bz2.BZ2File(source), source, True)
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):
        return _TarBytes(lzma.LZMAFile(source), source, True)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise TarReadError(url, "zstd-compressed tar is not supported", 0)
    return _TarBytes(source, source, False)


class TarSampleWriter:
    """Samples (`__key__` and one bytes value per field) → tar members `<key>.<field>`, in order.

    Reproducible: every header is a plain ustar header with the same integer `mtime`, owner
    0:0 and mode 0644 (a PAX header only for a name ustar cannot hold: over 100 bytes, or not
    ASCII), so the same samples always give the same bytes. `fileobj` needs only `write`."""

    def __init__(self, fileobj: Any, *, mtime: int = 0) -> None:
        self.mtime = int(mtime)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for field, data in sample.items():
            if field.startswith("__") and field.endswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self._tar.addfile(info, io.BytesIO(bytes(data)))

    def close(self) -> None:
        """The end-of-archive blocks; `fileobj` itself is left open."""
        self._tar.close()
