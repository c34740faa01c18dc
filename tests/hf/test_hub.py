"""hf_hub.py: the recorded metadata through save_to_disk, the Hub's parquet + card layout and
load_dataset; the push_to_hub example's dry run. Every cache in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES, TINY
from datasets import DatasetDict, List, Value, load_dataset, load_from_disk
from hf_helpers import REPO, tokens_of

from vqgan_datasets import cli
from vqgan_datasets.handle import ModelHandle
from vqgan_datasets.hf import VQGANDetokenizer, read_metadata, write_hub_files, write_metadata
from vqgan_datasets.hf.hub import read_column_metadata
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.options import EncodeOptions, StageStats
from vqgan_datasets.pipeline.engine import get_engine
from vqgan_datasets.pipeline.images import load_image
from vqgan_datasets.streams import encode_stream

pytest_plugins = ["hf_fixtures"]


def test_metadata_survives_the_hub_layout(tok, tokenized, expected_images, tmp_path):
    assert read_metadata(tokenized) == tok.spec
    saved = tmp_path / "disk"
    tokenized.save_to_disk(str(saved))
    assert read_metadata(load_from_disk(str(saved))) == tok.spec
    hub = tmp_path / "hub"
    files = write_hub_files(tokenized, hub)
    assert [f.relative_to(hub).as_posix() for f in files] == [
        "data/train-00000-of-00001.parquet", "README.md"]
    loaded = load_dataset(str(hub), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.features["vqgan_tokens"] == List(Value("uint16"), length=256)
    assert read_metadata(loaded) == tok.spec
    assert read_metadata(str(hub)) == tok.spec  # straight from the card
    assert read_column_metadata(str(hub)) == ("vqgan_tokens", tok.spec)
    images = loaded.map(VQGANDetokenizer.from_dataset(loaded), batched=True)["image"]
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]), expected_images)


def test_write_metadata_checks_the_column(tok, ds):
    with pytest.raises(ValueError, match="no column"):
        write_metadata(ds, tok.spec, "vqgan_tokens")
    with pytest.raises(ValueError, match="no vqgan_datasets metadata"):
        read_metadata(ds)


def test_push_to_hub_example_dry_run(photo_dataset, model_dir, expected, tmp_path):
    source = tmp_path / "images"
    photo_dataset.save_to_disk(str(source))
    out = tmp_path / "dry"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "push_to_hub.py"), "--model", model_dir,
         "--dataset-dir", str(source), "--repo-id", "me/tiny-tokens", "--dry-run", str(out)],
        capture_output=True, text=True, timeout=240,
        env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 HF_DATASETS_CACHE=str(tmp_path / "cache")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "data" / "train-00000-of-00001.parquet").is_file()
    assert "vqgan_datasets:" in (out / "README.md").read_text()
    shard = out / "data" / "train-00000-of-00001.parquet"
    assert read_metadata(pq.read_table(shard)) == read_metadata(str(out))
    loaded = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))
    np.testing.assert_array_equal(tokens_of(loaded), expected)
    assert VQGANDetokenizer.from_dataset(loaded).spec_for().weights_digest == read_metadata(
        loaded).weights_digest


# -- the record in every form we write (issue 16.2) ------------------------------------------


@pytest.fixture(scope="module")
def hub_dir(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub_layout")
    write_hub_files(tokenized, out)
    return out


def test_each_parquet_file_carries_the_record(tok, hub_dir):
    path = hub_dir / "data" / "train-00000-of-00001.parquet"
    assert b"vqgan_datasets" in pq.read_schema(path).metadata
    table = pq.read_table(path)
    assert read_metadata(table) == tok.spec and read_metadata(table.schema) == tok.spec
    assert VQGANDetokenizer.from_dataset(table).spec_for().weights_digest == tok.spec.weights_digest
    # What to_parquet writes, apart from the metadata: same rows, features and row groups.
    plain = hub_dir.parent / "plain.parquet"
    load_dataset(str(hub_dir), split="train", cache_dir=str(hub_dir.parent / "c")).to_parquet(
        str(plain))
    assert pq.read_table(plain).equals(table)
    assert pq.ParquetFile(plain).num_row_groups == pq.ParquetFile(path).num_row_groups


def test_streamed_parquet_files_give_the_record(tok, hub_dir, expected_images):
    stream = load_dataset("parquet", data_files=f"{hub_dir}/data/*.parquet", split="train",
                          streaming=True)
    assert read_metadata(stream) == tok.spec
    detok = VQGANDetokenizer.from_dataset(stream)
    first = next(iter(stream.map(detok, batched=True, batch_size=2)))
    np.testing.assert_allclose(np.asarray(first["image"]), expected_images[0], atol=1)
    # Through the client's own wrappers too.
    assert read_metadata(stream.shuffle(seed=0).map(lambda r: r).take(3)) == tok.spec


def test_parquet_read_by_load_dataset_names_what_to_pass(tok, model_dir, hub_dir, tmp_path):
    pattern = f"{hub_dir}/data/*.parquet"
    loaded = load_dataset("parquet", data_files=pattern, split="train",
                          cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no vqgan_datasets metadata") as err:
        VQGANDetokenizer.from_dataset(loaded)
    message = str(err.value)
    assert "load_dataset('parquet'" in message and "from_dataset('DIR/data/*.parquet')" in message
    assert "model=" in message and "was it tokenized" not in message
    # What the message says works: the files, a glob, the folder; or model=.
    for source in (pattern, str(hub_dir / "data" / "train-00000-of-00001.parquet"), str(hub_dir)):
        assert read_metadata(source) == tok.spec, source
        assert VQGANDetokenizer.from_dataset(source).token_column == "vqgan_tokens"
    given = VQGANDetokenizer.from_dataset(loaded, model=model_dir)
    assert given.spec_for().weights_digest == tok.spec.weights_digest


def test_a_datasets_directory_gives_the_record(tok, tokenized, ds_dir, tmp_path):
    tokenized.save_to_disk(str(tmp_path / "one"))
    DatasetDict(train=tokenized).save_to_disk(str(tmp_path / "dict"))
    for source in ("one", "dict"):
        assert read_metadata(str(tmp_path / source)) == tok.spec, source
    with pytest.raises(ValueError, match="no vqgan_datasets metadata.*tokenizer.apply"):
        read_metadata(str(ds_dir))  # the images, never tokenized


def test_a_family_model_with_a_large_vocabulary_round_trips_through_its_record(tmp_path, capsys):
    """An IBQ-family model with 70,000 codes: int32 tokens in Arrow and in shard .npy fields,
    its own preprocessing by default, and a record from which decode rebuilds it (no model)."""
    model = VQModel(TINY.replace(family="ibq", n_embed=70_000), seed=0)
    params = model.params
    rng = np.random.default_rng(0)
    codebook = params["quantize"]["embedding"]["embedding"]
    params["quantize"]["embedding"]["embedding"] = rng.standard_normal(codebook.shape,
                                                                       ).astype(np.float32)
    VQModel(model.config, params).save_pretrained(tmp_path / "ibq")
    # Held here, the loaded model is the one every later load of the directory finds (and its
    # compiled functions with it).
    model = ModelHandle(str(tmp_path / "ibq")).load()
    assert cli.main(["--quiet", "encode", str(SAMPLES), str(tmp_path / "t"),
                     "--model", str(tmp_path / "ibq")]) == 0
    capsys.readouterr()
    ds = load_from_disk(str(tmp_path / "t"))
    assert ds.features["vqgan_tokens"] == List(Value("int32"), length=256)
    spec = read_metadata(ds)
    assert (spec.family, spec.token_dtype, spec.codebook_size) == ("ibq", "int32", 70_000)
    assert spec.preprocess == "opencv_linear_center_crop"
    tokens = np.asarray(ds.with_format("numpy")["vqgan_tokens"])
    assert tokens.max() >= 2**16  # ids a uint16 column could not hold
    # "exact" ran the family's own preprocessing.
    engine = get_engine(model, workers=0)
    files = sorted(SAMPLES.glob("*.jpg"))
    pixels = np.stack([load_image(str(f), 64, preprocess="opencv_linear_center_crop")
                       for f in files])
    assert sorted(map(tuple, tokens)) == sorted(map(tuple, engine.encode(pixels)))
    # Decoding needs no model: the record names the directory, whose config names the family.
    images = ds.map(VQGANDetokenizer.from_dataset(ds), batched=True)["image"]
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in images]),
                                  engine.decode(tokens))
    assert cli.main(["decode", str(tmp_path / "t"), str(tmp_path / "d"), "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    # Token shards' .npy fields are int32 too (webdataset stages and shard jobs: encode_stream).
    samples = [{"__key__": f.stem, "jpg": f.read_bytes()} for f in files[:2]]
    out = list(encode_stream(samples, engine, EncodeOptions(), StageStats()))
    assert [s["vqgan.npy"].dtype for s in out] == [np.dtype("int32")] * 2
