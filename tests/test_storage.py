"""storage.py: URLs, reading tars, and the one atomic write (local and fsspec)."""

from __future__ import annotations

import errno
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile

import fsspec
import pytest
from conftest import FullDisk
from test_wds import make_samples, write_tar

from vqgan_datasets import storage


def test_expand_urls():
    assert storage.expand_urls("a/{0..2}.tar") == ["a/0.tar", "a/1.tar", "a/2.tar"]
    assert storage.expand_urls("x.tar::y-{a,b}.tar") == ["x.tar", "y-a.tar", "y-b.tar"]
    assert storage.expand_urls(["p.tar"]) == ["p.tar"]
    with pytest.raises(ValueError, match="no input shards"):
        storage.expand_urls("")


def test_read_shard_and_its_errors(tmp_path):
    samples = make_samples()[:2]
    url = write_tar(tmp_path / "s.tar", samples)
    got = list(storage.read_shard(url))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert got[0]["txt"] == samples[0]["txt"] and got[0]["__url__"] == url
    with pytest.raises(storage.ShardReadError, match="missing.tar"):
        list(storage.read_shard(str(tmp_path / "missing.tar")))


def test_atomic_write_leaves_the_old_file_or_the_new_one_whole(tmp_path):
    target = str(tmp_path / "f.bin")
    with storage.atomic_write(target) as f:
        f.write(b"one")
    with pytest.raises(RuntimeError), storage.atomic_write(target) as f:
        f.write(b"half of two")
        raise RuntimeError("crash")
    assert pathlib.Path(target).read_bytes() == b"one"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # the temporary file went too
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # an ordinary file's mode
    storage.write_json(str(tmp_path / "d.json"), {"b": 1, "a": [1, 2]})
    assert storage.read_json(str(tmp_path / "d.json")) == {"a": [1, 2], "b": 1}
    assert storage.read_json(str(tmp_path / "none.json")) is None
    assert storage.list_names(str(tmp_path)) == {"f.bin", "d.json"}


def test_the_same_helpers_on_an_fsspec_store():
    memory = fsspec.filesystem("memory")
    folder = "memory://storage-test/out"
    storage.makedirs(folder)
    storage.write_json(storage.join(folder, "x.json"), {"k": 1})
    assert storage.exists(storage.join(folder, "x.json"))
    assert storage.list_names(folder) == {"x.json"}
    assert storage.split(storage.join(folder, "x.json")) == (folder, "x.json")
    storage.remove(storage.join(folder, "x.json"))
    assert storage.list_names(folder) == set()
    memory.rm("/storage-test", recursive=True)


# ------------------------------------------------------------------------------ hostile tars


