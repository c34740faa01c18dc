"""Batches without any worker: inputs cut into (keys, items) chunks, outcomes recorded in any
order and returned in input order, the first outcome wins, samples on threads failed once past
their time budget, and cancel() reaches their futures."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from vqgan_datasets.pipeline import workers
from vqgan_datasets.pipeline.batches import Batch, LocalTask, Prepared, chunked, took_too_long


def test_chunked_keys_default_to_indices_and_must_not_run_out():
    assert list(chunked(iter("abcde"), None, 2)) == [
        ([0, 1], ["a", "b"]), ([2, 3], ["c", "d"]), ([4], ["e"])]
    assert list(chunked(iter("ab"), iter("xyz"), 5)) == [(["x", "y"], ["a", "b"])]
    with pytest.raises(ValueError, match="keys ran out after 3 keys, before the inputs did"):
        list(chunked(iter("abcd"), ["k0", "k1", "k2"], 2))
    assert workers.chunked is chunked and workers.Batch is Batch  # still importable there


def test_outcomes_in_input_order_and_the_first_wins():
    batch = Batch(["a", "b", "c"], 2, timeout_s=None)
    assert batch.row_nbytes == 2 * 2 * 3
    done = threading.Event()

    def finish() -> None:
        batch.complete(2, np.full((2, 2, 3), 2, np.uint8), None)
        batch.complete(1, None, "cannot identify image file")
        batch.complete(1, np.zeros((2, 2, 3), np.uint8), None)  # late: ignored
        batch.complete(0, np.full((2, 2, 3), 1, np.uint8), None)
        done.set()

    threading.Thread(target=finish).start()
    prepared = batch.result()
    assert done.wait(5)
    assert isinstance(prepared, Prepared)
    assert prepared.ok.tolist() == [True, False, True]
    assert prepared.reasons == [None, "cannot identify image file", None]
    assert [int(p[0, 0, 0]) for p in prepared.pixels] == [1, 2]


def test_a_sample_on_a_thread_fails_once_past_its_budget():
    batch = Batch(["slow", "quick"], 2, timeout_s=0.2)
    slow, quick = LocalTask(0), LocalTask(1)
    batch.add_local(slow)
    batch.add_local(quick)
    batch.started(slow)
    batch.started(quick)
    batch.complete(1, np.ones((2, 2, 3), np.uint8), None)
    start = time.monotonic()
    prepared = batch.result()  # nothing completes the slow one: the budget does
    assert 0.1 < time.monotonic() - start < 5
    assert prepared.ok.tolist() == [False, True]
    assert prepared.reasons[0] == took_too_long(0.2, "on a thread, which runs on")
    assert prepared.reasons[0].startswith("took longer than 0.2 s to preprocess")
    batch.complete(0, np.ones((2, 2, 3), np.uint8), None)  # the thread returns late: dropped
    assert batch.result().ok.tolist() == [False, True]


def test_cancel_reaches_the_futures_of_queued_samples():
    batch = Batch([0], 2, timeout_s=None)
    task = LocalTask(0, future=concurrent.futures.Future())
    batch.add_local(task)
    batch.cancel()
    assert batch.cancelled and task.future.cancelled()
