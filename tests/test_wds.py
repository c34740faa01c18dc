"""wds.py: stages over plain lists and webdataset pipelines, shard conversion, resume, failures."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data
from webdataset.gopen import gopen_schemes

from vqgan_datasets import wds as vqwds
from vqgan_datasets.images import load_image
from vqgan_datasets.metadata import METADATA_KEY
from vqgan_datasets.modeling import VQModel

S = 64  # tiny config resolution: 16x16 tokens
BATCH = 2  # per device: shards of 3 samples end on an incomplete batch

# (skimage image, width, height, format): real photos at several sizes and modes; the 300x200 one
# is large enough for JPEG draft decoding.
PHOTOS = [
    ("astronaut", 96, 96, "JPEG"),
    ("coffee", 150, 100, "JPEG"),
    ("chelsea", 90, 60, "PNG"),
    ("rocket", 64, 80, "JPEG"),
    ("camera", 70, 70, "JPEG"),
    ("cat", 300, 200, "JPEG"),
    ("immunohistochemistry", 100, 100, "JPEG"),
    ("hubble_deep_field", 120, 110, "JPEG"),
    ("astronaut", 64, 64, "PNG"),
    ("coffee", 81, 67, "JPEG"),
]
SHARD_SIZES = (4, 3, 3)


def image_bytes(name: str, width: int, height: int, fmt: str) -> bytes:
    image = Image.fromarray(getattr(data, name)()).resize((width, height), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_samples() -> list[dict]:
    samples = []
    for i, (name, w, h, fmt) in enumerate(PHOTOS):
        ext = "jpg" if fmt == "JPEG" else "png"
        samples.append({
            "__key__": f"sample_{i:04d}",
            ext: image_bytes(name, w, h, fmt),
            "txt": f"a photo of {name}, {w}x{h}".encode(),
            "json": json.dumps({"index": i, "source": name}).encode(),
        })
    return samples


def write_tar(path, samples) -> str:
    with open(path, "wb") as f, wds.TarWriter(f) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def image_of(sample: dict) -> bytes:
    return sample.get("jpg", sample.get("png"))


def read_tar(path) -> list[dict]:
    return list(vqwds.read_shard(str(path)))


def tokens_of(sample: dict) -> np.ndarray:
    value = sample["vqgan.npy"]
    return np.load(io.BytesIO(value)) if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    # Loaded from disk (not the in-memory fixture) so the subprocess of the resume test, which
    # loads the same directory, has the same weights digest and hence the same TokenizerSpec.
    return VQModel.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def samples():
    return make_samples()


@pytest.fixture(scope="module")
def reference(model, samples):
    """Tokens of a direct encode, by key: what every path through wds.py must reproduce."""
    pixels = np.stack([load_image(image_of(s), S) for s in samples])
    tokens = model.encode_images(pixels)
    return {s["__key__"]: t for s, t in zip(samples, tokens, strict=True)}


@pytest.fixture(scope="module")
def decoded(model, reference, samples):
    """Direct decode of the first shard's reference tokens, by key."""
    keys = [s["__key__"] for s in samples[:4]]
    images = model.decode_images(np.stack([reference[k] for k in keys]))
    return dict(zip(keys, images, strict=True))


