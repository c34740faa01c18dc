"""convert.py: one shard, exactly once: the commit protocol, resume checks, failures, callbacks."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
from conftest import FullDisk
from test_wds import BATCH, check_outputs, make_samples, read_tar, snapshot, write_tar

from vqgan_datasets import storage
from vqgan_datasets.jobs import convert
from vqgan_datasets.jobs import shards as vqshards
from vqgan_datasets.options import EncodeOptions
from vqgan_datasets.pipeline.engine import get_engine


def test_tarfile_format_details(model, tmp_path):
    """Outputs are plain tars that tarfile and webdataset both read: one member per field."""
    sample = make_samples()[0]
    url = write_tar(tmp_path / "one.tar", [sample])
    vqshards.tokenize_shards(url, tmp_path / "o", model=model, batch_size=BATCH, progress=False)
    with tarfile.open(tmp_path / "o" / "one.tar") as tar:
        assert sorted(tar.getnames()) == ["sample_0000.json", "sample_0000.txt",
                                          "sample_0000.vqgan.npy"]


def test_convert_shard_is_the_one_commit(model, shards, samples, reference, tmp_path):
    """convert_shard alone (what a Ray worker calls): engine or model, with or without a listing."""
    root, urls = shards
    target = str(tmp_path / "one.tar")
    engine = get_engine(model, batch_size=BATCH)
    options = convert.ShardOptions(batch_size=BATCH)
    seen = []
    report = convert.convert_shard(urls[1], target, model=engine, options=options,
                                    progress=seen.append)
    assert report.status == "written" and report.encoded == 3 and sum(seen) == 3
    check_outputs([target], samples[4:7], reference)
    before = snapshot(tmp_path)

    # A fresh look (no listing) finds it finished and leaves it alone; so does a model path.
    again = convert.convert_shard(urls[1], target, model=model, options=options)
    assert again.status == "finished" and again.encoded == 3
    assert snapshot(tmp_path) == before

    # With a listing, leftovers of an interrupted attempt go; overwrite redoes the shard.
    (tmp_path / ".one.tar.tmp-123-deadbeef").write_bytes(b"partial")
    redo = convert.ShardOptions(batch_size=BATCH, overwrite=True)
    report = convert.convert_shard(urls[1], target, model=engine, options=redo,
                                    listing=set(os.listdir(tmp_path)))
    assert report.status == "written"
    assert sorted(os.listdir(tmp_path)) == ["one.stats.json", "one.tar"]
    check_outputs([target], samples[4:7], reference)

    with pytest.raises(ValueError, match="on_error"):
        convert.ShardOptions(on_error="ignore")
    with pytest.raises(ValueError, match="image_key"):
        convert.ShardOptions(image_key=";")


def test_convert_shard_callbacks_and_the_raise_policy(model, samples, tmp_path):
    """on_sample_written sees every sample written; on_error="raise" fails the shard, naming
    the sample, writes nothing and leaves nothing behind (a rerun retries it)."""
    good = write_tar(tmp_path / "good.tar", samples[:3])
    (tmp_path / "o").mkdir()
    seen = []
    report = convert.convert_shard(good, str(tmp_path / "o" / "good.tar"), model=model,
                                   options=EncodeOptions(batch_size=BATCH),
                                   on_sample_written=lambda url, n: seen.append((url, n)))
    assert report.status == "written" and seen == [(good, 1), (good, 2), (good, 3)]

    broken = dict(samples[0], __key__="broken", jpg=samples[0]["jpg"][:100])
    bad = write_tar(tmp_path / "bad.tar", [samples[1], broken, samples[2]])
    target = str(tmp_path / "o" / "bad.tar")
    report = convert.convert_shard(bad, target, model=model,
                                   options=EncodeOptions(batch_size=BATCH))
    assert report.status == "failed" and "'broken'" in report.error and bad in report.error
    assert report.errors[0]["key"] == "broken" and report.failed == 1
    assert sorted(os.listdir(tmp_path / "o")) == ["good.stats.json", "good.tar"]
    skipped = convert.convert_shard(bad, target, model=model,
                                    options=EncodeOptions(batch_size=BATCH, on_error="skip"))
    assert skipped.status == "written" and (skipped.encoded, skipped.skipped) == (2, 1)


def test_the_shard_names_stay_importable_from_shards():
    for name in ("convert_shard", "ShardOptions"):
        assert getattr(vqshards, name) is getattr(convert, name)


# ------------------------------------------------------------------------------ hostile input


def _hostile_tar(path, samples, big: bytes) -> str:
    """Three good samples among links, names without an extension or with `..`/absolute paths,
    a key that comes back later, and a member above the size limit."""

    def add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.size, info.type, info.linkname = len(data), kind, link
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples[:3]:
            for field in ("jpg", "json", "txt"):
                add(tar, f"{sample['__key__']}.{field}", sample[field])
        add(tar, "link.jpg", kind=tarfile.SYMTYPE, link=samples[0]["__key__"] + ".jpg")
        add(tar, "hard.jpg", kind=tarfile.LNKTYPE, link=samples[0]["__key__"] + ".jpg")
        add(tar, "NOTES", b"no extension")
        add(tar, "../escape.jpg", samples[0]["jpg"])
        add(tar, "/etc/abs.jpg", samples[0]["jpg"])
        add(tar, samples[0]["__key__"] + ".png", b"a later group with an earlier key")
        add(tar, "huge.jpg", big)
        add(tar, "huge.txt", b"its caption")
    return str(path)


def test_every_tar_member_is_a_sample_or_counted_in_the_stats(model, samples, reference,
                                                              tmp_path):
    """Issue 15.7 and 15.2 through a conversion: 17 members, 3 samples (9 fields) written, the
    rest counted by reason in the stats file, the report and the manifest; the output holds
    safe names only and one sample per key; the big member is refused by its header."""
    jpegs = [s for s in samples if "jpg" in s]
    url = _hostile_tar(tmp_path / "hostile.tar", jpegs, b"\xff" * 300_000)
    out = tmp_path / "out"
    manifest = vqshards.tokenize_shards(
        [url], out, model=model,
        options=convert.ShardOptions(batch_size=BATCH, on_error="skip",
                                     max_member_bytes=200_000),
        progress=False)
    report = manifest.shards[0]
    assert report.status == "written" and (report.samples_in, report.encoded) == (4, 3)
    assert report.skipped == 1  # "huge": its caption alone, no image
    expected = {"not a regular file": 2, "no extension": 1, "unsafe name": 2,
                "duplicate key": 1, "too large": 1}
    assert report.members_skipped == expected and manifest.members_skipped == expected
    stats = json.loads((out / "hostile.stats.json").read_text())
    assert stats["members_skipped"] == expected and stats["members_skipped_not_listed"] == 0
    listed = {m["name"]: m["reason"] for m in stats["members_skipped_list"]}
    assert listed["../escape.jpg"] == "unsafe name" and listed["huge.jpg"] == "too large"
    # Every member: the written samples' fields, the skipped ones, and "huge" (a counted sample).
    assert 3 * report.encoded + sum(expected.values()) + 1 == 17
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["members_skipped"] == expected
    with tarfile.open(out / "hostile.tar") as tar:
        names = tar.getnames()
    assert all(not n.startswith(("/", "..")) and "/../" not in n for n in names)
    keys = [s["__key__"] for s in read_tar(out / "hostile.tar")]
    assert keys == [s["__key__"] for s in jpegs[:3]]
    check_outputs([out / "hostile.tar"], jpegs[:3], reference)
    with pytest.raises(ValueError, match="max_member_bytes"):
        convert.ShardOptions(max_member_bytes=-1)


def test_a_damaged_shard_fails_whole_naming_the_damage(model, samples, tmp_path):
    url = write_tar(tmp_path / "in.tar", samples[:3])
    whole = (tmp_path / "in.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) * 3 // 4])
    target = str(tmp_path / "o" / "cut.tar")
    (tmp_path / "o").mkdir()
    report = convert.convert_shard(str(tmp_path / "cut.tar"), target, model=model,
                                   options=EncodeOptions(batch_size=BATCH, on_error="skip"))
    assert report.status == "failed" and "at tar byte" in report.error
    assert "samples read before it, none written" in report.error
    assert report.members_skipped.get("truncated", 0) >= 1
    assert os.listdir(tmp_path / "o") == []  # nothing of it, no claim either
    assert url


def test_a_key_longer_than_a_ustar_name_is_written(model, samples, tmp_path):
    long_key = "k" * 300
    url = write_tar(tmp_path / "long.tar", [dict(samples[0], __key__=long_key)])
    report = convert.convert_shard(url, str(tmp_path / "long-out.tar"), model=model,
                                   options=EncodeOptions(batch_size=BATCH))
    assert report.status == "written"
    assert [s["__key__"] for s in read_tar(tmp_path / "long-out.tar")] == [long_key]


def test_input_fields_are_copied_byte_for_byte(model, samples, reference, tmp_path):
    """Fields pass through as read: webdataset's encoder gzipped a ".gz" field a second time,
    and raised on a field starting with "_" ("metadata must be of string type"), which
    stopped the whole run without naming the shard."""
    sample = next(s for s in samples if "jpg" in s)
    extra = {"json.gz": gzip.compress(b'{"a": 1}'), "_meta": b"private bytes"}
    url = str(tmp_path / "in.tar")
    with tarfile.open(url, "w") as tar:
        for field, data in {**sample, **extra}.items():
            if field != "__key__":
                info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    target = str(tmp_path / "in-out.tar")
    report = convert.convert_shard(url, target, model=model,
                                   options=EncodeOptions(batch_size=BATCH))
    assert report.status == "written" and report.encoded == 1
    with tarfile.open(target) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sample["__key__"]
    assert members[f"{key}.json.gz"] == extra["json.gz"]
    assert members[f"{key}._meta"] == extra["_meta"]
    assert sorted(members) == sorted(f"{key}.{f}" for f in
                                     ("json", "txt", "json.gz", "_meta", "vqgan.npy"))
    check_outputs([target], [sample], reference)


# ------------------------------------------------------------------------------ one writer


HOLD_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from vqgan_datasets.jobs import claims
    from vqgan_datasets import storage
    target = sys.argv[1]
    held = claims.claim(claims.claim_path(target), {"run": "first"})
    folder, name = storage.split(target)
    temp = pathlib.Path(folder) / f"{storage.temp_prefix(name)}{storage.owner_tag()}-live"
    temp.write_bytes(b"half a shard")
    print(temp, flush=True)
    time.sleep(600)
""")


