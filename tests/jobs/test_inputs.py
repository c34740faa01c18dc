"""Sources: image folders, saved datasets, parquet files, `imagefolder:`, single images and
tar shard patterns told apart and opened; rows named after their file_name/key column."""

from __future__ import annotations

import datasets
import pytest

from vqgan_datasets.jobs import commands as jobs
from vqgan_datasets.jobs import inputs


def test_open_images_reads_every_kind_of_source(folder, tmp_path):
    from_folder = inputs.open_images(folder)
    assert from_folder["file_name"] == ["astronaut.jpg", "coffee.jpg", "sub/chelsea.jpg"]
    saved = tmp_path / "saved"
    from_folder.save_to_disk(str(saved))
    assert inputs.open_images(saved)["file_name"] == from_folder["file_name"]
    embedded = from_folder.cast_column("image", datasets.Image())
    embedded.to_parquet(str(tmp_path / "data.parquet"))
    from_parquet = inputs.open_images(tmp_path / "data.parquet")
    assert len(from_parquet) == 3
    assert inputs.open_images(f"imagefolder:{folder}").num_rows == 3
    assert inputs.open_images(folder / "coffee.jpg")["file_name"] == ["coffee.jpg"]
    with pytest.raises(FileNotFoundError, match="not an image folder"):
        inputs.open_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        inputs.open_images(tmp_path / "empty")


def test_shard_sources_are_recognised():
    assert inputs.is_shard_source("data/{00000..00009}.tar")
    assert inputs.is_shard_source("pipe:curl -s http://x/a.tar")
    assert inputs.is_shard_source("s3://bucket/shard-000.tar")
    assert inputs.is_shard_source("a.tar::b.tar")
    assert inputs.is_shard_source("https://host/x.tgz?token=1")
    assert not inputs.is_shard_source("photos/")


@pytest.mark.parametrize("name", ["photos.tarball", "x.tar", "my{a..b}", "set{1,2}", "a..b{c}"])
def test_an_existing_folder_is_never_a_shard_pattern(folder, tmp_path, name):
    """What the path is decides first: a folder holds images or a saved dataset, whatever its
    name looks like; only then does pattern syntax count."""
    import shutil

    photos = tmp_path / name
    shutil.copytree(folder, photos)
    assert not inputs.is_shard_source(photos)
    assert not inputs.is_shard_source(f"{photos}/")
    assert inputs.open_images(photos).num_rows == 3
    assert inputs.find_token_shards(photos) is None  # no tars in it: not token shards
    (photos / "image.tar.jpg").write_bytes((folder / "coffee.jpg").read_bytes())
    assert not inputs.is_shard_source(photos / "image.tar.jpg")  # an image file
    (photos / "real.tar").write_bytes(b"")
    assert inputs.is_shard_source(photos / "real.tar")  # a file named like a tar
    assert inputs.find_token_shards(photos) == [str(photos / "real.tar")]


def test_row_names_and_what_jobs_still_exports(folder, tmp_path):
    assert inputs.row_names(inputs.open_images(folder)) == [
        "astronaut.jpg", "coffee.jpg", "sub/chelsea.jpg"]
    assert inputs.row_names(datasets.Dataset.from_dict({"x": list(range(11))}))[:2] == ["00", "01"]
    assert inputs.parquet_files(tmp_path) == []
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    assert inputs.find_token_shards(tmp_path / "saved") is None  # a token dataset, not shards
    for name in ("open_images", "is_shard_source", "IMAGE_SUFFIXES", "DATASET_FILES"):
        assert getattr(jobs, name) is getattr(inputs, name)
