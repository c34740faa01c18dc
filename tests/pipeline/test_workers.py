"""The preprocessing pool: same pixels as in-process, input order, per-sample errors, a time
bound per sample (slow inputs built here, not injected), workers that die or hang replaced,
bounded read-ahead, no child processes left behind, and the fallback to threads. The worker
processes themselves (exec, shared memory, exit with the parent): test_workerproc.py."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive
from PIL import Image

from vqgan_datasets.pipeline import workerproc
from vqgan_datasets.pipeline import workers as workers_lib
from vqgan_datasets.pipeline.images import load_image
from vqgan_datasets.pipeline.workers import WorkerPool, default_workers, host_settings

SIZE = 32
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _jpeg(seed: int, size=(120, 90), **save) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def slow_jpeg(scans: int = 3000) -> bytes:
    """A 2048² progressive JPEG whose last scan is repeated `scans` times: about 80 KB that
    libjpeg takes seconds to decode (about 2.6 ms per scan here), as hostile files do."""
    yy, xx = np.mgrid[0:2048, 0:2048]
    smooth = np.stack([(xx // 8) % 256, (yy // 8) % 256, ((xx + yy) // 16) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(buffer, "JPEG", quality=75, progressive=True)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    return data[:last_scan] + data[last_scan:-2] * scans + b"\xff\xd9"


def _children_of(pid: int) -> set[int]:
    """Live or unreaped child processes of `pid`, from /proc."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


@pytest.fixture(scope="module")
def pool():
    with_processes = WorkerPool(2, threads=2, sample_timeout_s=60.0)
    yield with_processes
    with_processes.close()


def test_same_pixels_as_in_process_in_order_with_errors(pool, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg(7))
    items = [
        _jpeg(0), b"not an image", Image.fromarray(np.full((40, 50, 3), 9, np.uint8)),
        np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3), str(path),
        {"bytes": _jpeg(1), "path": None}, memoryview(_jpeg(2)), b"", 42, path,
    ]
    keys = [f"k{i}" for i in range(len(items))]
    prepared = pool.submit(items, keys, image_size=SIZE).result()
    assert pool.mode == "processes" and len(pool.pids) == 2
    assert prepared.ok.tolist() == [True, False, True, True, True, True, True, False, False, True]
    assert prepared.reasons[1].startswith("cannot identify image file")
    assert prepared.reasons[7] == "empty bytes"
    assert "unsupported input type builtins.int" in prepared.reasons[8]
    good = [item for item, ok in zip(items, prepared.ok, strict=True) if ok]
    expected = np.stack([load_image(item, SIZE) for item in good])
    assert np.array_equal(prepared.pixels, expected)

    # Outputs too big for a worker's shared slots come back through its socket, identically.
    big = pool.submit([_jpeg(3, (700, 650))], ["big"], image_size=640).result()
    assert np.array_equal(big.pixels[0], load_image(_jpeg(3, (700, 650)), 640))

    # The mode travels with each sample: fast (DCT-scaled decode) differs from exact here.
    large = [_jpeg(4, (1100, 900)), _jpeg(5, (900, 1100))]
    by_mode = {}
    for mode in ("fast", "exact"):
        by_mode[mode] = pool.submit(large, [0, 1], image_size=SIZE, preprocess=mode).result()
        expected = np.stack([load_image(x, SIZE, preprocess=mode) for x in large])
        assert np.array_equal(by_mode[mode].pixels, expected)
    assert not np.array_equal(by_mode["fast"].pixels, by_mode["exact"].pixels)


def test_stream_keeps_order_and_reads_a_bounded_distance_ahead(pool):
    tiles = [np.full((8, 8, 3), i, np.uint8) for i in range(7)]
    pulled, furthest, seen = 0, 0, 0

    def source():
        nonlocal pulled
        for i in range(300):
            pulled += 1
            yield tiles[i % 7]

    for keys, prepared in pool.stream(source(), None, batch_size=4, ahead=2, image_size=8):
        assert keys == list(range(seen, seen + len(keys)))
        assert [int(p[0, 0, 0]) for p in prepared.pixels] == [k % 7 for k in keys]
        seen += len(keys)
        furthest = max(furthest, pulled - seen)
    assert seen == 300
    assert 4 < furthest <= (2 + 1) * 4


