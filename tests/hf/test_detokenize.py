"""hf_detokenize.py: tokens back into images through map, a lazy transform and a stream; the
model found from the recorded metadata and checked; a small, stable fingerprint."""

from __future__ import annotations

import itertools
import logging
import pickle

import numpy as np
import pytest
from conftest import TINY
from datasets import Dataset, Image
from datasets.fingerprint import Hasher
from hf_helpers import N

from vqgan_datasets.hf import VQGANDetokenizer
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.options import EncodeOptions, SampleError

pytest_plugins = ["hf_fixtures"]


def test_detokenizer_map_writes_an_image_feature(detok, tokenized, expected_images):
    out = tokenized.map(detok, batched=True)
    assert out.column_names == ["label", "id", "image"] and out.features["image"] == Image()
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out["image"]]), expected_images)
    assert out.features == detok.features(tokenized.features)
    kept = tokenized.map(VQGANDetokenizer.from_dataset(tokenized, keep_tokens=True), batched=True)
    assert "vqgan_tokens" in kept.column_names
    arrow = tokenized.with_format("arrow").map(detok, batched=True,
                                               features=detok.features(tokenized.features))
    assert arrow.with_format(None)[2]["image"].tobytes() == expected_images[2].tobytes()


def test_transform_decodes_only_the_rows_read(detok, tokenized, expected_images):
    before = detok.stats.decoded
    lazy = tokenized.with_transform(detok)
    row = lazy[4]
    assert detok.stats.decoded - before == 1
    assert sorted(row) == ["id", "image", "label"]
    np.testing.assert_array_equal(np.asarray(row["image"]), expected_images[4])
    lazy[1:3]
    assert detok.stats.decoded - before == 3


def test_streaming_decodes_batch_by_batch(detok, tokenized, expected_images):
    before = detok.stats.decoded
    stream = tokenized.to_iterable_dataset().map(detok, batched=True, batch_size=2)
    first = next(iter(stream))
    assert detok.stats.decoded - before == 2  # one batch of two, not the dataset
    # Another batch shape is another XLA program: pixels may round one level apart.
    np.testing.assert_allclose(np.asarray(first["image"]), expected_images[0], atol=1)
    assert len(list(itertools.islice(stream, N))) == N


def test_a_streams_map_keeps_the_tokens_and_apply_drops_them_everywhere(detok, tokenized,
                                                                         expected_images):
    """IterableDataset.map merges the output into each row, so the token column stays there;
    apply() gives a stream, a formatted and a plain Dataset the same columns and images."""
    streamed = next(iter(tokenized.to_iterable_dataset().map(detok, batched=True)))
    assert "vqgan_tokens" in streamed
    plain = tokenized.map(detok, batched=True)
    outputs = {
        "stream": list(detok.apply(tokenized.to_iterable_dataset(), batch_size=N)),
        "formatted": list(detok.apply(tokenized.with_format("numpy")).with_format(None)),
        "plain": list(detok.apply(tokenized)),
    }
    for kind, rows in outputs.items():
        assert list(rows[0]) == plain.column_names == ["label", "id", "image"], kind
        np.testing.assert_allclose(np.stack([np.asarray(r["image"]) for r in rows]),
                                   expected_images, atol=1, err_msg=kind)
    keep = VQGANDetokenizer.from_dataset(tokenized, keep_tokens=True)
    assert "vqgan_tokens" in next(iter(keep.apply(tokenized.to_iterable_dataset())))


def test_from_dataset_refuses_tokens_of_another_model(tokenized, other_dir):
    with pytest.raises(ValueError, match="weights differ"):
        VQGANDetokenizer.from_dataset(tokenized, model=other_dir)
    with pytest.raises(ValueError, match="value range"):
        VQGANDetokenizer.from_dataset(tokenized, value_range=(0, 1))
    with pytest.raises(ValueError, match="no vqgan_datasets metadata"):
        VQGANDetokenizer.from_dataset(Dataset.from_dict({"vqgan_tokens": [[1, 2]]}))


def test_detokenizer_fingerprint_is_stable_and_small(detok, tokenized):
    again = VQGANDetokenizer.from_dataset(tokenized)
    assert Hasher.hash(again) == Hasher.hash(detok) == Hasher.hash(pickle.loads(pickle.dumps(detok)))
    assert Hasher.hash(VQGANDetokenizer.from_dataset(tokenized, keep_tokens=True)) != Hasher.hash(detok)
    assert len(pickle.dumps(detok)) < 4000


