"""Claims: one writer per output file at a time, across threads, processes and hosts.

A claim says "this process is writing this file now". On local disks (NFS included) it is an
exclusive flock on a small file that holds the owner's record: the kernel (or the NFS lease)
drops the lock when the owner dies, however it dies, so a dead owner's claim is taken over at
once. Where locks are not available (object stores through fsspec, Windows) the record itself
is the claim, best effort: created exclusively where the store can, refreshed every
CLAIM_HEARTBEAT_S, and taken over when its owner is gone (same host: the pid no longer runs;
hosts are told apart by name) or silent for CLAIM_STALE_S. Threads of one process are told
apart too. A forked child (not an exec'd one) shares its parent's locks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from ..storage import (
    HOST,
    create_exclusive,
    exists,
    is_local,
    join,
    named_errors,
    read_json,
    remove,
    split,
    write_json,
)

try:
    import fcntl
except ImportError:  # Windows: claims fall back to records with a heartbeat
    fcntl = None

__all__ = ["CLAIM_HEARTBEAT_S", "CLAIM_STALE_S", "CLAIM_SUFFIX", "Claim", "claim", "claim_path",
           "describe_claim", "read_claim"]

logger = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"
CLAIM_HEARTBEAT_S = 60.0
CLAIM_STALE_S = 600.0

_held: dict[str, Claim | None] = {}  # this process's claims by path (None: being taken)
_held_lock = threading.Lock()
_heartbeat: threading.Thread | None = None


def claim_path(target: str) -> str:
    """The claim file of an output file: `.<name>.claim` next to it."""
    directory, name = split(target)
    return join(directory, f".{name}{CLAIM_SUFFIX}")


class Claim:
    """This process's claim on `path`; `release()` (or leaving a `with` block) removes it."""

    def __init__(self, path: str, record: dict[str, Any], fd: int | None):
        self.path, self.record, self._fd = path, record, fd

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the claim file (while still holding it), then let go."""
        with _held_lock:
            if _held.get(_claim_key(self.path)) is self:
                del _held[_claim_key(self.path)]
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                finally:
                    os.close(fd)
            else:
                current = read_json(self.path)
                if current is not None and current.get("token") == self.record["token"]:
                    remove(self.path)
        except OSError as e:  # harmless: a claim nobody holds is taken over
            logger.warning("could not remove the claim %s: %s", self.path, e)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(path: str, info: dict[str, Any] | None = None, *, wait: bool = False,
          poll_s: float = 1.0) -> Claim | None:
    """Claim `path` for this process, or None while another live writer holds it (`wait`: poll
    until it is free). `info` goes into the record (`read_claim` shows it to others).

    A claim whose owner died is taken over at once on local disks; see the notes above.
    """
    key = _claim_key(path)
    record = {"host": HOST, "pid": os.getpid(), "since": time.time(),
              "heartbeat": time.time(), "token": uuid.uuid4().hex, **(info or {})}
    delay = 0.05
    while True:
        with _held_lock:
            taken = key in _held
            if not taken:
                _held[key] = None
        got = None
        if not taken:
            try:
                with named_errors(path, "claiming"):
                    got = _claim(path, record)
            finally:
                with _held_lock:
                    if got is None:
                        del _held[key]
                    else:
                        _held[key] = got
        if got is not None:
            if not got.locked:
                _start_heartbeat()
            return got
        if not wait:
            return None
        time.sleep(delay)
        delay = min(delay * 2, poll_s)


def read_claim(path: str) -> dict[str, Any] | None:
    """The record in a claim file (host, pid, since, and the owner's info), or None."""
    return read_json(path)


def describe_claim(record: dict[str, Any] | None) -> str:
    """"host h, pid p, since <UTC time>" for messages."""
    if not record:
        return "another writer"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("since", 0))))
    return f"host {record.get('host')}, pid {record.get('pid')}, since {since}"


def _claim_key(path: str) -> str:
    return os.path.abspath(path) if is_local(path) else path


def _claim(path: str, record: dict[str, Any]) -> Claim | None:
    if fcntl is not None and is_local(path):
        try:
            return _claim_locked(path, record)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            logger.debug("no flock on %s (%s); claiming with a record", path, e)
    return _claim_record(path, record)


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def _claim_locked(path: str, record: dict[str, Any]) -> Claim | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:  # the file may have been released (unlinked) between our open and our lock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        data = json.dumps(record).encode("utf-8")
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))  # a dead owner's longer record; never to 0 (ext4 flushes)
    except BaseException:
        os.close(fd)
        raise
    return Claim(path, record, fd)


def _claim_record(path: str, record: dict[str, Any]) -> Claim | None:
    current = read_json(path)
    if current is not None and _alive(current):
        return None
    if current is not None or exists(path):
        logger.info("taking over %s from %s (gone)", path, describe_claim(current))
        remove(path)
    if not create_exclusive(path, json.dumps(record).encode("utf-8")):
        return None
    back = read_json(path)  # on stores without an exclusive create, the last writer wins
    return Claim(path, record, None) if back and back.get("token") == record["token"] else None


def _alive(record: dict[str, Any]) -> bool:
    if record.get("host") == HOST:
        pid = int(record.get("pid", -1))
        # Our own pid: not one of this process's live claims (`claim` checked those), so a
        # leftover of an earlier process that had our pid.
        return pid != os.getpid() and _pid_alive(pid)
    return time.time() - float(record.get("heartbeat", 0)) < CLAIM_STALE_S


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _start_heartbeat() -> None:
    global _heartbeat
    with _held_lock:
        if _heartbeat is not None:
            return
        _heartbeat = threading.Thread(target=_beat, name="vqgan-datasets-claims", daemon=True)
        _heartbeat.start()


def _beat() -> None:
    """Refresh every unlocked claim this process holds; ends when none is left."""
    global _heartbeat
    while True:
        time.sleep(CLAIM_HEARTBEAT_S)
        with _held_lock:
            claims = [c for c in _held.values() if c is not None and not c.locked]
            if not claims:
                _heartbeat = None
                return
        for held in claims:
            with contextlib.suppress(Exception):
                current = read_json(held.path)
                if current is not None and current.get("token") == held.record["token"]:
                    held.record["heartbeat"] = time.time()
                    write_json(held.path, held.record)
