"""claims.py: one writer per file across threads, processes and hosts; dead owners taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pytest

from vqgan_datasets import storage
from vqgan_datasets.jobs import claims

HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    from vqgan_datasets.jobs import claims
    held = claims.claim(sys.argv[1], {"run": "child"})
    print("held" if held else "refused", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(600)
""")


def test_a_claim_is_exclusive_across_threads_and_released_whole(tmp_path):
    path = str(tmp_path / ".x.tar.claim")
    held = claims.claim(path, {"run": "r1"})
    assert held is not None and held.locked
    record = claims.read_claim(path)
    assert (record["pid"], record["run"], record["host"]) == (os.getpid(), "r1", storage.HOST)
    assert "pid" in claims.describe_claim(record)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(claims.claim(path)))
    thread.start()
    thread.join()
    assert other == [None]  # another thread of this process is another writer
    held.release()
    assert not os.path.exists(path)
    with claims.claim(path) as again:
        assert again is not None
    assert os.listdir(tmp_path) == []


def test_wait_polls_until_the_holder_lets_go(tmp_path):
    path = str(tmp_path / ".x.claim")
    held = claims.claim(path)
    timer = threading.Timer(0.3, held.release)
    timer.start()
    started = time.monotonic()
    got = claims.claim(path, wait=True, poll_s=0.05)
    assert got is not None and time.monotonic() - started >= 0.25
    got.release()
    timer.join()


def _child(path: str, mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, path, mode],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_another_live_process_holds_a_claim_until_it_dies(tmp_path):
    """A live process's claim is refused; once it is killed (no chance to clean up) its
    claim is taken over at once: the kernel dropped the lock."""
    path = str(tmp_path / ".x.claim")
    child = _child(path, "hold")
    try:
        assert claims.claim(path) is None
        assert claims.read_claim(path)["run"] == "child"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert os.path.exists(path)  # left behind by the killed owner
    taken = claims.claim(path)
    assert taken is not None and claims.read_claim(path)["pid"] == os.getpid()
    taken.release()


def test_records_without_locks_on_an_object_store(monkeypatch):
    """fsspec stores: the record is the claim; a dead pid on this host or a silent other host
    is taken over, a fresh heartbeat from another host is not."""
    memory = fsspec.filesystem("memory")
    path = "memory://claims-test/.x.tar.claim"
    held = claims.claim(path, {"run": "mine"})
    assert held is not None and not held.locked
    assert claims.claim(path) is None
    held.release()
    assert not memory.exists("/claims-test/.x.tar.claim")

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {"host": storage.HOST, "pid": int(done.stdout), "since": 0, "heartbeat": time.time(),
            "token": "t"}
    gone = {"host": "elsewhere", "pid": 1, "since": 0, "heartbeat": time.time() - 3600,
            "token": "t"}
    alive = dict(gone, heartbeat=time.time())
    for record, free in ((dead, True), (gone, True), (alive, False)):
        memory.pipe("/claims-test/.x.tar.claim", json.dumps(record).encode())
        got = claims.claim(path)
        assert (got is not None) == free, record
        if got is not None:
            got.release()
    memory.rm("/claims-test", recursive=True)


def test_claiming_in_a_missing_folder_names_the_file(tmp_path):
    path = str(tmp_path / "missing" / ".x.claim")
    with pytest.raises(FileNotFoundError, match=r"missing/\.x\.claim"):
        claims.claim(path)