@pytest.fixture(scope="module")
def shards(samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    urls, start = [], 0
    for i, size in enumerate(SHARD_SIZES):
        urls.append(write_tar(root / f"shard-{i:05d}.tar", samples[start : start + size]))
        start += size
    return root, urls


def check_outputs(paths, samples, reference, *, keep_image=False):
    """Every input sample exactly once across `paths`, in order, fields intact, tokens right."""
    out = [s for p in paths for s in read_tar(p)]
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    for got, want in zip(out, samples, strict=True):
        assert got["txt"] == want["txt"] and got["json"] == want["json"]
        tokens = tokens_of(got)
        assert tokens.dtype == np.uint8 and tokens.shape == (256,)
        np.testing.assert_array_equal(tokens, reference[want["__key__"]])
        assert ("jpg" in got or "png" in got) == keep_image


def snapshot(directory) -> dict:
    return {
        name: (os.stat(directory / name).st_mtime_ns, (directory / name).read_bytes())
        for name in sorted(os.listdir(directory)) if name != "manifest.json"
    }


# ------------------------------------------------------------------------------ encode stage


def test_encode_stage_plain_list_keeps_fields_order_and_last_batch(model, samples, reference):
    stage = vqwds.encode(model, batch_size=BATCH)
    subset = samples[:5]  # 2 + 2 + 1: the last batch is incomplete
    out = list(stage(iter(subset)))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in subset]
    for got, want in zip(out, subset, strict=True):
        assert {k: v for k, v in got.items() if k != "vqgan.npy"} == want  # all else untouched
        assert got["vqgan.npy"].dtype == np.uint8  # smallest dtype for a 64-entry codebook
        np.testing.assert_array_equal(got["vqgan.npy"], reference[want["__key__"]])
    assert stage.stats.samples_in == 5 and stage.stats.encoded == 5
    assert subset[0].keys() == {"__key__", "jpg", "txt", "json"}  # inputs not mutated

    # Decoded inputs (PIL, uint8 arrays), a custom field name, images dropped, another dtype.
    decoded = [
        {"__key__": s["__key__"], "image": Image.open(io.BytesIO(image_of(s))), "cls": 3}
        for s in samples[:3]
    ]
    decoded[1]["image"] = np.asarray(decoded[1]["image"].convert("RGB"))
    out = list(vqwds.encode_samples(decoded, model, image_key="image", keep_image=False,
                                    output_key="tok.npy", token_dtype="int32", batch_size=BATCH))
    assert [sorted(s) for s in out] == [["__key__", "cls", "tok.npy"]] * 3
    for got, want in zip(out, samples[:3], strict=True):
        assert got["tok.npy"].dtype == np.int32
        np.testing.assert_array_equal(got["tok.npy"], reference[want["__key__"]])


def test_encode_stage_failures_follow_the_policy(model, samples, reference):
    good = samples[0]
    truncated = {"__key__": "broken", "__url__": "shards/x.tar",
                 "jpg": good["jpg"][: len(good["jpg"]) // 3], "txt": b"cut"}
    no_image = {"__key__": "caption_only", "__url__": "shards/x.tar", "txt": b"no picture"}
    stream = [good, truncated, samples[1], no_image, samples[2]]

    with pytest.raises(vqwds.SampleError) as info:
        list(vqwds.encode_samples(stream, model, batch_size=BATCH))
    assert info.value.key == "broken" and info.value.url == "shards/x.tar"
    assert "'broken'" in str(info.value) and "shards/x.tar" in str(info.value)

    stage = vqwds.encode(model, batch_size=BATCH, on_error="skip")
    out = list(stage(stream))
    assert [s["__key__"] for s in out] == ["sample_0000", "sample_0001", "sample_0002"]
    assert (stage.stats.samples_in, stage.stats.encoded, stage.stats.skipped) == (5, 3, 2)
    reasons = {e["key"]: e["reason"] for e in stage.stats.errors}
    assert "truncated" in reasons["broken"] or "cannot" in reasons["broken"]
    assert "no image field" in reasons["caption_only"]
    assert ".jpg, .png, .jpeg, .webp" in reasons["caption_only"]
    assert "fields: txt" in reasons["caption_only"]

    out = list(vqwds.encode_samples(stream, model, batch_size=BATCH, on_error="null",
                                    keep_image=False))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in stream]
    assert "vqgan.npy" not in out[1] and "vqgan.npy" not in out[3]
    assert out[1]["txt"] == b"cut" and "jpg" not in out[1]
    assert "no image field" in out[3]["vqgan_error"]
    np.testing.assert_array_equal(out[4]["vqgan.npy"], reference["sample_0002"])

    # webdataset handlers: True drops and goes on, False stops the stream.
    dropped = list(vqwds.encode_samples(stream, model, batch_size=BATCH,
                                        handler=wds.ignore_and_continue))
    assert len(dropped) == 3
    stopped = list(vqwds.encode_samples(stream, model, batch_size=BATCH,
                                        handler=wds.ignore_and_stop))
    assert [s["__key__"] for s in stopped] == ["sample_0000"]

    with pytest.raises(TypeError, match="dicts"):
        list(vqwds.encode_samples([("a", b"b")], model, batch_size=BATCH))
    with pytest.raises(ValueError, match="on_error"):
        vqwds.encode(model, on_error="ignore")


def test_stages_in_webdataset_pipelines(model, shards, samples, reference, decoded):
    root, urls = shards
    stage = vqwds.encode(model, batch_size=BATCH)
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), stage)
    out = list(pipeline)
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    assert [s["__url__"] for s in out] == [u for u, n in zip(urls, SHARD_SIZES, strict=True) for _ in range(n)]
    for got, want in zip(out, samples, strict=True):
        assert got["txt"] == want["txt"] and got["json"] == want["json"]
        np.testing.assert_array_equal(got["vqgan.npy"], reference[want["__key__"]])

    dataset = wds.WebDataset(urls[0], shardshuffle=False).compose(stage)
    out = list(dataset)
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples[:4]]

    # Tokens back to images, through the same kind of pipeline; .npy bytes straight from a tar.
    tokens_root = root / "tokens"
    tokens_root.mkdir()
    token_tar = write_tar(tokens_root / "t.tar", [
        {"__key__": s["__key__"], "vqgan.npy": s["vqgan.npy"], "txt": s["txt"]} for s in out
    ])
    decode = vqwds.decode(model, batch_size=BATCH, output_format="png", keep_tokens=False)
    images = list(wds.WebDataset(token_tar, shardshuffle=False).compose(decode))
    assert [sorted(k for k in s if k[:2] != "__") for s in images] == [["png", "txt"]] * 4
    assert [s["__key__"] for s in images] == [s["__key__"] for s in out]
    for got in images:
        pixels = np.asarray(Image.open(io.BytesIO(got["png"]))).astype(int)
        assert np.abs(pixels - decoded[got["__key__"]]).max() <= 1