def _tar_of(members: list) -> bytes:
    """A tar of (name, data) files and ready TarInfo entries (links, devices)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _link(name: str, kind: bytes, target: str = "a.jpg") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


HOSTILE = [
    ("a.jpg", b"A"), ("a.txt", b"a"),
    _link("l.jpg", tarfile.SYMTYPE), _link("h.jpg", tarfile.LNKTYPE),
    _link("dev.jpg", tarfile.CHRTYPE, ""),
    ("README", b"no extension"),
    ("../up.jpg", b"x"), ("/abs.jpg", b"x"),
    ("b.jpg", b"B"), ("b.jpg", b"again"),  # adjacent: a duplicate field
    ("big.jpg", b"x" * 5000),
    ("a.png", b"later"),  # non-adjacent: a duplicate key
    ("c.jpg", b"C"),
]


def test_read_shard_counts_every_member_it_does_not_yield(tmp_path, caplog):
    """Issue 15.7: links and extension-less members vanished uncounted, a non-adjacent key came
    out twice, `../` and absolute names were passed on. Now: 13 members = 4 fields + 9 skips."""
    path = tmp_path / "hostile.tar"
    path.write_bytes(_tar_of(HOSTILE))
    skipped = []
    got = list(storage.read_shard(str(path), max_member_bytes=4096, on_skip=skipped.append))
    assert [s["__key__"] for s in got] == ["a", "b", "c"]  # big.jpg alone was refused
    assert got[0]["txt"] == b"a" and got[1]["jpg"] == b"B"
    assert len(got) == len({s["__key__"] for s in got})
    fields = sum(len(s) - 2 for s in got)
    reasons = sorted(m.reason for m in skipped)
    assert fields + len(skipped) == len(HOSTILE)
    assert reasons == sorted(["not a regular file"] * 3 + ["no extension", "unsafe name",
                             "unsafe name", "duplicate field", "too large", "duplicate key"])
    # Without on_skip: one warning counts them by reason.
    caplog.set_level("WARNING", logger="vqgan_datasets")
    assert len(list(storage.read_shard(str(path), max_member_bytes=4096))) == 3
    assert "9 tar members are not samples" in caplog.text
    assert "not a regular file: 3" in caplog.text


def test_a_truncated_shard_yields_what_came_before_then_raises_naming_the_damage(tmp_path):
    raw = _tar_of([("a.jpg", b"A" * 600), ("b.jpg", b"B" * 600), ("c.jpg", b"C" * 600)])
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[:3700])  # inside c's data (headers at 0, 1536, 3072)
    got = []
    with pytest.raises(storage.ShardReadError) as info:
        got.extend(s["__key__"] for s in storage.read_shard(str(path)))
    assert got == ["a", "b"]
    assert str(path) in str(info.value) and info.value.offset is not None
    assert "at tar byte" in str(info.value)
    back = pickle.loads(pickle.dumps(info.value))
    assert (back.url, back.offset) == (info.value.url, info.value.offset)


# ------------------------------------------------------------------------------ named errors


def test_enospc_names_the_file_and_keeps_its_type(tmp_path, monkeypatch):
    """Issue 15.9: "No space left on device" named nothing. Now the file being written is in
    the message; the type and errno stay, and no temporary file is left."""
    real_open = open
    monkeypatch.setattr(storage, "open", lambda *a, **k: FullDisk(real_open(*a, **k)),
                        raising=False)
    target = str(tmp_path / "shard.stats.json")
    with pytest.raises(OSError) as info:
        storage.write_json(target, {"a": 1})
    assert info.value.errno == errno.ENOSPC and target in str(info.value)
    assert os.listdir(tmp_path) == []


RLIMIT_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from vqgan_datasets import storage
try:
    storage.write_json(sys.argv[1], {"x": "y" * 10000})
except OSError as e:
    print(type(e).__name__, e.errno, e)
"""


def test_a_real_write_limit_names_the_file(tmp_path):
    """The kernel's own error (ulimit -f: EFBIG), through a real write."""
    target = str(tmp_path / "big.json")
    out = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, target], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.startswith(f"OSError {errno.EFBIG} "), out.stdout + out.stderr
    assert target in out.stdout
    assert os.listdir(tmp_path) == []


def test_create_exclusive_leaves_no_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """Its hidden temporary file (written before the hard link) stayed behind on ENOSPC, and
    no sweep ever removes it."""
    real_open = open
    monkeypatch.setattr(storage, "open", lambda *a, **k: FullDisk(real_open(*a, **k)),
                        raising=False)
    target = str(tmp_path / ".x.tar.claim")
    with pytest.raises(OSError) as info:
        storage.create_exclusive(target, b"record")
    assert info.value.errno == errno.ENOSPC and target in str(info.value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ pipe: sources


@pytest.mark.parametrize("command,status", [("false", 1), ("exit 3", 3),
                                            ("cat {tar}; exit 4", 4),  # a whole tar, then fails
                                            ("head -c 3000 {tar}; exit 5", 5)])
def test_a_failing_pipe_command_names_its_exit_status(tmp_path, command, status):
    url = write_tar(tmp_path / "s.tar", make_samples()[:3])
    command = command.format(tar=url)
    with pytest.raises(storage.ShardReadError) as info:
        list(storage.read_shard(f"pipe:{command}", on_skip=lambda member: None))
    assert f"the command {command!r} exited with status {status}" in str(info.value)
    assert len(list(storage.read_shard(f"pipe:cat {url}"))) == 3  # a command that succeeds


def test_a_pipe_left_early_is_stopped_without_a_traceback(tmp_path):
    """Reading stops (the shard failed): the command is killed and waited for, quietly."""
    url = write_tar(tmp_path / "s.tar", make_samples()[:3])
    code = (
        "import os\n"
        "from vqgan_datasets import storage\n"
        "def children():\n"
        "    tasks = os.listdir('/proc/self/task')\n"
        "    return sum(len(open(f'/proc/self/task/{t}/children').read().split()) for t in tasks)\n"
        f"samples = storage.read_shard('pipe:while true; do cat {url}; done')\n"
        "next(samples)\n"
        "print(children())\n"
        "samples.close()\n"
        "print(children())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["1", "0"], out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
