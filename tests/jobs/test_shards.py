"""shards.py: whole runs (tokenize_shards), resume after a kill, failures, fsspec and pipe URLs,
splits across processes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import numpy as np
import pytest
import webdataset as wds
from test_wds import (
    BATCH,
    check_outputs,
    read_tar,
    snapshot,
    tokens_of,
    write_tar,
)
from webdataset.gopen import gopen_schemes

from vqgan_datasets.handle import ModelHandle
from vqgan_datasets.jobs import distributed
from vqgan_datasets.jobs import shards as vqshards
from vqgan_datasets.metadata import METADATA_KEY
from vqgan_datasets.models.modeling import VQModel


def test_tokenize_shards_writes_resumable_outputs(model, shards, samples, reference, tmp_path):
    root, urls = shards
    out_dir = tmp_path / "out"
    pattern = str(root / "shard-{00000..00002}.tar")
    manifest = vqshards.tokenize_shards(pattern, out_dir, model=model, batch_size=BATCH,
                                     progress=False)
    names = [f"shard-{i:05d}.tar" for i in range(3)]
    assert sorted(os.listdir(out_dir)) == sorted(
        names + [n.replace(".tar", ".stats.json") for n in names] + ["manifest.json"]
    )
    check_outputs([out_dir / n for n in names], samples, reference)
    assert [s.status for s in manifest.shards] == ["written"] * 3
    assert manifest.totals == {"samples_in": 10, "encoded": 10, "skipped": 0, "failed": 0}

    stats = json.loads((out_dir / "shard-00001.stats.json").read_text())
    assert stats["url"] == urls[1] and stats["samples_in"] == 3 and stats["encoded"] == 3
    assert stats[METADATA_KEY]["grid"] == [16, 16]
    assert stats[METADATA_KEY]["weights_digest"] == model.weights_digest
    on_disk = json.loads((out_dir / "manifest.json").read_text())
    assert on_disk["shards_written"] == 3 and on_disk["totals"]["encoded"] == 10

    before = snapshot(out_dir)
    again = vqshards.tokenize_shards(pattern, out_dir, model=model, batch_size=BATCH,
                                  progress=False)
    assert [s.status for s in again.shards] == ["finished"] * 3 and not again.written
    assert again.totals == manifest.totals
    assert snapshot(out_dir) == before  # nothing rewritten

    # A finished shard made by other weights is never silently mixed in.
    other = VQModel(model.config, {**model.params}, dtype=model.dtype)
    other._digest = "sha256:" + "0" * 64
    with pytest.raises(ValueError, match="another tokenizer"):
        vqshards.tokenize_shards(pattern, out_dir, model=other, progress=False)
    with pytest.raises(ValueError, match="other settings .keep_image"):
        vqshards.tokenize_shards(pattern, out_dir, model=model, keep_image=True, progress=False)
    assert snapshot(out_dir) == before

    # Patterns, kept images and overwrite.
    manifest = vqshards.tokenize_shards(urls[:1], str(tmp_path / "p" / "tok-{shard}-{index:03d}.tar"),
                                     model=model, batch_size=BATCH, keep_image=True,
                                     progress=False, overwrite=True)
    assert manifest.shards[0].output.endswith("tok-shard-00000-000.tar")
    assert os.path.exists(tmp_path / "p" / "tok-shard-00000-000.stats.json")
    check_outputs([manifest.shards[0].output], samples[:4], reference, keep_image=True)


def test_tokenize_shards_bad_samples_empty_and_truncated_shards(model, samples, reference,
                                                                 tmp_path):
    good = samples[0]
    bad = [
        good,
        {"__key__": "broken", "jpg": good["jpg"][: len(good["jpg"]) // 3], "txt": b"cut"},
        {"__key__": "caption_only", "txt": b"no picture"},
        samples[2],
    ]
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad_url = write_tar(inputs / "bad.tar", bad)
    empty_url = write_tar(inputs / "empty.tar", [])
    whole = (inputs / "bad.tar").read_bytes()
    (inputs / "cut.tar").write_bytes(whole[: len(whole) // 2])
    cut_url = str(inputs / "cut.tar")
    out = tmp_path / "out"

    manifest = vqshards.tokenize_shards([bad_url, empty_url, cut_url], out, model=model,
                                        batch_size=BATCH, on_error="skip", progress=False)
    assert [s.status for s in manifest.shards] == ["written", "written", "failed"]
    written = read_tar(out / "bad.tar")
    assert [s["__key__"] for s in written] == ["sample_0000", "sample_0002"]
    np.testing.assert_array_equal(tokens_of(written[1]), reference["sample_0002"])
    stats = json.loads((out / "bad.stats.json").read_text())
    assert (stats["samples_in"], stats["encoded"], stats["skipped"]) == (4, 2, 2)
    reasons = {e["key"]: e["reason"] for e in stats["errors"]}
    assert set(reasons) == {"broken", "caption_only"}
    assert "looked for .jpg" in reasons["caption_only"]
    assert read_tar(out / "empty.tar") == []
    assert json.loads((out / "empty.stats.json").read_text())["samples_in"] == 0
    failed = manifest.failed_shards[0]
    assert cut_url in failed.error and "cut.tar" not in os.listdir(out)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert manifest.totals["skipped"] == 2

    # A rerun retries only the shard that did not finish.
    again = vqshards.tokenize_shards([bad_url, empty_url, cut_url], out, model=model,
                                     batch_size=BATCH, on_error="skip", progress=False)
    assert [s.status for s in again.shards] == ["finished", "finished", "failed"]

    null = vqshards.tokenize_shards([bad_url], tmp_path / "null", model=model, batch_size=BATCH,
                                 on_error="null", progress=False)
    assert null.shards[0].failed == 2
    written = read_tar(tmp_path / "null" / "bad.tar")
    assert [s["__key__"] for s in written] == [s["__key__"] for s in bad]
    assert "vqgan.npy" not in written[1] and written[1]["vqgan_error"]
    assert written[1]["txt"] == b"cut"

    # on_error="raise" (the default): the shard fails, naming the sample, and the run goes on;
    # nothing of it is written, so a rerun retries it. An unreadable shard fails the same way.
    raised = vqshards.tokenize_shards([bad_url, empty_url], tmp_path / "raise", model=model,
                                      batch_size=BATCH, progress=False)
    assert [s.status for s in raised.shards] == ["failed", "written"]
    failed = raised.shards[0]
    assert "'broken'" in failed.error and bad_url in failed.error
    assert [e["key"] for e in failed.errors] == ["broken"]
    assert not [n for n in os.listdir(tmp_path / "raise")
                if n.startswith("bad.") or ".tmp-" in n]
    cut = vqshards.tokenize_shards([cut_url], tmp_path / "raise", model=model, on_error="raise",
                                   progress=False)
    assert cut.shards[0].status == "failed" and "cut.tar" in cut.shards[0].error
    with pytest.raises(ValueError, match="on_error"):
        vqshards.tokenize_shards([cut_url], tmp_path / "raise", model=model, on_error="ignore")


def test_tokenize_shards_splits_shards_across_processes(model, shards, tmp_path):
    root, urls = shards
    owned = []
    for index in range(2):
        manifest = vqshards.tokenize_shards(urls, tmp_path, model=model, batch_size=BATCH,
                                         process_index=index, process_count=2, progress=False)
        owned.append({s.url for s in manifest.shards})
        assert os.path.basename(manifest.path) == f"manifest-{index:05d}-of-00002-worker-000.json"
    assert owned == [{urls[0], urls[2]}, {urls[1]}]
    # Without jax.distributed nothing coordinates the two: write_manifest merges afterwards.
    merged = vqshards.write_manifest(urls, tmp_path)
    assert merged.path == str(tmp_path / "manifest.json")
    assert [s.status for s in merged.shards] == ["finished"] * 3
    assert merged.totals["encoded"] == 10 and merged.spec["weights_digest"] == model.weights_digest
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["url"] for s in on_disk["shards"]] == urls
    assert distributed.assign(10, (1, 3), (0, 1)) == [1, 4, 7]
    assert distributed.assign(10, (1, 3), (1, 2)) == [4]  # then across DataLoader workers
    with pytest.raises(ValueError, match="process_index"):
        vqshards.tokenize_shards(urls, tmp_path, model=model, process_index=2, process_count=2)


def test_shard_options_overwrite_is_honoured(model, shards, tmp_path):
    """options=ShardOptions(overwrite=True) was silently ignored: tokenize_shards passed its
    own overwrite=False down, so nothing was redone."""
    root, urls = shards
    first = vqshards.tokenize_shards(urls[:1], tmp_path, model=model, batch_size=BATCH,
                                     progress=False)
    assert [s.status for s in first.shards] == ["written"]
    again = vqshards.tokenize_shards(
        urls[:1], tmp_path, model=model, progress=False,
        options=vqshards.ShardOptions(batch_size=BATCH, overwrite=True))
    assert [s.status for s in again.shards] == ["written"]


@pytest.mark.parametrize("index", [0, 1])
def test_a_multihost_process_that_raised_still_meets_every_barrier(model, shards, tmp_path,
                                                                   monkeypatch, index):
    """A process whose run raised skipped the second barrier, so its peers waited there for
    it; it must meet both, then re-raise. Process 0 still writes the manifest, naming why."""
    root, urls = shards
    met: list[str] = []
    monkeypatch.setattr(distributed, "barrier", met.append)

    def broken_run():
        raise RuntimeError("disk on fire")

    spec = ModelHandle.of(model).spec(None)
    with pytest.raises(RuntimeError, match="disk on fire"):
        vqshards._tokenize_multihost(broken_run, urls, str(tmp_path), spec, (index, 2),
                                     time.monotonic())
    assert met == ["vqgan_datasets.tokenize_shards:converted",
                   "vqgan_datasets.tokenize_shards:manifest"]
    if index == 0:
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["shards_failed"] == 3
        assert "process 0 failed: RuntimeError: disk on fire" in manifest["shards"][0]["error"]


def test_tokenize_shards_reads_fsspec_and_pipe_urls(model, shards, samples, reference, tmp_path,
                                                    monkeypatch):
    root, urls = shards
    memory = fsspec.filesystem("memory")
    memory.pipe("/wds-test/in/shard-00000.tar", pathlib.Path(urls[0]).read_bytes())
    inputs = ["memory://wds-test/in/shard-00000.tar", f"pipe:cat {urls[1]}",
              "file://" + urls[2]]
    manifest = vqshards.tokenize_shards(inputs, tmp_path, model=model, batch_size=BATCH,
                                     progress=False)
    assert [s.status for s in manifest.shards] == ["written"] * 3
    check_outputs([tmp_path / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)

    # fsspec output too (no fsync there; the temp + rename protocol is the same).
    manifest = vqshards.tokenize_shards(inputs[0], "memory://wds-test/out", model=model,
                                     batch_size=BATCH, progress=False)
    assert memory.exists("/wds-test/out/shard-00000.stats.json")
    assert [p.rsplit("/", 1)[-1] for p in memory.ls("/wds-test/out", detail=False)] == [
        "manifest.json", "shard-00000.stats.json", "shard-00000.tar"]
    written = list(vqshards.read_shard("memory://wds-test/out/shard-00000.tar"))
    assert [s["__key__"] for s in written] == [s["__key__"] for s in samples[:4]]

    # webdataset's own readers, once the scheme is registered (undone after the test).
    monkeypatch.setitem(gopen_schemes, "memory", None)
    vqshards.register_fsspec("memory")
    dataset = wds.WebDataset("memory://wds-test/out/shard-00000.tar", shardshuffle=False)
    assert [s["__key__"] for s in dataset] == [s["__key__"] for s in samples[:4]]
    memory.rm("/wds-test", recursive=True)


RESUME_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from vqgan_datasets.jobs import shards
    from vqgan_datasets.models.modeling import VQModel

    pattern, out, marker, model_dir = sys.argv[1:5]

    def stall(url, written):
        # Freeze inside the second shard, after it has written a sample, until killed.
        if url.endswith("shard-00001.tar"):
            pathlib.Path(marker).touch()
            time.sleep(600)

    shards.tokenize_shards(pattern, out, model=VQModel.from_pretrained(model_dir), batch_size=2,
                           progress=False, on_sample_written=stall)
""")


