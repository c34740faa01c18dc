"""distributed.py and multi-host tokenize_shards: real JAX multi-process runs on this machine.

Two local processes join through `jax.distributed.initialize("127.0.0.1:PORT", 2, i)` with two
CPU devices each (process_count 2, device_count 4), as two hosts of a pod would. Every child
runs under a deadline: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from test_wds import check_outputs

from vqgan_datasets.jobs import distributed

DEADLINE = 120  # seconds for any one multi-host run; they take ~10 s here

HOST_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys, time

    from vqgan_datasets.jobs import distributed, shards
    from vqgan_datasets.models.modeling import VQModel

    port, index, inputs, out, model_dir, stall = sys.argv[1:7]
    index = int(index)
    assert distributed.initialize() is False  # nothing asked for: nothing joined
    assert distributed.initialize(f"127.0.0.1:{port}", 2, index, heartbeat_timeout_seconds=6)
    assert distributed.initialize(f"127.0.0.1:{port}", 2, index)  # a second call: no-op

    hang = None
    if stall != "-" and index == 1:
        def hang(url, written):
            # Freeze inside this host's shard after one sample is written, until killed.
            pathlib.Path(stall).touch()
            time.sleep(600)

    model = VQModel.from_pretrained(model_dir)
    manifest = shards.tokenize_shards(inputs.split(","), out, model=model, batch_size=2,
                                      progress=False, on_sample_written=hang)
    distributed.barrier("test:after", timeout_s=60)  # the coordination-service barrier too
    import jax
    print(json.dumps({
        "process": [jax.process_index(), jax.process_count(), jax.device_count()],
        "path": manifest.path,
        "shards": [[s.url, s.status] for s in manifest.shards],
    }))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def start_hosts(tmp_path, inputs, out, model_dir, stall="-") -> list[subprocess.Popen]:
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(i), ",".join(inputs), str(out),
             str(model_dir), str(stall)],
            env=host_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def finish(processes, deadline=DEADLINE) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; kills them all if the deadline passes."""
    end = time.monotonic() + deadline
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a multi-host run did not end within {deadline} s (a hang)")
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_hosts(tmp_path, inputs, out, model_dir) -> list[dict]:
    results = finish(start_hosts(tmp_path, inputs, out, model_dir))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]


# ------------------------------------------------------------------------------ in one process


def test_process_split_and_single_process_defaults():
    assert distributed.process_split(range(10), 1, 3) == [1, 4, 7]
    assert distributed.process_split("abcde", 0, 2) == ["a", "c", "e"]
    assert distributed.process_split([1, 2], 2, 4) == []  # more processes than items
    assert distributed.process_split([1, 2, 3]) == [1, 2, 3]  # JAX: process 0 of 1
    for index, count in ((2, 2), (-1, 2), (0, 0), (True, 2)):
        with pytest.raises(ValueError, match="process index"):
            distributed.process_split([1], index, count)
    distributed.barrier("one process: returns at once")
    distributed.barrier("with a timeout too", timeout_s=1)
    assert distributed.initialize() is False  # nothing asked for: nothing joined


def test_split_dataset_gives_each_process_its_rows(monkeypatch):
    from datasets import Dataset

    ds = Dataset.from_dict({"i": list(range(10))})
    assert distributed.split_dataset(ds)["i"] == list(range(10))
    monkeypatch.setattr(distributed, "process_count", lambda: 2)
    parts = []
    for index in range(2):
        monkeypatch.setattr(distributed, "process_index", lambda index=index: index)
        parts.append(distributed.split_dataset(ds)["i"])
    assert parts == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    iterable = distributed.split_dataset(ds.to_iterable_dataset(num_shards=2))
    assert [row["i"] for row in iterable] == [5, 6, 7, 8, 9]