def test_a_shard_another_live_writer_holds_is_left_alone(model, samples, reference, tmp_path):
    """Issue 15.5: a second run's cleanup deleted the first run's temporary file. A shard
    claimed by a live process is not touched (wait=False reports who holds it); once that
    process is dead, its claim is taken over at once and its leftovers removed."""
    url = write_tar(tmp_path / "in.tar", samples[:3])
    out = tmp_path / "o"
    out.mkdir()
    target = str(out / "in.tar")
    first = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, target],
                             stdout=subprocess.PIPE, text=True)
    try:
        live_temp = first.stdout.readline().strip()
        options = EncodeOptions(batch_size=BATCH)
        report = convert.convert_shard(url, target, model=model, options=options, wait=False,
                                       listing=set(os.listdir(out)))
        assert report.status == "claimed" and f"pid {first.pid}" in report.error
        assert os.path.exists(live_temp) and not os.path.exists(target)
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    report = convert.convert_shard(url, target, model=model, options=options,
                                   listing=set(os.listdir(out)))
    assert report.status == "written" and not os.path.exists(live_temp)
    assert sorted(os.listdir(out)) == ["in.stats.json", "in.tar"]
    check_outputs([target], samples[:3], reference)


def test_enospc_while_writing_a_shard_names_it(model, samples, tmp_path, monkeypatch):
    url = write_tar(tmp_path / "in.tar", samples[:3])
    real_open = open
    monkeypatch.setattr(storage, "open", lambda *a, **k: FullDisk(real_open(*a, **k)),
                        raising=False)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OSError) as info:
        convert.convert_shard(url, str(out / "in.tar"), model=model,
                              options=EncodeOptions(batch_size=BATCH))
    assert info.value.errno == errno.ENOSPC and str(out / "in.tar") in str(info.value)
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------ reproducible, checked