@needs_proc
def test_slow_sample_is_stopped_its_worker_replaced_and_the_rest_succeed():
    with WorkerPool(1, threads=1, sample_timeout_s=1.0) as pool:
        pool.submit([_jpeg(0)], [0], image_size=SIZE).result()  # started and warm
        (first,) = pool.pids
        items = [_jpeg(1), slow_jpeg(), _jpeg(2), _jpeg(3)]
        start = time.monotonic()
        prepared = pool.submit(items, list("abcd"), image_size=SIZE).result()
        assert time.monotonic() - start < 30
        assert prepared.ok.tolist() == [True, False, True, True]
        assert prepared.reasons[1].startswith("took longer than 1 s to preprocess")
        assert f"worker process {first} was stopped and replaced" in prepared.reasons[1]
        expected = np.stack([load_image(items[i], SIZE) for i in (0, 2, 3)])
        assert np.array_equal(prepared.pixels, expected)
        assert not alive(first)
        assert len(pool.pids) == 1 and pool.pids[0] != first


@needs_proc
def test_a_worker_that_dies_fails_only_its_sample():
    with WorkerPool(1, threads=1, sample_timeout_s=None) as pool:
        pool.submit([_jpeg(0)], [0], image_size=SIZE).result()
        (first,) = pool.pids
        batch = pool.submit([slow_jpeg(), _jpeg(1)], ["slow", "next"], image_size=SIZE)
        time.sleep(0.5)
        os.kill(first, signal.SIGKILL)  # as the kernel's OOM killer would
        prepared = batch.result()
        assert prepared.ok.tolist() == [False, True]
        assert f"worker process {first} died (killed by SIGKILL)" in prepared.reasons[0]
        assert pool.pids and pool.pids[0] != first


def test_thread_mode_time_bound(monkeypatch):
    real = workers_lib._preprocess_one

    def sometimes_slow(item, image_size, preprocess):
        if isinstance(item, bytes) and item == b"slow":
            time.sleep(1.5)
        return real(item, image_size, preprocess)

    monkeypatch.setattr(workers_lib, "_preprocess_one", sometimes_slow)
    with WorkerPool(0, threads=2, sample_timeout_s=0.3) as pool:
        prepared = pool.submit([_jpeg(0), b"slow", _jpeg(1)], [0, 1, 2], image_size=SIZE).result()
    assert pool.mode == "threads" and pool.pids == []
    assert prepared.ok.tolist() == [True, False, True]
    assert prepared.reasons[1].startswith("took longer than 0.3 s to preprocess")


@needs_proc
def test_no_children_left_after_an_exception_mid_stream_and_close():
    pool = WorkerPool(2, threads=1, sample_timeout_s=60.0)
    stream = pool.stream(iter([_jpeg(i) for i in range(40)]), None, batch_size=4, ahead=2,
                         image_size=SIZE)
    with pytest.raises(KeyError):
        for keys, _ in stream:
            if keys[0] >= 8:
                raise KeyError("the consumer failed")
    stream.close()
    pids = pool.pids
    assert len(pids) == 2 and _children_of(os.getpid()) >= set(pids)
    # The pool is still usable after a consumer failed; close() then stops every worker.
    assert pool.submit([_jpeg(0)], [0], image_size=SIZE).result().ok.all()
    pool.close()
    assert not any(alive(pid) for pid in pids)
    assert not _children_of(os.getpid()) & set(pids)  # reaped, not zombies
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit([_jpeg(0)], [0], image_size=SIZE)


def _use_in_forked_child(pool, queue) -> None:
    try:
        pool.submit([_jpeg(0)], [0], image_size=SIZE)
        queue.put("submitted")
    except RuntimeError as e:
        queue.put(str(e))
    pool.close()  # must not stop the parent's workers


