"""One preprocessing worker process: its launch, its shared memory, its protocol, its end.

A worker is a fresh interpreter started by exec, as multiprocessing's "spawn", never a fork (a
fork of a process where JAX runs can hang: see `forks`), and without re-importing the caller's
``__main__`` (scripts need no ``if __name__ == "__main__"`` guard). Each serves one function
over a socket, one task per message, and writes array results into a shared-memory arena of its
own (an anonymous memfd: nothing to leak when it is killed, no /dev/shm size limit); results
that do not fit go back pickled through the socket. A worker whose parent dies reads
end-of-file and exits. `WorkerProcess` is the parent's side; `_serve` is the worker's loop.
Standard library only at import (numpy is imported where arrays are handled).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing import connection

__all__ = ["SLOTS", "SLOT_BYTES", "WorkerProcess"]

SLOTS = 2  # tasks a worker holds: the one it runs, the next waiting in its socket
SLOT_BYTES = 512 * 512 * 3
_HEADER = struct.Struct("<qq")  # task id, arena slot (-1: send the result back pickled)
_BOOTSTRAP = (
    "import json, sys; args = json.loads(sys.argv[1]); sys.path[:] = args['path']; "
    "from vqgan_datasets.pipeline.workerproc import _serve; _serve(args)"
)


class WorkerProcess:
    """A fresh interpreter serving `target` ("module:function", called with each task's
    unpickled arguments). Sends never block while the pending bytes fit `pipeline_bytes`."""

    def __init__(self, target: str) -> None:
        if not sys.executable:
            raise OSError("sys.executable is not set (an embedded interpreter?)")
        if os.name != "posix":
            raise OSError(f"worker processes need POSIX descriptor passing (os.name {os.name!r})")
        parent, child = socket.socketpair()
        arena_fd = None
        try:
            with contextlib.suppress(OSError):  # room for queued tasks (the kernel may cap it)
                parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            self.pipeline_bytes = parent.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
            fds = [child.fileno()]
            if hasattr(os, "memfd_create"):
                arena_fd = os.memfd_create("vqgan-worker-arena")
                os.ftruncate(arena_fd, SLOTS * SLOT_BYTES)
                fds.append(arena_fd)
            args = {"fd": child.fileno(), "arena_fd": arena_fd, "path": sys.path, "target": target}
            # One image per worker at a time: OpenCV's own thread pool (IBQ's resize) would
            # have every worker use every core.
            env = {**os.environ, "OPENCV_FOR_THREADS_NUM": "1"}
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, json.dumps(args)],
                                         pass_fds=fds, stdin=subprocess.DEVNULL, close_fds=True,
                                         env=env)
            self.arena = None if arena_fd is None else mmap.mmap(arena_fd, SLOTS * SLOT_BYTES)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
            if arena_fd is not None:
                os.close(arena_fd)
        self.conn = connection.Connection(parent.detach())
        self.pid = self.proc.pid
        self.launched = time.monotonic()
        self.ready = False  # it says so once its imports are done
        self.busy_since: float | None = None  # when the task at the head of `inflight` started
        self.inflight: collections.deque = collections.deque()  # (task, slot), in send order

    def send(self, task_id: int, payload: bytes, nbytes: int) -> int:
        """Queue one task whose result takes `nbytes`; returns the arena slot it will use."""
        used = {slot for _, slot in self.inflight}
        slot = -1
        if self.arena is not None and nbytes <= SLOT_BYTES:
            slot = next(s for s in range(SLOTS) if s not in used)
        self.conn.send_bytes(_HEADER.pack(task_id, slot) + payload)
        return slot

    def receive(self) -> tuple[int, object, str | None] | None:
        """The next reply: (task id, result or a view of it in the arena, error), or None for
        the ready message. Raises EOFError when the process is gone. Copy views at once."""
        message = self.conn.recv_bytes()
        if not self.ready:
            self.ready = True
            return None
        task_id, slot, result, error = pickle.loads(message)
        if slot >= 0:
            import numpy as np  # lazy: importing this module stays cheap

            result = np.ndarray(result, np.uint8, buffer=self.arena, offset=slot * SLOT_BYTES)
        return task_id, result, error

    def stop(self, kill: bool) -> None:
        """Stop it (`kill`: at once, else once it has read end-of-file) and reap it."""
        if kill:
            _kill(self.proc)
        self.conn.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            self.proc.wait()
        if self.arena is not None:
            with contextlib.suppress(BufferError):  # a view still exists: the GC unmaps it
                self.arena.close()

    def death(self) -> str:
        """How it ended, for an error message (waits a little for the exit status)."""
        try:
            code = self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return f"worker process {self.pid} stopped answering"
        if code < 0:
            try:
                return f"worker process {self.pid} died (killed by {signal.Signals(-code).name})"
            except ValueError:
                return f"worker process {self.pid} died (killed by signal {-code})"
        return f"worker process {self.pid} died (exit code {code})"


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.kill()


def _serve(args: dict) -> None:
    """A worker's loop: read a task, run it, reply; exit when the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = connection.Connection(args["fd"])
    arena = None
    if args["arena_fd"] is not None:
        arena = mmap.mmap(args["arena_fd"], SLOTS * SLOT_BYTES)
        os.close(args["arena_fd"])
    import numpy as np

    module, name = args["target"].split(":")
    target = getattr(importlib.import_module(module), name)  # start-up errors show here
    conn.send_bytes(b"ready")
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        task_id, slot = _HEADER.unpack_from(message)
        result, error = None, None
        try:
            result = target(*pickle.loads(memoryview(message)[_HEADER.size :]))
        except Exception as e:
            reason = getattr(e, "reason", None)  # ImageDecodeError's reason has no key in it
            error = reason if isinstance(reason, str) else f"{type(e).__name__}: {e}"
        del message
        if isinstance(result, np.ndarray) and arena is not None and slot >= 0 \
                and result.dtype == np.uint8 and result.nbytes <= SLOT_BYTES:
            out = np.ndarray(result.shape, np.uint8, buffer=arena, offset=slot * SLOT_BYTES)
            out[...] = result
            del out
            result = result.shape  # the parent reads the pixels from the slot
        else:
            slot = -1
        try:
            conn.send_bytes(pickle.dumps((task_id, slot, result, error), protocol=5))
        except OSError:
            return