def _raw_headers(path) -> list[bytes]:
    """The typeflag of every header block of a tar, read off the bytes."""
    data = path.read_bytes()
    flags, offset = [], 0
    while offset + 512 <= len(data) and data[offset:offset + 512] != bytes(512):
        header = data[offset:offset + 512]
        flags.append(header[156:157])
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        offset += 512 + -(-size // 512) * 512
    return flags


def test_token_shards_are_byte_identical_and_record_their_size_and_hash(model, samples,
                                                                        tmp_path):
    """Plain ustar members (no PAX header per member), fixed mtime: two runs of the same
    input and settings write the same bytes; each stats file records them."""
    import hashlib

    url = write_tar(tmp_path / "in.tar", samples[:3])
    for out in ("a", "b"):
        vqshards.tokenize_shards(url, tmp_path / out, model=model, batch_size=BATCH,
                                 progress=False)
    first, second = (tmp_path / "a" / "in.tar").read_bytes(), (tmp_path / "b" / "in.tar").read_bytes()
    assert first == second
    assert set(_raw_headers(tmp_path / "a" / "in.tar")) == {b"0"}
    with tarfile.open(tmp_path / "a" / "in.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    stats = json.loads((tmp_path / "a" / "in.stats.json").read_text())
    assert stats["output_bytes"] == len(first)
    assert stats["output_sha256"] == hashlib.sha256(first).hexdigest()


def test_a_finished_shard_damaged_afterwards_is_converted_again(model, samples, caplog,
                                                                 tmp_path):
    """Size always checked; the hash when the tar changed after its stats file (or verify)."""
    url = write_tar(tmp_path / "in.tar", samples[:3])
    out = tmp_path / "o"
    target, stats = out / "in.tar", out / "in.stats.json"

    def run(**kwargs):
        return vqshards.tokenize_shards(url, out, model=model, batch_size=BATCH, progress=False,
                                        **kwargs)

    run()
    good = target.read_bytes()
    assert run().finished  # untouched: trusted

    target.write_bytes(good[: len(good) // 2])  # truncated
    manifest = run()
    assert [s.status for s in manifest.shards] == ["written"] and target.read_bytes() == good
    assert "truncated" in caplog.text

    damaged = bytearray(good)
    damaged[700] ^= 0xFF  # same size, inside the first token member
    target.write_bytes(bytes(damaged))
    assert [s.status for s in run().shards] == ["written"] and target.read_bytes() == good

    # Damage that kept the old mtime is found when asked.
    times = os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns
    target.write_bytes(bytes(damaged))
    os.utime(target, ns=times)
    assert [s.status for s in run().shards] == ["finished"]
    assert [s.status for s in run(verify=True).shards] == ["written"]
    assert target.read_bytes() == good and stats.is_file()