@needs_proc
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_forked_copy_of_a_pool_refuses_work_and_leaves_the_workers_alone(pool):
    import multiprocessing

    pool.submit([_jpeg(0)], [0], image_size=SIZE).result()
    pids = pool.pids
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_use_in_forked_child, args=(pool, queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert "belongs to process" in queue.get()
    assert pool.pids == pids and all(alive(pid) for pid in pids)
    assert pool.submit([_jpeg(1)], [0], image_size=SIZE).result().ok.all()


def test_falls_back_to_threads_when_processes_cannot_start(monkeypatch, caplog):
    monkeypatch.setattr(workers_lib, "_fallback_logged", False)
    items = [_jpeg(0), b"junk", _jpeg(1)]
    expected = np.stack([load_image(items[0], SIZE), load_image(items[2], SIZE)])

    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with caplog.at_level(logging.WARNING, logger="vqgan_datasets.pipeline.workers"), \
            WorkerPool(2, threads=2, sample_timeout_s=10.0) as pool:
        prepared = pool.submit(items, [0, 1, 2], image_size=SIZE).result()
        again = pool.submit(items, [0, 1, 2], image_size=SIZE).result()
    assert pool.mode == "threads"
    assert np.array_equal(prepared.pixels, expected) and np.array_equal(again.pixels, expected)
    assert prepared.ok.tolist() == [True, False, True]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "worker processes cannot start" in warnings[0]
    assert "/nonexistent/python3" in warnings[0]
    monkeypatch.undo()

    # A worker that starts but cannot run (here: exits at once) is retried, then given up on.
    monkeypatch.setattr(workers_lib, "_fallback_logged", False)
    monkeypatch.setattr(workerproc, "_BOOTSTRAP", "import sys; sys.exit(3)")
    with caplog.at_level(logging.WARNING, logger="vqgan_datasets.pipeline.workers"), \
            WorkerPool(1, threads=1, sample_timeout_s=10.0) as pool:
        prepared = pool.submit(items, [0, 1, 2], image_size=SIZE).result()
    assert pool.mode == "threads" and np.array_equal(prepared.pixels, expected)
    assert "3 worker processes in a row" in caplog.records[-1].getMessage()
    assert "exit code 3" in caplog.records[-1].getMessage()


def test_settings():
    assert 1 <= default_workers() <= 32
    if hasattr(os, "sched_getaffinity"):
        assert default_workers() == min(32, len(os.sched_getaffinity(0)))
    resolved = host_settings(None, None, None)
    assert resolved["workers"] == default_workers() and resolved["sample_timeout_s"] is None
    assert host_settings(0, 3, 5)["sample_timeout_s"] == 5.0
    with pytest.raises(ValueError, match="workers must be >= 0"):
        host_settings(-1, None, None)
    with pytest.raises(TypeError, match="num_threads must be an int"):
        host_settings(None, 1.5, None)
    with pytest.raises(ValueError, match="sample_timeout_s must be > 0"):
        host_settings(None, None, 0)


# -- review: defects reproduced first -----------------------------------------------------------


def _result_within(batch, seconds: float):
    """batch.result() on a helper thread: ("ok", Prepared) / ("error", exc), or "hung"."""
    import threading

    out = []

    def wait() -> None:
        try:
            out.append(("ok", batch.result()))
        except Exception as e:
            out.append(("error", e))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else "hung"


def test_close_racing_a_submit_never_leaves_its_batch_waiting_for_ever(monkeypatch):
    # Another thread closes the pool while submit() is still pickling the batch's inputs (an
    # engine replaced by get_engine, Engine.close on another thread): the batch must not be
    # queued into a pool whose manager is gone.
    pool = WorkerPool(1, threads=1, sample_timeout_s=10.0)
    pickle_input = pool._payload

    def close_meanwhile(*args):
        payload = pickle_input(*args)
        pool.close()
        return payload

    monkeypatch.setattr(pool, "_payload", close_meanwhile)
    with pytest.raises(RuntimeError, match="closed"):
        batch = pool.submit([_jpeg(0)], [0], image_size=SIZE)
        assert _result_within(batch, 5.0) != "hung"


@pytest.mark.parametrize("workers", [1, 0])
def test_closing_the_pool_under_a_waiting_batch_raises_instead_of_failing_its_samples(workers):
    # Samples cut off by close() did not fail: blaming them would drop good inputs under
    # on_error="skip" (counted as bad images) or raise an error naming an innocent key.
    pool = WorkerPool(workers, threads=1, sample_timeout_s=30.0)
    pool.submit([_jpeg(0)], [0], image_size=SIZE).result()  # started and warm
    busy = pool.submit([slow_jpeg(400), _jpeg(1), _jpeg(2)], ["slow", "b", "c"], image_size=SIZE)
    time.sleep(0.3)
    pool.close()
    outcome = _result_within(busy, 20.0)
    assert outcome != "hung"
    kind, value = outcome
    assert kind == "error" and isinstance(value, RuntimeError), outcome
    assert "closed" in str(value)


def test_workers_resolve_relative_paths_in_the_callers_current_directory(pool, tmp_path):
    # Workers are reused across calls; a relative path must mean what it means to the caller
    # now, not where the caller stood when the workers started.
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 1), (second, 2)):
        folder.mkdir()
        (folder / "photo.jpg").write_bytes(_jpeg(seed))
    expected = [load_image(folder / "photo.jpg", SIZE) for folder in (first, second)]
    before = os.getcwd()
    try:
        for folder, pixels in zip((first, second), expected, strict=True):
            os.chdir(folder)
            prepared = pool.submit(["photo.jpg", {"path": "photo.jpg", "bytes": None}],
                                   [0, 1], image_size=SIZE).result()
            assert prepared.ok.all(), prepared.reasons
            assert np.array_equal(prepared.pixels, np.stack([pixels, pixels]))
    finally:
        os.chdir(before)
