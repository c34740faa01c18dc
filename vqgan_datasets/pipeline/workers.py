"""Preprocessing workers: image inputs → uint8 pixels in worker processes, in input order.

`WorkerPool.submit(items, keys, image_size=..., preprocess=...)` returns a `Batch`
(`batches`) at once; `Batch.result()` waits for it: the good rows stacked in input order plus,
per input, why it failed. `WorkerPool.stream` does the same for an unbounded input, a few
batches ahead. A pool serves any number of batches and callers; its workers are reused.

Processes (`workerproc.WorkerProcess`: fresh interpreters, never forks; they import `images`,
never JAX) get one sample per message and at most two at a time. Pixels come back through each
worker's shared-memory arena: measured on the 2-core machine, parent CPU per 256×256×3 sample,
26-29 µs, against 69-204 µs pickled through the socket (`benchmarks/cpu_pipeline.py
--transport`). Bytes, paths, {"bytes", "path"} dicts and arrays go to the workers. PIL images
are preprocessed here, on threads: they are already decoded (a pickle would carry their pixels,
not their file) and can hold state a pickle drops (an animation's current frame); so is
anything that does not pickle. A worker resolves relative paths in the directory that was
current when the batch was submitted.

Time bound: a worker busy on one sample for longer than `sample_timeout_s` is killed and
replaced; that sample fails with the reason, and those queued behind it go to other workers.
Threads cannot be stopped: an overdue sample on a thread fails the same way, but its thread
runs on until the decoder returns. A worker that dies fails only the sample it was on.

Fallback: where worker processes cannot start (no interpreter to exec, no descriptor passing,
three failed starts in a row), the pool logs why once and carries on with threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import connection

import numpy as np
from PIL import Image

from .batches import Batch, LocalTask, Prepared, chunked, took_too_long
from .workerproc import SLOTS, WorkerProcess

__all__ = [
    "DEFAULT_SAMPLE_TIMEOUT_S",
    "Batch",
    "Prepared",
    "WorkerPool",
    "chunked",
    "default_workers",
    "host_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_TIMEOUT_S = 60.0
_MAX_DEFAULT_WORKERS = 32
_START_TIMEOUT_S = 120.0  # a worker that has not imported its modules by then failed to start
_MAX_FAILED_STARTS = 3
_TARGET = f"{__name__}:_preprocess_one"
_fallback_logged = False


def default_workers() -> int:
    """Worker processes for the cores this process may run on (its CPU affinity), at most 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(_MAX_DEFAULT_WORKERS, cores))


