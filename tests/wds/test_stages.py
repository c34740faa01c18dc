"""stages.py: the encode/decode stages over plain lists and webdataset pipelines, their failures,
their pickled form."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_wds import BATCH, SHARD_SIZES, S, image_of, write_tar

from vqgan_datasets import wds as vqwds


@pytest.fixture(scope="module")
def decoded(model, reference, samples):
    """Direct decode of the first shard's reference tokens, by key."""
    keys = [s["__key__"] for s in samples[:4]]
    images = model.decode_images(np.stack([reference[k] for k in keys]))
    return dict(zip(keys, images, strict=True))


# ------------------------------------------------------------------------------ encode stage


def test_encode_stage_plain_list_keeps_fields_order_and_last_batch(model, samples, reference):
    stage = vqwds.encode(model, batch_size=BATCH)
    subset = samples[:5]  # 2 + 2 + 1: the last batch is incomplete
    out = list(stage(iter(subset)))
    assert [s["__key__"] for s in out] == [s["__key__"] for s in subset]
    for got, want in zip(out, subset, strict=True):
        assert {k: v for k, v in got.items() if k != "vqgan.npy"} == want  # all else untouched
        assert got["vqgan.npy"].dtype == np.uint16  # the record's dtype up to 65,536 codes
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
