"""Whole jobs on disk: image sources, encode → decode, preview, report, info, convert, demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vqgan_datasets import jobs
from vqgan_datasets.images import load_image

SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three of the sample photos in a nested folder (file names are kept as row names)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for name in ("astronaut", "coffee"):
        shutil.copy(SAMPLES / f"{name}.jpg", root / f"{name}.jpg")
    shutil.copy(SAMPLES / "chelsea.jpg", root / "sub" / "chelsea.jpg")
    return root


def test_open_images_reads_every_kind_of_source(folder, tmp_path):
    from_folder = jobs.open_images(folder)
    assert from_folder["file_name"] == ["astronaut.jpg", "coffee.jpg", "sub/chelsea.jpg"]
    saved = tmp_path / "saved"
    from_folder.save_to_disk(str(saved))
    assert jobs.open_images(saved)["file_name"] == from_folder["file_name"]
    embedded = from_folder.cast_column("image", datasets.Image())
    embedded.to_parquet(str(tmp_path / "data.parquet"))
    from_parquet = jobs.open_images(tmp_path / "data.parquet")
    assert len(from_parquet) == 3
    assert jobs.open_images(f"imagefolder:{folder}").num_rows == 3
    assert jobs.open_images(folder / "coffee.jpg")["file_name"] == ["coffee.jpg"]
    with pytest.raises(FileNotFoundError, match="not an image folder"):
        jobs.open_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        jobs.open_images(tmp_path / "empty")


def test_shard_sources_are_recognised():
    assert jobs.is_shard_source("data/{00000..00009}.tar")
    assert jobs.is_shard_source("pipe:curl -s http://x/a.tar")
    assert not jobs.is_shard_source("photos/")


def test_encode_decode_round_trip(folder, tmp_path, tiny_model_dir, tiny_model):
    summary = jobs.encode(folder, tmp_path / "tokens", model=str(tiny_model_dir), progress=False)
    assert summary["rows_in"] == summary["rows_out"] == 3 and summary["skipped"] == 0
    saved = datasets.load_from_disk(str(tmp_path / "tokens"))
    assert saved.column_names == ["file_name", "vqgan_tokens"]
    tokens = np.asarray(saved.with_format("numpy")["vqgan_tokens"])
    expected = tiny_model.encode_images(
        np.stack([load_image(folder / name, 64) for name in saved["file_name"]])
    )
    assert np.array_equal(tokens, expected)
    decoded = jobs.decode(tmp_path / "tokens", tmp_path / "decoded")
    assert decoded["images"] == 3
    names = sorted(p.name for p in (tmp_path / "decoded").iterdir())
    assert names == ["astronaut.png", "coffee.png", "sub_chelsea.png"]
    image = np.asarray(Image.open(tmp_path / "decoded" / "astronaut.png"))
    assert np.abs(image.astype(int) - tiny_model.decode_images(expected[:1])[0]).max() <= 1
    # A token dataset reports codebook usage and decoded previews with its recorded model.
    page = Path(jobs.report(tmp_path / "tokens", tmp_path / "token_report", max_samples=3))
    assert "data:image/png;base64" in page.read_text()


def test_preview_report_info(folder, tmp_path, tiny_model_dir):
    grid = jobs.preview(folder, tmp_path / "grid.png", model=str(tiny_model_dir), count=2)
    assert Image.open(grid).size[0] >= 2 * 64
    page = jobs.report(folder, tmp_path / "report", model=str(tiny_model_dir), max_samples=3)
    html = Path(page).read_text()
    assert "PSNR" in html and "data:image/png;base64" in html
    info = jobs.info(str(tiny_model_dir))
    assert info["tokens_per_image"] == 256 and info["value_range"] == [-1.0, 1.0]
    assert info["devices"] and json.dumps(info)


def test_demo_runs_the_quickstart_job(tmp_path, tiny_model_dir):
    result = jobs.demo(tmp_path / "out", model=tiny_model_dir, progress=False)
    assert result["tokens"]["rows_out"] == len(list(SAMPLES.glob("*.jpg")))
    assert Path(result["preview"]).is_file()
    assert len(list((tmp_path / "out" / "decoded").glob("*.png"))) == result["tokens"]["rows_out"]