def host_settings(workers: int | None, num_threads: int | None,
                  sample_timeout_s: float | None) -> dict:
    """The preprocessing settings checked, None defaults resolved: workers (None: one per
    available core), num_threads (None: min(8, cpu count)), sample_timeout_s (None: no limit)."""
    workers = default_workers() if workers is None else workers
    num_threads = min(8, os.cpu_count() or 1) if num_threads is None else num_threads
    for name, value, minimum in (("workers", workers, 0), ("num_threads", num_threads, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if sample_timeout_s is not None:
        if isinstance(sample_timeout_s, bool) or not isinstance(sample_timeout_s, (int, float)):
            raise TypeError(f"sample_timeout_s must be seconds or None, got {sample_timeout_s!r}")
        if not sample_timeout_s > 0:
            raise ValueError(f"sample_timeout_s must be > 0, got {sample_timeout_s}")
        sample_timeout_s = float(sample_timeout_s)
    return {"workers": int(workers), "num_threads": int(num_threads),
            "sample_timeout_s": sample_timeout_s}


def _preprocess_one(item, image_size: int, preprocess: str, cwd: str | None = None) -> np.ndarray:
    """The workers' task. `cwd`: the caller's working directory when it submitted the sample
    (a worker outlives calls; a relative path means what it means to the caller now)."""
    from . import images

    if cwd is not None and cwd != os.getcwd():
        os.chdir(cwd)
    return images.load_image(item, image_size, preprocess=preprocess)


def _caller_cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under us: relative paths cannot be resolved anywhere
        return None


def _failure(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) else f"{type(error).__name__}: {error}"


@dataclass
class _Task:
    """A sample for a worker process: its batch, its row, and the pickled input."""

    batch: Batch
    index: int
    payload: bytes
    id: int = 0


class WorkerPool:
    """Preprocessing on `workers` processes (0: on `threads` threads in this process).

    Processes start on the first submit. `close()` stops them; a closed pool cannot be reused.
    """

    def __init__(
        self, workers: int, *, threads: int, sample_timeout_s: float | None
    ) -> None:
        self.workers = int(workers)
        self.threads = max(1, int(threads))
        self.sample_timeout_s = sample_timeout_s
        self.mode = "processes" if self.workers > 0 else "threads"
        self.pid = os.getpid()
        self.closed = False
        self._lock = threading.Lock()
        self._pending: collections.deque[_Task] = collections.deque()
        self._workers: list[WorkerProcess] = []
        self._ids = itertools.count()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._manager: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._failed_starts = 0

    # -- public -------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the live worker processes (empty on threads)."""
        with self._lock:
            return [w.pid for w in self._workers]

    def submit(
        self, items: Sequence, keys: list, *, image_size: int, preprocess: str = "exact"
    ) -> Batch:
        """Start preprocessing `items` (one batch); returns at once."""
        if self.closed:
            raise RuntimeError("this preprocessing pool is closed")
        if self.pid != os.getpid():  # its manager thread and workers stayed with the parent
            raise RuntimeError(
                f"this preprocessing pool belongs to process {self.pid}, not to this one (a fork);"
                " create a new WorkerPool here"
            )
        batch = Batch(keys, image_size, self.sample_timeout_s)
        remote: list[_Task] = []
        cwd = _caller_cwd() if self.mode == "processes" else None
        for index, item in enumerate(items):
            payload = self._payload(item, image_size, preprocess, cwd)
            if payload is None:
                self._run_local(batch, index, item, image_size, preprocess)
            else:
                remote.append(_Task(batch, index, payload, next(self._ids)))
        with self._lock:
            if self.closed:  # by another thread meanwhile: nothing would ever run these
                raise RuntimeError("this preprocessing pool was closed during submit")
            if self.mode == "processes":
                self._pending.extend(remote)
                remote = []
        for task in remote:  # the pool fell back to threads meanwhile
            self._run_local(batch, task.index, *pickle.loads(task.payload)[:3])
        self._start()
        self._wake()
        return batch

    def stream(
        self, items: Iterator, keys: Iterable | None, *, batch_size: int, ahead: int,
        image_size: int, preprocess: str = "exact",
    ) -> Iterator[tuple[list, Prepared]]:
        """(keys, Prepared) per `batch_size` inputs, in order, with `ahead` batches submitted
        before the one yielded (0: the next is submitted only when this one is taken up again).

        The input is read in the caller's thread, so at most max(1, ahead) + 1 batches are read
        and not yet yielded. Closing the stream cancels what was queued.
        """
        chunks = chunked(items, keys, batch_size)
        queued: collections.deque[Batch] = collections.deque()

        def refill() -> None:
            while len(queued) < max(1, ahead):
                chunk = next(chunks, None)
                if chunk is None:
                    return
                queued.append(self.submit(chunk[1], chunk[0], image_size=image_size,
                                          preprocess=preprocess))

        try:
            while True:
                refill()
                if not queued:
                    return
                prepared = queued[0].result()
                batch = queued.popleft()
                if ahead:
                    refill()  # before the caller works on this batch, so workers never idle
                yield batch.keys, prepared
        finally:
            for batch in queued:
                batch.cancel()

    def close(self) -> None:
        """Stop the workers; batches still waiting raise RuntimeError in `result()` (their samples
        did not fail, the pool stopped). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self.pid != os.getpid():
            return  # a forked copy: the workers are the parent's, leave them alone
        self._wake()
        manager = self._manager
        if manager is not None and manager is not threading.current_thread():
            manager.join(timeout=30.0)
        with self._lock:
            workers, self._workers = self._workers, []
            pending, self._pending = list(self._pending), collections.deque()
        for worker in workers:
            pending.extend(task for task, _ in worker.inflight)
            worker.stop(kill=bool(worker.inflight))
        for task in pending:  # not the samples' fault: their batches raise in result()
            task.batch.abort("the preprocessing pool was closed before this batch was done")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- submitting ------------------------------------------------------------------------------

    def _payload(self, item, image_size: int, preprocess: str, cwd: str | None) -> bytes | None:
        """The pickled task for a worker process, or None to preprocess `item` here."""
        if self.mode != "processes" or isinstance(item, Image.Image):
            return None
        if isinstance(item, memoryview):
            item = item.tobytes()
        if not isinstance(item, (bytes, bytearray, str, os.PathLike, dict, np.ndarray)):
            return None  # load_image names what it accepts
        try:
            return pickle.dumps((item, image_size, preprocess, cwd),
                                protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None

    def _run_local(self, batch: Batch, index: int, item, image_size: int, preprocess: str):
        task = LocalTask(index)
        batch.add_local(task)

        def run() -> None:
            batch.started(task)
            if batch.cancelled:
                batch.complete(index, None, "cancelled")
                return
            try:
                pixels, reason = _preprocess_one(item, image_size, preprocess), None
            except Exception as e:
                pixels, reason = None, _failure(e)
            batch.complete(index, pixels, reason)

        with self._lock:
            if self.closed:  # raced with close(): no executor may start after it
                batch.abort("the preprocessing pool was closed before this batch was done")
                return
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="vqgan-preprocess"
                )
            task.future = self._executor.submit(run)

        def not_run(future: concurrent.futures.Future) -> None:
            if not future.cancelled():
                return
            if batch.cancelled:  # dropped by its reader
                batch.complete(index, None, "cancelled")
            else:  # the pool closed under a batch someone waits for: not the sample's fault
                batch.abort("the preprocessing pool was closed before this batch was done")

        task.future.add_done_callback(not_run)

    # -- processes: start, fall back ----------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._manager is not None or self.closed or self.mode != "processes":
                return
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_w.setblocking(False)
            self._manager = threading.Thread(
                target=self._run, name="vqgan-preprocess-manager", daemon=True
            )
            self._manager.start()

    def _fall_back(self, why: str) -> None:
        """Continue on threads: stop every worker and run their samples here."""
        global _fallback_logged
        if not _fallback_logged:
            _fallback_logged = True
            logger.warning(
                "preprocessing runs on %d threads in this process: worker processes cannot "
                "start here (%s)", self.threads, why,
            )
        with self._lock:
            self.mode = "threads"
            workers, self._workers = self._workers, []
            tasks = [task for w in workers for task, _ in w.inflight] + list(self._pending)
            self._pending.clear()
        for worker in workers:
            worker.stop(kill=True)
        for task in tasks:
            if task.batch.cancelled:
                task.batch.complete(task.index, None, "cancelled")
            else:
                self._run_local(task.batch, task.index, *pickle.loads(task.payload)[:3])

    # -- processes: the manager thread ----------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):  # full (already awake) or closed
                self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while not self.closed:
                self._top_up()
                self._dispatch()
                conns = {w.conn: w for w in self._workers}
                ready = connection.wait([*conns, self._wake_r], self._next_check())
                for conn in ready:
                    if conn is self._wake_r:
                        self._wake_r.recv(4096)
                    else:
                        self._receive(conns[conn])
                self._check_times()
        except _StartFailed as e:
            self._fall_back(str(e))
        except Exception as e:  # a bug here must not leave callers waiting for ever
            logger.exception("the preprocessing manager thread failed")
            self._fall_back(f"its manager thread failed: {type(e).__name__}: {e}")

    def _top_up(self) -> None:
        with self._lock:
            missing = self.workers - len(self._workers)
        for _ in range(missing):
            try:
                worker = WorkerProcess(_TARGET)
            except OSError as e:
                raise _StartFailed(f"{type(e).__name__}: {e}") from e
            with self._lock:
                self._workers.append(worker)

    def _dispatch(self) -> None:
        """Give queued samples to ready workers, idle ones first; never block on a busy one."""
        now = time.monotonic()
        for worker in sorted(self._workers, key=lambda w: len(w.inflight)):
            while worker.ready and len(worker.inflight) < SLOTS:
                with self._lock:
                    while self._pending and self._pending[0].batch.cancelled:
                        task = self._pending.popleft()
                        task.batch.complete(task.index, None, "cancelled")
                    if not self._pending:
                        return
                    if worker.inflight and len(self._pending[0].payload) > worker.pipeline_bytes:
                        break
                    task = self._pending.popleft()
                try:
                    slot = worker.send(task.id, task.payload, task.batch.row_nbytes)
                except OSError:
                    with self._lock:
                        self._pending.appendleft(task)
                    self._replace(worker, f"its {worker.death()}")
                    break
                if not worker.inflight:
                    worker.busy_since = now
                worker.inflight.append((task, slot))

    def _receive(self, worker: WorkerProcess) -> None:
        try:
            reply = worker.receive()
        except (EOFError, OSError):
            self._replace(worker, f"its {worker.death()}")
            return
        if reply is None:  # it is ready
            self._failed_starts = 0
            return
        task_id, pixels, reason = reply
        task, _ = worker.inflight.popleft()
        if task.id != task_id:  # pragma: no cover - the protocol is one reply per task, in order
            raise RuntimeError(f"worker replied for task {task_id}, expected {task.id}")
        worker.busy_since = time.monotonic() if worker.inflight else None
        task.batch.complete(task.index, pixels, reason)
        del pixels  # a view into the worker's arena

    def _replace(self, worker: WorkerProcess, why: str) -> None:
        """Stop `worker`; the sample it was on fails with `why`, those queued behind it go back
        to the queue. `_top_up` starts another."""
        with self._lock:
            self._workers.remove(worker)
            queued = [task for task, _ in worker.inflight][1:]
            self._pending.extendleft(reversed(queued))
        if worker.inflight:
            task = worker.inflight[0][0]
            task.batch.complete(task.index, None, why)
        elif not worker.ready:
            self._failed_starts += 1
            logger.debug("a preprocessing worker failed to start: %s", why)
            if self._failed_starts >= _MAX_FAILED_STARTS:
                raise _StartFailed(
                    f"{self._failed_starts} worker processes in a row failed to start; the "
                    f"last: {why.removeprefix('its ')}"
                )
        worker.stop(kill=True)

    def _next_check(self) -> float | None:
        deadlines = []
        for worker in self._workers:
            if not worker.ready:
                deadlines.append(worker.launched + _START_TIMEOUT_S)
            elif worker.busy_since is not None and self.sample_timeout_s is not None:
                deadlines.append(worker.busy_since + self.sample_timeout_s)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic()) + 0.001

    def _check_times(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now - worker.launched > _START_TIMEOUT_S:
                self._replace(worker, f"it did not start within {_START_TIMEOUT_S:g} s")
                continue
            timeout = self.sample_timeout_s
            if worker.busy_since is None or timeout is None or now - worker.busy_since <= timeout:
                continue
            if worker.conn.poll(0):  # it finished just now
                self._receive(worker)
                continue
            where = f"its worker process {worker.pid} was stopped and replaced"
            self._replace(worker, took_too_long(timeout, where))


class _StartFailed(Exception):
    pass