def test_decode_stage_formats_and_bad_tokens(model, samples, reference, decoded):
    keys = [s["__key__"] for s in samples[:3]]
    codes = np.stack([reference[k] for k in keys])
    expected = [decoded[k] for k in keys]
    good = [{"__key__": k, "vqgan.npy": c, "txt": b"t"} for k, c in zip(keys, codes, strict=True)]
    bad_id = {"__key__": "bad_id", "vqgan.npy": np.full(256, 64, np.uint16)}
    bad_length = {"__key__": "short", "vqgan.npy": codes[0][:100]}
    no_tokens = {"__key__": "nothing", "txt": b"x"}
    stream = [no_tokens, good[0], bad_id, good[1], bad_length, good[2]]

    stage = vqwds.decode(model, batch_size=BATCH, on_error="null")
    out = list(stage(stream))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in stream]
    assert isinstance(out[1]["png"], Image.Image)
    for got, want, code in zip([out[1], out[3], out[5]], expected, codes, strict=True):
        assert np.abs(np.asarray(got["png"]).astype(int) - want).max() <= 1
        np.testing.assert_array_equal(got["vqgan.npy"], code)
    assert "no token field .vqgan.npy" in out[0]["vqgan_error"]
    assert "64" in out[2]["vqgan_error"] and "codebook" in out[2]["vqgan_error"]
    assert "100 tokens" in out[4]["vqgan_error"] and "png" not in out[4]
    assert (stage.stats.decoded, stage.stats.failed) == (3, 3)

    out = list(vqwds.decode_samples(stream, model, batch_size=BATCH, on_error="skip",
                                    output_format="numpy", output_key="image"))
    assert [s["__key__"] for s in out] == keys
    assert out[0]["image"].dtype == np.uint8 and out[0]["image"].shape == (S, S, 3)
    with pytest.raises(vqwds.SampleError, match="'bad_id'"):
        list(vqwds.decode_samples(good + [bad_id], model, batch_size=BATCH))


