"""Worker processes: a task protocol over a socket with array results in shared memory (or
pickled when they do not fit), errors as reasons, how a worker ended; workers are exec'd fresh
interpreters without JAX, and exit with their parent (interrupted or killed)."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive
from PIL import Image

from vqgan_datasets.pipeline.workerproc import SLOT_BYTES, SLOTS, WorkerProcess
from vqgan_datasets.pipeline.workers import WorkerPool

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _task(*args) -> bytes:
    return pickle.dumps(args)


def test_protocol_arena_pickled_results_and_errors():
    worker = WorkerProcess("numpy:full")
    try:
        assert worker.receive() is None and worker.ready  # the ready message, once imported
        # Two tasks queued at once take the two arena slots; small uint8 arrays come back there.
        # The caller keeps `inflight` (the pool does): a slot in use is not given out again.
        for i in range(SLOTS):
            worker.inflight.append((i, worker.send(i, _task((4, 5, 3), i + 7, "uint8"), 60)))
        assert sorted(slot for _, slot in worker.inflight) == list(range(SLOTS))
        for i in range(SLOTS):
            task_id, result, error = worker.receive()
            worker.inflight.popleft()
            assert (task_id, error) == (i, None)
            assert result.shape == (4, 5, 3) and (result == i + 7).all()
            del result  # a view into the arena: copied or dropped at once
        # Too big for a slot, or not uint8: pickled through the socket instead.
        assert worker.send(5, _task(SLOT_BYTES + 1, 1, "uint8"), SLOT_BYTES + 1) == -1
        assert worker.receive()[1].nbytes == SLOT_BYTES + 1
        worker.send(6, _task(3, 0.5), 24)
        assert worker.receive()[1].tolist() == [0.5] * 3
        # An exception in the target comes back as its reason.
        worker.send(7, _task((2, 2), "x", "no such dtype"), 4)
        task_id, result, error = worker.receive()
        assert task_id == 7 and result is None and error.startswith("TypeError: ")
    finally:
        worker.stop(kill=False)  # it reads end-of-file and exits by itself
    assert worker.proc.returncode == 0


def test_how_a_worker_ended():
    worker = WorkerProcess("operator:add")
    try:
        assert worker.receive() is None
        worker.send(0, _task(2, 3), 0)
        assert worker.receive() == (0, 5, None)
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises((EOFError, OSError)):
            worker.receive()
        assert worker.death() == f"worker process {worker.pid} died (killed by SIGKILL)"
    finally:
        worker.stop(kill=True)


@needs_proc
def test_workers_are_fresh_interpreters_without_jax():
    with WorkerPool(2, threads=2, sample_timeout_s=60.0) as pool:
        pool.submit([_jpeg(i) for i in range(8)], list(range(8)), image_size=SIZE).result()
        for pid in pool.pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            assert b"vqgan_datasets.pipeline.workerproc import _serve" in cmdline  # exec'd, not forked
            deadline = time.monotonic() + 60  # a worker that got no sample may still import
            while "PIL" not in (maps := Path(f"/proc/{pid}/maps").read_text()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert "PIL" in maps and "jaxlib" not in maps and "xla_extension" not in maps
            # OpenCV (IBQ's resize) keeps to one thread per worker instead of one per core.
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"OPENCV_FOR_THREADS_NUM=1" in environ


PARENT_SCRIPT = textwrap.dedent(
    """
    import io, itertools, json, sys, time
    import numpy as np
    from PIL import Image
    from vqgan_datasets.pipeline.workers import WorkerPool

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, "JPEG")
    pool = WorkerPool(2, threads=1, sample_timeout_s=60.0)
    for n, (keys, _) in enumerate(pool.stream(itertools.repeat(buffer.getvalue()), None,
                                              batch_size=4, ahead=2, image_size=32)):
        if n == 2:
            print(json.dumps(pool.pids), flush=True)
        time.sleep(0.01)
    """
)


@needs_proc
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_orphans_when_the_parent_is_interrupted_or_killed(how, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True)
    try:
        pids = json.loads(parent.stdout.readline() or "null")
        assert pids and all(alive(pid) for pid in pids), parent.stderr.read()[-2000:]
        parent.send_signal(how)
        code = parent.wait(timeout=30)
        assert code == -how  # Python dies of SIGINT after the KeyboardInterrupt unwound
        if how == signal.SIGINT:
            assert "KeyboardInterrupt" in parent.stderr.read()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