def test_the_tokenizers_options_undo_it(model_dir, tok, tokenized, expected_images):
    detok = VQGANDetokenizer(model_dir, options=tok.options)
    assert (detok.token_column, detok.output_column) == ("vqgan_tokens", "image")
    out = tokenized.map(detok, batched=True)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out["image"]]), expected_images)
    other = VQGANDetokenizer(model_dir, options=EncodeOptions(output_field="codes"),
                             output_column="picture", batch_size=2)
    assert (other.token_column, other.output_column, other.batch_size) == ("codes", "picture", 2)


def test_in_memory_detokenizer_pickles_its_identity_only():
    detok = VQGANDetokenizer(VQModel(TINY, seed=0))
    copy = pickle.loads(pickle.dumps(detok))
    assert copy.spec_for() == detok.spec_for() and Hasher.hash(copy) == Hasher.hash(detok)
    assert not copy.loaded
    with pytest.raises(RuntimeError, match="in-memory VQModel"):
        copy.model  # noqa: B018


# -- errors name the row (issue 15.9) ---------------------------------------------------------


def _tokens_with(tokenized, **replaced) -> Dataset:
    """The token rows as plain lists, row i replaced by `replaced[f"r{i}"]`; ids k0..k5."""
    rows = [list(map(int, r)) for r in tokenized.with_format("numpy")["vqgan_tokens"]]
    for name, value in replaced.items():
        rows[int(name[1:])] = value
    return Dataset.from_dict({"vqgan_tokens": rows, "id": [f"k{i}" for i in range(N)]})


def test_bad_ids_name_the_row_the_position_and_the_range(detok, tokenized):
    bad = _tokens_with(tokenized, r3=[5] * 7 + [999] + [0] * 248)  # the tiny codebook: 64 codes
    with pytest.raises(SampleError, match=r"sample 'k3'.*row id='k3'.*token id 999 at position 7 "
                                          r"is outside the codebook \[0, 64\)") as err:
        bad.map(detok, batched=True)
    assert err.value.key == "k3"
    plain = bad.remove_columns("id")
    with pytest.raises(SampleError, match=r"sample 3: .*dataset row 3: token id 999") as err:
        plain.map(detok, batched=True, with_indices=True, batch_size=2)
    assert err.value.key == 3
    with pytest.raises(SampleError, match=r"row 1 of this batch \(add a __key__/key/id column"):
        plain.map(detok, batched=True, batch_size=2)
    with pytest.raises(SampleError, match="sample 'k3'"):
        bad.with_transform(detok)[2:5]


def test_a_wrong_length_row_says_expected_and_got(detok, tokenized):
    bad = _tokens_with(tokenized, r2=[1, 2, 3])
    with pytest.raises(SampleError, match=r"row id='k2'.*has 3 tokens, expected 256 \(grid 16x16\)"):
        bad.map(detok, batched=True)
    with pytest.raises(SampleError, match="has 3 tokens, expected 256"):
        list(bad.to_iterable_dataset().map(detok, batched=True))


def test_null_and_undecodable_rows_become_counted_none_images(model_dir, tokenized, expected_images,
                                                              caplog):
    """A None row (the tokenizer's on_error='null' output) is a None image, counted and warned;
    with on_error='null' so is a row that cannot be decoded. Nothing is dropped."""
    detok = VQGANDetokenizer.from_dataset(tokenized, on_error="null")
    data = _tokens_with(tokenized, r1=None, r4=[70] * 256)
    with caplog.at_level(logging.WARNING, logger="vqgan_datasets.hf.detokenize"):
        out = data.map(detok, batched=True)
    images = out["image"]
    assert len(images) == N and images[1] is None and images[4] is None
    for i in (0, 2, 3, 5):
        np.testing.assert_array_equal(np.asarray(images[i]), expected_images[i])
    assert detok.stats.nulls == 2 and detok.stats.decoded == N - 2
    assert any("2 of 6 rows" in r.getMessage() and "None images" in r.getMessage()
               and "row id='k4'" in r.getMessage() for r in caplog.records)
    # The default (raise) still turns a null row into a None image, warned, not an error.
    plain = VQGANDetokenizer.from_dataset(tokenized)
    assert _tokens_with(tokenized, r1=None).map(plain, batched=True)["image"][1] is None
    assert plain.stats.nulls == 1
    assert Hasher.hash(detok) != Hasher.hash(plain)  # on_error is part of what it writes


def test_empty_token_datasets_give_the_image_column(detok, tokenized):
    empty = tokenized.select([])
    for dataset in (empty, empty.with_format("numpy")):
        out = detok.apply(dataset)
        assert len(out) == 0 and out.features == detok.features(tokenized.features)
    with_column = detok.apply(empty.with_format("arrow"))  # kept where datasets dropped it
    assert list(with_column.features) == ["label", "id", "image"]
