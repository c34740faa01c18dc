"""Every example runs against a tiny checkpoint, as a user would run it."""

from __future__ import annotations

import importlib.util
import io
import shutil
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "vqgan_datasets" / "_demo" / "images"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        shutil.copy(SAMPLES / f"{name}.jpg", out)
    return out


def test_tokenize_then_decode_examples(photos_dir, tiny_model_dir, tmp_path, capsys):
    assert _example("tokenize_hf_dataset").main(
        ["--model", str(tiny_model_dir), "--images", str(photos_dir), "--output",
         str(tmp_path / "tokens")]) == 0
    assert "3 images" in capsys.readouterr().out
    tokens = datasets.load_from_disk(str(tmp_path / "tokens"))
    assert tokens.features["vqgan_tokens"].length == 256
    decode = _example("decode_tokens")
    assert decode.main(["--tokens", str(tmp_path / "tokens"), "--output", str(tmp_path / "d")]) == 0
    assert decode.main(["--tokens", str(tmp_path / "tokens"), "--output", str(tmp_path / "s"),
                        "--stream", "--limit", "2"]) == 0
    assert len(list((tmp_path / "d").glob("*.png"))) == 3
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    assert Image.open(tmp_path / "d" / "00000.png").size == (64, 64)


def test_tokenize_webdataset_example(tiny_model_dir, tmp_path):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name in ("astronaut", "coffee"):
            for ext, data in (("jpg", (SAMPLES / f"{name}.jpg").read_bytes()),
                              ("txt", f"a photo of {name}".encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert _example("tokenize_webdataset").main(
        ["--model", str(tiny_model_dir), "--input", str(shard), "--output", str(tmp_path / "out"),
         "--no-progress"]) == 0
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        names = sorted(tar.getnames())
    assert names == ["astronaut.txt", "astronaut.vqgan.npy", "coffee.txt", "coffee.vqgan.npy"]


def test_push_to_hub_example_dry_run(photos_dir, tiny_model_dir, tmp_path):
    ds = datasets.load_dataset("imagefolder", data_dir=str(photos_dir), split="train")
    ds.save_to_disk(str(tmp_path / "images"))
    assert _example("push_to_hub").main(
        ["--model", str(tiny_model_dir), "--dataset-dir", str(tmp_path / "images"),
         "--repo-id", "org/name", "--dry-run", str(tmp_path / "hub")]) == 0
    loaded = datasets.load_dataset(str(tmp_path / "hub"), split="train")
    from vqgan_datasets.hf import read_metadata

    assert read_metadata(loaded).sequence_length == 256
    assert np.asarray(loaded.with_format("numpy")["vqgan_tokens"]).shape == (3, 256)
