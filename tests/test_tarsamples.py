"""read_tar_samples: webdataset's samples for good tars; every member accounted for otherwise."""

from __future__ import annotations

import collections
import gzip
import io
import json
import lzma
import pickle
import random
import subprocess
import sys
import tarfile
import zlib

import pytest

from vqgan_datasets.tarsamples import (
    SKIP_REASONS,
    SkippedMember,
    TarReadError,
    TarSampleWriter,
    read_tar_samples,
)


def _info(
    name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def _tar(members: list, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, data) regular files and ready TarInfo entries (links, dirs, devices)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                tar.addfile(_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _read(raw: bytes, **kw) -> tuple[list[dict], list[SkippedMember]]:
    skipped: list[SkippedMember] = []
    samples = list(read_tar_samples(io.BytesIO(raw), "u.tar", on_skip=skipped.append, **kw))
    return samples, skipped


def _read_until_error(raw: bytes, **kw) -> tuple[list[dict], list[SkippedMember], TarReadError]:
    samples: list[dict] = []
    skipped: list[SkippedMember] = []
    with pytest.raises(TarReadError) as info:
        for sample in read_tar_samples(io.BytesIO(raw), "u.tar", on_skip=skipped.append, **kw):
            samples.append(sample)
    return samples, skipped, info.value


def _fields(samples: list[dict]) -> int:
    return sum(len(s) - 2 for s in samples)


WELL_FORMED = [
    _info("d", kind=tarfile.DIRTYPE),
    ("d/x.jpg", b"jpeg-x"),
    ("d/x.cls", b"3"),
    ("d/x.Seg.PNG", b"mask"),  # multi-dot field, lowercased like webdataset
    ("y.jpg", b""),
    ("y.json", b"{}"),
    ("dir.v2/z.jpg", b"z"),  # dots in folders do not split the key
    ("Case.JPG", b"c"),
    ("L" * 150 + ".jpg", b"long"),  # a PAX header carries the name
]


@pytest.mark.parametrize("compress", [None, "gz", "bz2", "xz"])
def test_well_formed_tar_gives_webdatasets_samples(tmp_path, compress):
    import webdataset

    raw = _tar(WELL_FORMED)
    path = tmp_path / "good.tar"
    path.write_bytes(raw)
    if compress:
        path = tmp_path / f"good.tar.{compress}"
        with tarfile.open(path, f"w:{compress}") as out, tarfile.open(tmp_path / "good.tar") as src:
            for info in src:
                out.addfile(info, src.extractfile(info) if info.isreg() else None)
    expected = list(webdataset.tarfile_to_samples()(iter([{"url": str(path)}])))
    skipped: list[SkippedMember] = []
    with open(path, "rb") as f:
        samples = list(read_tar_samples(f, str(path), on_skip=skipped.append))
    assert samples == expected
    assert [s["__key__"] for s in samples] == ["d/x", "y", "dir.v2/z", "Case", "L" * 150]
    assert samples[0]["seg.png"] == b"mask"
    assert [(m.name, m.reason) for m in skipped] == [("d", "directory")]


def test_every_member_is_a_sample_field_or_counted_with_a_reason():
    members = [
        ("a.jpg", b"a"),
        ("a.txt", b"a-text"),
        _info("a.png", kind=tarfile.SYMTYPE, link="a.jpg"),
        _info("b.jpg", kind=tarfile.LNKTYPE, link="a.jpg"),
        _info("dev.jpg", kind=tarfile.CHRTYPE),
        ("README", b"no extension"),
        ("c.jpg", b"c"),
        ("c.txt", b"c-text"),
        ("c.TXT", b"again"),  # adjacent duplicate field: the first value stays
        ("../evil.jpg", b"x"),
        ("/abs.jpg", b"x"),
        ("a.cls", b"1"),  # key "a" again after "c": a second sample "a" is refused
        ("__index__", b"{}"),
        ("e.jpg", b"e"),
        ("e.json", b"{}"),
    ]
    samples, skipped = _read(_tar(members))
    assert [s["__key__"] for s in samples] == ["a", "c", "e"]
    assert samples[1]["txt"] == b"c-text"
    assert _fields(samples) + len(skipped) == len(members) == 15
    assert collections.Counter(m.reason for m in skipped) == {
        "not a regular file": 3,
        "no extension": 1,
        "duplicate field": 1,
        "unsafe name": 2,
        "duplicate key": 1,
        "metadata": 1,
    }
    assert {m.reason for m in skipped} <= set(SKIP_REASONS)
    link = next(m for m in skipped if m.name == "a.png")
    assert "symlink" in link.detail and "a.jpg" in link.detail and link.url == "u.tar"


def test_non_adjacent_duplicate_key_refuses_the_whole_later_group():
    members = [("k.jpg", b"1"), ("m.jpg", b"2"), ("k.jpg", b"3"), ("k.txt", b"4"), ("n.jpg", b"5")]
    samples, skipped = _read(_tar(members))
    assert [(s["__key__"], s["jpg"]) for s in samples] == [("k", b"1"), ("m", b"2"), ("n", b"5")]
    assert [(m.name, m.reason, m.key) for m in skipped] == [
        ("k.jpg", "duplicate key", "k"),
        ("k.txt", "duplicate key", "k"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        "../evil.jpg",
        "a/../../evil.jpg",
        "a\\..\\evil.jpg",
        "/abs.jpg",
        "C:/abs.jpg",
        ".jpg",
        "d/.hidden.jpg",
        "a\x01b.jpg",
        "a\nb.jpg",
        "a\x85b.jpg",
        "a.__key__",
        "a.__url__",
        "bad\udcff.jpg",  # a byte that is not UTF-8
    ],
)
def test_unsafe_names_are_refused_and_counted(name):
    fmt = tarfile.GNU_FORMAT if "\udcff" in name else tarfile.PAX_FORMAT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tar:
        tar.addfile(_info(name, 1), io.BytesIO(b"x"))
        tar.addfile(_info("ok.jpg", 1), io.BytesIO(b"y"))
    samples, skipped = _read(buf.getvalue())
    assert [s["__key__"] for s in samples] == ["ok"]
    assert [(m.name, m.reason) for m in skipped] == [(name, "unsafe name")]


def test_a_member_declared_too_large_is_refused_unread_and_the_sample_kept():
    members = [("a.jpg", b"x" * 5000), ("a.txt", b"t"), ("b.jpg", b"b")]
    samples, skipped = _read(_tar(members), max_member_bytes=4096)
    assert samples == [
        {"__key__": "a", "__url__": "u.tar", "txt": b"t"},
        {"__key__": "b", "__url__": "u.tar", "jpg": b"b"},
    ]
    assert [(m.name, m.reason, m.size) for m in skipped] == [("a.jpg", "too large", 5000)]
    assert "larger than 4096 bytes" in skipped[0].detail


def test_a_sample_is_capped_in_total():
    members = [("a.x", b"1" * 600), ("a.y", b"2" * 600), ("a.z", b"3" * 300)]
    samples, skipped = _read(_tar(members), max_sample_bytes=1000)
    assert sorted(samples[0]) == ["__key__", "__url__", "x", "z"]
    assert [(m.name, m.reason) for m in skipped] == [("a.y", "too large")]


def _good_samples(n: int = 6, size: int = 700) -> tuple[bytes, list[dict]]:
    rng = random.Random(0)
    members = []
    for i in range(n):
        members += [(f"s{i}.jpg", rng.randbytes(size)), (f"s{i}.txt", b"t%d" % i)]
    raw = _tar(members)
    return raw, _read(raw)[0]


def test_truncation_anywhere_keeps_the_samples_before_it_and_never_a_partial_one():
    raw, full = _good_samples()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:  # where the end-of-archive block starts
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers())
    for cut in list(range(0, end + 512, 97)) + [end]:
        samples, skipped, err = _read_until_error(raw[:cut])
        assert err.url == "u.tar" and "u.tar" in str(err)
        assert samples == full[: len(samples)]
        # the group in progress is reported, not yielded, and names where it broke
        assert all(m.reason == "truncated" and m.key for m in skipped)
        assert len({m.key for m in skipped}) <= 1
        if skipped:
            assert skipped[0].key == f"s{len(samples)}"
    assert _read(raw[: end + 512])[0] == full  # the end-of-archive block is all that is needed


def test_a_tar_cut_at_a_member_boundary_is_an_error_not_a_short_shard():
    raw = _tar([("a.jpg", b"a"), ("b.jpg", b"b")])
    samples, skipped, err = _read_until_error(raw[:2048])  # headers + data of both, no end block
    assert [s["__key__"] for s in samples] == ["a"]
    assert [(m.name, m.reason) for m in skipped] == [("b.jpg", "truncated")]
    assert "end-of-archive" in err.reason and err.offset == 2048


def test_truncated_tar_gz_keeps_every_sample_completed_before_the_damage():
    raw, full = _good_samples(n=20, size=2000)
    packed = gzip.compress(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        headers = [m.offset for m in tar.getmembers()]
    for cut in range(len(packed) // 10, len(packed) - 100, len(packed) // 10):
        readable = len(zlib.decompressobj(wbits=31).decompress(packed[:cut]))
        # a sample is complete once the next sample's first header has been read whole
        complete = sum(1 for h in headers[2::2] if h + 512 <= readable)
        samples, _, err = _read_until_error(packed[:cut])
        assert samples == full[:complete] and complete > 0
        assert "compressed stream ends early" in err.reason


def test_a_corrupt_header_in_the_middle_is_an_error_not_a_silent_end():
    raw = bytearray(_tar([("a.jpg", b"a"), ("b.jpg", b"b"), ("c.jpg", b"c")]))
    raw[2048:2560] = b"\xff" * 512  # c.jpg's header; tarfile alone would just stop here
    samples, skipped, err = _read_until_error(bytes(raw))
    assert [s["__key__"] for s in samples] == ["a"]
    assert [(m.name, m.reason) for m in skipped] == [("b.jpg", "truncated")]  # b may lack fields
    assert "invalid header" in err.reason and err.offset == 2048


def test_negative_size_and_oversized_extended_headers_are_refused():
    header = bytearray(_info("a.jpg", 1).tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"\xff" * 12  # base-256 size -1
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    err = _read_until_error(bytes(header) + b"\0" * 2048)[2]
    assert "negative size" in err.reason
    big = _info("a.jpg", 1)
    big.pax_headers = {"comment": "x" * (2 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(big, io.BytesIO(b"x"))
    assert "extended header" in _read_until_error(buf.getvalue())[2].reason


@pytest.mark.parametrize("raw", [b"", b"not a tar at all" * 64, b"\x28\xb5\x2f\xfd" + b"\0" * 64])
def test_not_a_tar_raises_naming_the_url(raw):
    err = _read_until_error(raw)[2]
    assert err.url == "u.tar" and err.offset == 0


def test_a_compression_bomb_is_refused_in_bounded_time():
    chunk = lzma.compress(b"\0" * (8 << 20))  # ~1.4 KB for 8 MiB
    head = _info("a.jpg", 80 << 20).tobuf(tarfile.USTAR_FORMAT)
    err = _read_until_error(lzma.compress(head) + chunk * 10, max_member_bytes=1 << 20)[2]
    assert "compression bomb" in err.reason


class _Failing(io.BytesIO):
    """A stream that breaks (like a dropped connection) once `after` bytes were read."""

    def __init__(self, data: bytes, after: int):
        super().__init__(data)
        self.after = after

    def read(self, n: int = -1) -> bytes:
        if self.tell() >= self.after:
            raise ConnectionResetError("peer went away")
        return super().read(min(n, 512))


def test_a_failing_stream_becomes_a_tar_read_error():
    raw = _tar([("a.jpg", b"a"), ("b.jpg", b"b")])
    samples, skipped = [], []
    with pytest.raises(TarReadError, match="peer went away") as info:
        for sample in read_tar_samples(_Failing(raw, 1536), "u.tar", on_skip=skipped.append):
            samples.append(sample)
    assert [s["__key__"] for s in samples] == ["a"] and info.value.url == "u.tar"
    assert [(m.name, m.reason) for m in skipped] == [("b.jpg", "truncated")]
    with pytest.raises(TarReadError, match="peer went away"):
        list(read_tar_samples(_Failing(raw, 0), "u.tar"))  # even while sniffing the format


def test_bad_limits_are_refused_at_the_call():
    with pytest.raises(ValueError, match="max_member_bytes"):
        read_tar_samples(io.BytesIO(b""), "u.tar", max_member_bytes=-1)


def test_errors_and_skips_pickle():
    err = TarReadError("s3://b/x.tar", "truncated header", 1024)
    back = pickle.loads(pickle.dumps(err))
    assert (back.url, back.reason, back.offset, str(back)) == (err.url, err.reason, 1024, str(err))
    assert isinstance(back, OSError)
    member = SkippedMember("u", "a.jpg", "too large", "declares 9 bytes", 9, "a")
    assert pickle.loads(pickle.dumps(member)) == member


_RSS_SCRIPT = """
import json, resource, sys
from vqgan_datasets.tarsamples import read_tar_samples
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
skipped = []
with open(sys.argv[1], "rb") as f:
    keys = [s["__key__"] for s in read_tar_samples(f, "big", max_member_bytes=1 << 20,
                                                    on_skip=skipped.append)]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"keys": keys, "skipped": [[m.name, m.reason, m.size] for m in skipped],
                  "grown_kib": grown}))
"""


def test_a_huge_declared_member_in_a_tar_gz_is_skipped_in_bounded_memory(tmp_path):
    size = 300 << 20  # 300 MiB of zeros as ~1.3 MB of gzip (members of 8 MiB each)
    path = tmp_path / "bomb.tar.gz"
    zeros = gzip.compress(b"\0" * (8 << 20), compresslevel=1)
    tail = _tar([("small.txt", b"hi")])
    with open(path, "wb") as f:
        f.write(gzip.compress(_info("big.jpg", size).tobuf(tarfile.USTAR_FORMAT)))
        for _ in range(size // (8 << 20)):
            f.write(zeros)
        f.write(gzip.compress(b"\0" * (size % (8 << 20)) + tail))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["keys"] == ["small"]
    assert result["skipped"] == [["big.jpg", "too large", size]]
    assert result["grown_kib"] < 100 * 1024


# ------------------------------------------------------------------------------ writing


def _written(samples: list[dict], **kwargs) -> bytes:
    buffer = io.BytesIO()
    writer = TarSampleWriter(buffer, **kwargs)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return buffer.getvalue()


def test_written_shards_are_plain_ustar_and_reproducible():
    """One 512-byte ustar header per member (no PAX header for a short ASCII name), the same
    integer mtime everywhere: the same samples give the same bytes, and read back the same."""
    samples = [{"__key__": f"k{i:03d}", "vqgan.npy": bytes(range(200)) * 2, "txt": b"hi",
                "__url__": "ignored"} for i in range(5)]
    first, second = _written(samples), _written(samples)
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members][:2] == ["k000.vqgan.npy", "k000.txt"]
        assert {(m.type, m.mtime, m.mode, m.uid, m.gid, m.pax_headers.get("mtime"))
                for m in members} == {(tarfile.REGTYPE, 0, 0o644, 0, 0, None)}
    # Header + 400 bytes of data in one block: 1024 bytes per token member, 1024 per txt.
    assert len(first) == max(10240, -(-(5 * 2048 + 1024) // 10240) * 10240)
    assert first[512 * 0 + 156:512 * 0 + 157] == b"0"  # a regular file, not a PAX "x" header
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in
            read_tar_samples(io.BytesIO(first), "mem")] == [
        {k: v for k, v in s.items() if k != "__url__"} for s in samples]
    assert _written(samples, mtime=1_700_000_000) != first  # mtime is the only free choice


def test_names_ustar_cannot_hold_still_round_trip():
    long_key = "d/" + "k" * 150
    samples = [{"__key__": long_key, "npy": b"x"}, {"__key__": "ünï", "npy": b"y"}]
    data = _written(samples)
    assert data == _written(samples)
    assert [s["__key__"] for s in read_tar_samples(io.BytesIO(data), "mem")] == [long_key, "ünï"]
