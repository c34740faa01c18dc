"""hf_hub.py: the recorded metadata through save_to_disk, the Hub's parquet + card layout and
load_dataset; the push_to_hub example's dry run. Every cache in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import DatasetDict, List, Value, load_dataset, load_from_disk
from hf_helpers import REPO, tokens_of

from vqgan_datasets.hf import VQGANDetokenizer, read_metadata, write_hub_files, write_metadata
from vqgan_datasets.hf.hub import read_column_metadata

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
    assert loaded.features["vqgan_tokens"] == List(Value("uint8"), length=256)
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


def test_push_to_hub_example_uploads_the_dry_run_files(photo_dataset, model_dir, tmp_path,
                                                       monkeypatch):
    """The real push uploads exactly what --dry-run writes (no network: HfApi recorded)."""
    import importlib.util

    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, *, folder_path, **kwargs):
        uploaded.update(kwargs, files=sorted(p.relative_to(folder_path).as_posix()
                                             for p in Path(folder_path).rglob("*") if p.is_file()))
        shard = Path(folder_path) / "data" / "train-00000-of-00001.parquet"
        uploaded["record"] = read_metadata(pq.read_table(shard))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    source = tmp_path / "images"
    photo_dataset.save_to_disk(str(source))
    spec = importlib.util.spec_from_file_location("push_example", REPO / "examples" / "push_to_hub.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--model", model_dir, "--dataset-dir", str(source),
                         "--repo-id", "me/tiny-tokens"]) == 0
    assert uploaded["files"] == ["README.md", "data/train-00000-of-00001.parquet"]
    assert uploaded["repo_id"] == "me/tiny-tokens" and uploaded["delete_patterns"] == ["data/*.parquet"]
    assert uploaded["record"].model_name == str(Path(model_dir).resolve())