def test_auto_joins_nothing_outside_a_cluster():
    """auto=True lets JAX detect a pod/SLURM/MPI/Kubernetes job; here there is none."""
    env = {k: v for k, v in host_env().items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "JAX_COORDINATOR",
                                "TPU_", "MEGASCALE_"))}
    code = ("from vqgan_datasets.jobs import distributed; import jax\n"
            "assert distributed.initialize(auto=True) is False\n"
            "assert jax.process_count() == 1 and not jax.distributed.is_initialized()\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------ two processes


def test_two_hosts_write_disjoint_shards_and_one_manifest(shards, samples, reference,
                                                          tiny_model_dir, tmp_path):
    root, urls = shards
    out = tmp_path / "out"
    first, second = run_hosts(tmp_path, urls, out, tiny_model_dir)
    assert first["process"] == [0, 2, 4] and second["process"] == [1, 2, 4]
    # Shard i to process i % 2; process 0 returns the merged manifest, process 1 its own.
    assert second["shards"] == [[urls[1], "written"]]
    assert first["shards"] == [[u, "written"] for u in urls]
    assert first["path"] == second["path"] == str(out / "manifest.json")

    names = sorted(os.listdir(out))
    assert names == sorted([f"shard-{i:05d}{ext}" for i in range(3)
                            for ext in (".tar", ".stats.json")] + ["manifest.json"])
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["process_count"] == 2 and manifest["shards_written"] == 3
    assert manifest["totals"] == {"samples_in": 10, "encoded": 10, "skipped": 0, "failed": 0}
    assert [s["url"] for s in manifest["shards"]] == urls

    # A host with no shard at all still meets the others at the barriers.
    out = tmp_path / "one"
    first, second = run_hosts(tmp_path, urls[:1], out, tiny_model_dir)
    assert second["shards"] == [] and first["shards"] == [[urls[0], "written"]]
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.stats.json",
                                       "shard-00000.tar"]


def test_a_host_killed_mid_shard_then_restarted_writes_every_sample_once(
        shards, samples, reference, tiny_model_dir, tmp_path):
    root, urls = shards
    out = tmp_path / "out"
    marker = tmp_path / "host-1-in-its-shard"
    hosts = start_hosts(tmp_path, urls, out, tiny_model_dir, stall=marker)
    try:
        end = time.monotonic() + DEADLINE
        while not marker.exists():
            assert all(p.poll() is None for p in hosts), "a host ended before the kill"
            assert time.monotonic() < end, "host 1 never reached its shard"
            time.sleep(0.05)
        os.kill(hosts[1].pid, signal.SIGKILL)
        # The survivor must not wait for ever: JAX's coordination service ends it once the
        # dead host's heartbeats stop (heartbeat_timeout_seconds=6 in the script).
        (code0, _, err0), (code1, _, _) = finish(hosts, deadline=60)
    finally:
        for p in hosts:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert code1 == -signal.SIGKILL and code0 != 0, err0[-2000:]
    left = sorted(os.listdir(out))
    assert "shard-00001.stats.json" not in left and "shard-00001.tar" not in left
    assert any(n.startswith(".shard-00001.tar.tmp-") for n in left)  # the killed attempt
    assert "manifest.json" not in left

    # The whole job restarted, as a scheduler would: it resumes, each sample exactly once.
    first, second = run_hosts(tmp_path, urls, out, tiny_model_dir)
    assert second["shards"] == [[urls[1], "written"]]
    assert dict(first["shards"])[urls[1]] == "written"
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files, no parts
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["encoded"] == 10 and manifest["shards_failed"] == 0


def test_example_script_on_one_host(shards, samples, reference, tiny_model_dir, tmp_path):
    import runpy

    root, urls = shards
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multihost_tokenize.py")
    main = runpy.run_path(path, run_name="example")["main"]
    # No --coordinator, no --multihost auto: one process, nothing joined.
    assert main(["--model", str(tiny_model_dir), "--input", urls[0], "--output",
                 str(tmp_path / "out"), "--batch-size", "2", "--no-progress"]) == 0
    check_outputs([tmp_path / "out" / "shard-00000.tar"], samples[:4], reference)
    assert os.path.exists(tmp_path / "out" / "manifest.json")