def test_resume_after_sigkill_writes_every_sample_once(model, shards, samples, reference,
                                                       tiny_model_dir, tmp_path):
    root, urls = shards
    out = tmp_path / "out"
    marker = tmp_path / "in-second-shard"
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    pattern = str(root / "shard-{00000..00002}.tar")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    process = subprocess.Popen(
        [sys.executable, str(script), pattern, str(out), str(marker), str(tiny_model_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before the kill: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "the run never reached the second shard"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    left = sorted(os.listdir(out))
    assert "shard-00000.stats.json" in left and "shard-00001.stats.json" not in left
    assert "shard-00001.tar" not in left and any(n.startswith(".shard-00001.tar.tmp-") for n in left)

    # The killed run also left its claim on the shard and its run record (dead: taken over).
    assert ".shard-00001.tar.claim" in left
    assert any(n.startswith(".vqgan-datasets-run-") for n in left)

    manifest = vqshards.tokenize_shards(pattern, out, model=model, batch_size=BATCH, progress=False)
    assert [s.status for s in manifest.shards] == ["finished", "written", "written"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no claim, no run record
    # Encoded on two devices before the kill, one after: the same tokens, each sample once.
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)


def test_example_script_runs(model, shards, tiny_model_dir, tmp_path, monkeypatch, caplog):
    import runpy

    root, urls = shards
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tokenize_webdataset.py")
    main = runpy.run_path(path, run_name="example")["main"]
    # The fixture's model, already compiled, stands in for the one the script would load.
    monkeypatch.setattr(VQModel, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    caplog.set_level("INFO", logger="vqgan_datasets")
    main(["--model", str(tiny_model_dir), "--input", str(root / "shard-{00000..00001}.tar"),
          "--output", str(tmp_path / "out"), "--batch-size", str(BATCH), "--preview", "2",
          "--no-progress"])
    assert sorted(os.listdir(tmp_path / "out"))[:2] == ["manifest.json", "shard-00000.stats.json"]
    assert "tokenize_shards: 2 shards written" in caplog.text


def _in_thread(function, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["manifest"] = function(**kwargs)
        except BaseException as e:  # reported by the test
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_two_runs_into_one_folder_share_it_and_other_weights_are_refused(
        model, shards, samples, reference, tmp_path):
    """Issue 15.5: a second run's cleanup deleted the first run's temporary file (the first
    died with FileNotFoundError), and two runs with other weights both exited 0, one
    overwriting the other. Now a run with the same settings takes the shards the other does
    not hold and waits for the rest: both end cleanly, every sample written once. A run with
    other weights is refused at start, naming both runs, and writes nothing."""
    root, urls = shards
    out = tmp_path / "out"
    first_in_1, second_in_2, go_on = threading.Event(), threading.Event(), threading.Event()

    def first_stalls(url, written):  # holds shard 1 (a temporary file live) until told
        if url.endswith("shard-00001.tar") and not first_in_1.is_set():
            first_in_1.set()
            assert go_on.wait(120)

    def second_goes(url, written):
        if url.endswith("shard-00002.tar"):
            second_in_2.set()
            go_on.set()

    first, one = _in_thread(vqshards.tokenize_shards, inputs=urls, output=out, model=model,
                            batch_size=BATCH, progress=False, on_sample_written=first_stalls)
    try:
        assert first_in_1.wait(120), one
        assert [n for n in os.listdir(out) if n.startswith(".shard-00001.tar.tmp-")]

        other = VQModel(model.config, {**model.params}, dtype=model.dtype)
        other._digest = "sha256:" + "0" * 64
        with pytest.raises(vqshards.OutputInUseError) as refused:
            vqshards.tokenize_shards(urls, out, model=other, progress=False)
        message = str(refused.value)
        assert "another live run" in message and "weights differ" in message
        assert message.count(f"pid {os.getpid()}") == 2 and "was refused" in message

        second, two = _in_thread(vqshards.tokenize_shards, inputs=urls, output=out,
                                 model=model, batch_size=1, workers=0, progress=False,
                                 on_sample_written=second_goes)
        second.join(300)
    finally:
        go_on.set()
        first.join(300)
    assert "error" not in one and "error" not in two, (one, two)
    assert second_in_2.is_set()
    statuses = [[s.status for s in r["manifest"].shards] for r in (one, two)]
    assert statuses == [["written", "written", "finished"], ["finished", "finished", "written"]]
    for result in (one, two):
        assert not result["manifest"].failed_shards
        assert result["manifest"].totals["encoded"] == 10
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_an_interrupted_run_writes_its_manifest_and_leaves_nothing_behind(model, shards,
                                                                          tmp_path):
    """KeyboardInterrupt (Ctrl-C, or SIGTERM as the CLI turns it) mid-run: the claim and
    temporary file of the shard in progress go, the manifest lists what was done, and
    RunInterrupted carries it; a rerun converts the rest."""
    root, urls = shards
    out = tmp_path / "o"

    def stop(url, samples_read):
        if url == urls[1]:
            raise KeyboardInterrupt

    with pytest.raises(vqshards.RunInterrupted) as info:
        vqshards.tokenize_shards(urls, out, model=model, batch_size=BATCH, progress=False,
                                 on_sample_written=stop)
    manifest = info.value.manifest
    assert isinstance(info.value, KeyboardInterrupt)
    assert [s.status for s in manifest.shards] == ["written", "failed", "failed"]
    assert "interrupted" in manifest.shards[1].error
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["shards_written"] == 1 and saved["shards_failed"] == 2
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.stats.json",
                                       "shard-00000.tar"]
    again = vqshards.tokenize_shards(urls, out, model=model, batch_size=BATCH, progress=False)
    assert (len(again.finished), len(again.written), len(again.failed_shards)) == (1, 2, 0)