def test_stages_pickle_as_small_references(model, tiny_model):
    stage = vqwds.encode(model, batch_size=BATCH, handler=wds.ignore_and_continue)
    blob = pickle.dumps(stage)
    assert len(blob) < 2000  # a checkpoint reference, not the weights
    clone = pickle.loads(blob)
    assert clone.model.weights_digest == model.weights_digest
    assert clone.kwargs == stage.kwargs
    # In-memory weights travel as numpy arrays.
    clone = pickle.loads(pickle.dumps(vqwds.decode(tiny_model)))
    assert clone.model.weights_digest == tiny_model.weights_digest


# ------------------------------------------------------------------------------ tokenize_shards


def test_tokenize_shards_writes_resumable_outputs(model, shards, samples, reference, tmp_path):
    root, urls = shards
    out_dir = tmp_path / "out"
    pattern = str(root / "shard-{00000..00002}.tar")
    manifest = vqwds.tokenize_shards(pattern, out_dir, model=model, batch_size=BATCH,
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
    again = vqwds.tokenize_shards(pattern, out_dir, model=model, batch_size=BATCH,
                                  progress=False)
    assert [s.status for s in again.shards] == ["finished"] * 3 and not again.written
    assert again.totals == manifest.totals
    assert snapshot(out_dir) == before  # nothing rewritten

    # A finished shard made by other weights is never silently mixed in.
    other = VQModel(model.config, {**model.params}, dtype=model.dtype)
    other._digest = "sha256:" + "0" * 64
    with pytest.raises(ValueError, match="another tokenizer"):
        vqwds.tokenize_shards(pattern, out_dir, model=other, progress=False)
    with pytest.raises(ValueError, match="other settings .keep_image"):
        vqwds.tokenize_shards(pattern, out_dir, model=model, keep_image=True, progress=False)
    assert snapshot(out_dir) == before

    # Patterns, kept images and overwrite.
    manifest = vqwds.tokenize_shards(urls[:1], str(tmp_path / "p" / "tok-{shard}-{index:03d}.tar"),
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

    manifest = vqwds.tokenize_shards([bad_url, empty_url, cut_url], out, model=model,
                                     batch_size=BATCH, progress=False)
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
    again = vqwds.tokenize_shards([bad_url, empty_url, cut_url], out, model=model,
                                  batch_size=BATCH, progress=False)
    assert [s.status for s in again.shards] == ["finished", "finished", "failed"]

    null = vqwds.tokenize_shards([bad_url], tmp_path / "null", model=model, batch_size=BATCH,
                                 on_error="null", progress=False)
    assert null.shards[0].failed == 2
    written = read_tar(tmp_path / "null" / "bad.tar")
    assert [s["__key__"] for s in written] == [s["__key__"] for s in bad]
    assert "vqgan.npy" not in written[1] and written[1]["vqgan_error"]
    assert written[1]["txt"] == b"cut"

    with pytest.raises(vqwds.SampleError) as info:
        vqwds.tokenize_shards([bad_url], tmp_path / "raise", model=model, batch_size=BATCH,
                              on_error="raise", progress=False)
    assert info.value.key == "broken" and bad_url in str(info.value)
    assert not [n for n in os.listdir(tmp_path / "raise") if n.endswith(".tar") or ".tmp-" in n]
    with pytest.raises(vqwds.ShardReadError, match="cut.tar"):
        vqwds.tokenize_shards([cut_url], tmp_path / "raise", model=model, on_error="raise",
                              progress=False)


def test_tokenize_shards_splits_shards_across_processes(model, shards, tmp_path):
    root, urls = shards
    owned = []
    for index in range(2):
        manifest = vqwds.tokenize_shards(urls, tmp_path, model=model, batch_size=BATCH,
                                         process_index=index, process_count=2, progress=False)
        owned.append({s.url for s in manifest.shards})
        assert os.path.basename(manifest.path) == f"manifest-{index:05d}-of-00002-worker-000.json"
    assert owned == [{urls[0], urls[2]}, {urls[1]}]
    assert vqwds._assign(10, (1, 3), (0, 1)) == [1, 4, 7]
    assert vqwds._assign(10, (1, 3), (1, 2)) == [4]  # then across DataLoader workers
    with pytest.raises(ValueError, match="process_index"):
        vqwds.tokenize_shards(urls, tmp_path, model=model, process_index=2, process_count=2)


def test_tokenize_shards_reads_fsspec_and_pipe_urls(model, shards, samples, reference, tmp_path,
                                                    monkeypatch):
    root, urls = shards
    memory = fsspec.filesystem("memory")
    memory.pipe("/wds-test/in/shard-00000.tar", pathlib.Path(urls[0]).read_bytes())
    inputs = ["memory://wds-test/in/shard-00000.tar", f"pipe:cat {urls[1]}",
              "file://" + urls[2]]
    manifest = vqwds.tokenize_shards(inputs, tmp_path, model=model, batch_size=BATCH,
                                     progress=False)
    assert [s.status for s in manifest.shards] == ["written"] * 3
    check_outputs([tmp_path / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)

    # fsspec output too (no fsync there; the temp + rename protocol is the same).
    manifest = vqwds.tokenize_shards(inputs[0], "memory://wds-test/out", model=model,
                                     batch_size=BATCH, progress=False)
    assert memory.exists("/wds-test/out/shard-00000.stats.json")
    assert [p.rsplit("/", 1)[-1] for p in memory.ls("/wds-test/out", detail=False)] == [
        "manifest.json", "shard-00000.stats.json", "shard-00000.tar"]
    written = list(vqwds.read_shard("memory://wds-test/out/shard-00000.tar"))
    assert [s["__key__"] for s in written] == [s["__key__"] for s in samples[:4]]

    # webdataset's own readers, once the scheme is registered (undone after the test).
    monkeypatch.setitem(gopen_schemes, "memory", None)
    vqwds.register_fsspec("memory")
    dataset = wds.WebDataset("memory://wds-test/out/shard-00000.tar", shardshuffle=False)
    assert [s["__key__"] for s in dataset] == [s["__key__"] for s in samples[:4]]
    memory.rm("/wds-test", recursive=True)


RESUME_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from vqgan_datasets import wds
    from vqgan_datasets.modeling import VQModel

    pattern, out, marker, model_dir = sys.argv[1:5]

    def stall(url, written):
        # Freeze inside the second shard, after it has written a sample, until killed.
        if url.endswith("shard-00001.tar"):
            pathlib.Path(marker).touch()
            time.sleep(600)

    wds._after_sample_hook = stall
    wds.tokenize_shards(pattern, out, model=VQModel.from_pretrained(model_dir), batch_size=2,
                        progress=False)
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

    manifest = vqwds.tokenize_shards(pattern, out, model=model, batch_size=BATCH, progress=False)
    assert [s.status for s in manifest.shards] == ["finished", "written", "written"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    # Encoded on two devices before the kill, one after: the same tokens, each sample once.
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)


def test_example_script_runs(model, shards, tiny_model_dir, tmp_path, monkeypatch, caplog):
    import runpy

    root, urls = shards
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "tokenize_webdataset.py")
    main = runpy.run_path(path, run_name="example")["main"]
    # The fixture's model, already compiled, stands in for the one the script would load.
    monkeypatch.setattr(VQModel, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    caplog.set_level("INFO", logger="vqgan_datasets")
    main(["--model", str(tiny_model_dir), "--input", str(root / "shard-{00000..00001}.tar"),
          "--output", str(tmp_path / "out"), "--batch-size", str(BATCH), "--preview", "2",
          "--no-progress"])
    assert sorted(os.listdir(tmp_path / "out"))[:2] == ["manifest.json", "shard-00000.stats.json"]
    assert "tokenize_shards: 2 shards written" in caplog.text


def test_tarfile_format_details(model, tmp_path):
    """Outputs are plain tars that tarfile and webdataset both read: one member per field."""
    sample = make_samples()[0]
    url = write_tar(tmp_path / "one.tar", [sample])
    vqwds.tokenize_shards(url, tmp_path / "o", model=model, batch_size=BATCH, progress=False)
    with tarfile.open(tmp_path / "o" / "one.tar") as tar:
        assert sorted(tar.getnames()) == ["sample_0000.json", "sample_0000.txt",
                                          "sample_0000.vqgan.npy"]
