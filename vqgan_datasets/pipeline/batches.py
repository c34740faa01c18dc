"""Batches of inputs: cut from a stream (`chunked`), and filled in while they are preprocessed.

A `Batch` holds the rows of one batch while whoever runs its samples (`workers.WorkerPool`:
worker processes or threads) records each outcome with `complete`; `result()` waits for all of
them and returns a `Prepared`: the good rows stacked in input order and, per input, why it
failed. Samples on threads here are tracked so that `result()` can fail those past their time
budget (a thread cannot be stopped; its late result is dropped).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Batch", "LocalTask", "Prepared", "check_code_row", "chunked", "code_batch",
           "took_too_long"]


def chunked(items: Iterator, keys: Iterable | None, size: int) -> Iterator[tuple[list, list]]:
    """(keys, items) lists of `size` from an iterator; keys default to running indices."""
    key_iter = itertools.count() if keys is None else iter(keys)
    index = 0
    while True:
        chunk_items = list(itertools.islice(items, size))
        if not chunk_items:
            return
        chunk_keys = list(itertools.islice(key_iter, len(chunk_items)))
        if len(chunk_keys) != len(chunk_items):
            raise ValueError(
                f"keys ran out after {index + len(chunk_keys)} keys, before the inputs did"
            )
        index += len(chunk_items)
        yield chunk_keys, chunk_items


def check_code_row(key, array: np.ndarray, length: int | None) -> int:
    """The length of one token row, refused (naming its key) unless integer ids [h*w] of
    `length` (None: any)."""
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"codes for key {key!r}: expected integer token ids [h*w], got {array.dtype} "
            f"{array.shape}"
        )
    if length is not None and array.shape[0] != length:
        raise ValueError(
            f"codes for key {key!r} hold {array.shape[0]} tokens, earlier ones {length} "
            "(one grid per stream)"
        )
    return array.shape[0]


def code_batch(keys: list, rows: list, length: int, codebook_size: int) -> tuple[list, np.ndarray]:
    """(keys, int32 codes [n, length]) for one device call, every row checked first."""
    from ..models.modeling import check_codes  # the engine's side only: workers never load JAX

    arrays = [np.asarray(row) for row in rows]
    for key, array in zip(keys, arrays, strict=True):
        check_code_row(key, array, length)
        try:
            check_codes(array, codebook_size)
        except ValueError as e:
            raise ValueError(f"codes for key {key!r}: {e}") from None
    return keys, np.stack(arrays).astype(np.int32, copy=False)


@dataclass
class Prepared:
    """One batch preprocessed: good rows stacked in input order, and why each failure failed."""

    pixels: np.ndarray  # uint8 [n_ok, S, S, 3]
    ok: np.ndarray  # bool [n]
    reasons: list[str | None]  # per input: None, or why it failed (without the key)


@dataclass
class LocalTask:
    """A sample on a thread of this process: its row, its future, when its thread took it up."""

    index: int
    future: concurrent.futures.Future | None = None
    started: float | None = None


def took_too_long(timeout_s: float, where: str) -> str:
    """The reason a sample fails when it ran past `sample_timeout_s` (`where`: what was done)."""
    return f"took longer than {timeout_s:g} s to preprocess (sample_timeout_s; {where})"


class Batch:
    """Inputs being preprocessed; `result()` waits for all of them."""

    def __init__(self, keys: list, image_size: int, timeout_s: float | None) -> None:
        n = len(keys)
        self.keys = keys
        self.row_nbytes = image_size * image_size * 3  # one uint8 row of pixels
        self._pixels = np.empty((n, image_size, image_size, 3), np.uint8)
        self._done = np.zeros(n, bool)
        self._ok = np.zeros(n, bool)
        self._reasons: list[str | None] = [None] * n
        self._remaining = n
        self._cond = threading.Condition()
        self._timeout_s = timeout_s
        self._local: list[LocalTask] = []  # samples on this process's threads
        self._aborted: str | None = None
        self.cancelled = False

    def result(self) -> Prepared:
        """Wait for every input; failures come back as reasons, never raised. Raises
        RuntimeError when the batch was aborted (`abort`) before every input had an outcome."""
        with self._cond:
            while self._remaining:
                if self._aborted is not None:
                    raise RuntimeError(self._aborted)
                timeout = self._fail_overdue_local_tasks()
                if self._remaining:
                    self._cond.wait(timeout)
        ok = self._ok
        pixels = self._pixels if ok.all() else self._pixels[ok]
        return Prepared(pixels, ok.copy(), list(self._reasons))

    def cancel(self) -> None:
        """Drop what has not started (the caller will not read this batch)."""
        self.cancelled = True
        for task in self._local:
            if task.future is not None:
                task.future.cancel()

    def abort(self, reason: str) -> None:
        """Give up on the inputs still outstanding for a reason that is not theirs (the pool was
        closed under them): `result()` raises instead of blaming those samples."""
        with self._cond:
            if self._aborted is None:
                self._aborted = reason
            self._cond.notify_all()

    def complete(self, index: int, pixels: np.ndarray | None, reason: str | None) -> None:
        """Record input `index`'s pixels, or why it failed; the first outcome recorded wins."""
        with self._cond:
            if self._done[index]:
                return  # an overdue thread finishing after its sample was failed
            if pixels is not None and not self.cancelled:
                self._pixels[index] = pixels
            self._done[index] = True
            self._ok[index] = pixels is not None
            self._reasons[index] = reason
            self._remaining -= 1
            if not self._remaining:
                self._cond.notify_all()

    def add_local(self, task: LocalTask) -> None:
        """Track a sample run on a thread here (for its time budget, and for `cancel`)."""
        self._local.append(task)

    def started(self, task: LocalTask) -> None:
        """A thread took up `task` now: its time budget starts."""
        task.started = time.monotonic()
        with self._cond:
            self._cond.notify_all()  # a waiter recomputes its deadline

    def _fail_overdue_local_tasks(self) -> float | None:
        """Fail samples on threads past their time budget (the thread runs on; its result is
        dropped); seconds until the next deadline, None when none is running. Holds _cond."""
        if self._timeout_s is None:
            return None
        now, wait = time.monotonic(), None
        for task in self._local:
            if task.started is None or self._done[task.index]:
                continue
            left = task.started + self._timeout_s - now
            if left > 0:
                wait = left if wait is None else min(wait, left)
                continue
            self._done[task.index] = True
            self._reasons[task.index] = took_too_long(self._timeout_s, "on a thread, which runs on")
            self._remaining -= 1
        return wait
