"""Whole jobs on disk: encode → decode, preview, report, info, convert, demo. Telling sources
apart and opening them: test_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vqgan_datasets.jobs import commands as jobs
from vqgan_datasets.pipeline.images import load_image


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


# ------------------------------------------------------------------------------ decoded file names


def _token_rows(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, (count, 256), dtype=np.uint8)


HOSTILE_KEYS = ["a/b", "a_b", "k" * 300, "../up", "/abs/path", "A_B", "dup", "dup", ""]


def _check_names(out: Path, summary: dict, count: int) -> list[str]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert summary["images"] == len(files) == count
    assert all(p.parent == out for p in files)  # nothing outside, no subfolders
    names = [p.name for p in files]
    assert len({n.casefold() for n in names}) == count  # distinct on any file system
    assert all(len(n.encode()) <= 255 and not n.startswith(".") for n in names)
    return names


def test_decoded_file_names_never_collide(tmp_path, tiny_model_dir):
    """Keys that flatten to one name, a key too long for a file name, traversal and absolute
    names: one safe, distinct file each, and the summary counts the files written."""
    from vqgan_datasets.handle import ModelHandle
    from vqgan_datasets.hf import write_metadata

    count = len(HOSTILE_KEYS)
    dataset = datasets.Dataset.from_dict(
        {"__key__": HOSTILE_KEYS, "vqgan_tokens": _token_rows(count).tolist()},
        features=datasets.Features({"__key__": datasets.Value("string"),
                                    "vqgan_tokens": datasets.Sequence(datasets.Value("uint8"))}),
    )
    write_metadata(dataset, ModelHandle(str(tiny_model_dir)).spec())
    dataset.save_to_disk(str(tmp_path / "tokens"))
    summary = jobs.decode(tmp_path / "tokens", tmp_path / "out")
    names = _check_names(tmp_path / "out", summary, count)
    assert "a_b.png" in names and "up.png" not in names
    assert summary["renamed"] >= 4  # a_b or a/b, A_B, the long key, the second dup


def test_decoded_file_names_from_token_shards(tmp_path, tiny_model_dir):
    """The same for token shards (no record: the model is given)."""
    import io

    import webdataset as wds

    keys = ["a/b", "a_b", "k" * 300]
    with open(tmp_path / "tok.tar", "wb") as f, wds.TarWriter(f) as writer:
        for key, row in zip(keys, _token_rows(3), strict=True):
            buffer = io.BytesIO()
            np.save(buffer, row)
            writer.write({"__key__": key, "vqgan.npy": buffer.getvalue()})
    with pytest.raises(ValueError, match="no tokenizer record.*--model"):
        jobs.decode(tmp_path / "tok.tar", tmp_path / "none")
    summary = jobs.decode(tmp_path / "tok.tar", tmp_path / "out", model=str(tiny_model_dir))
    names = _check_names(tmp_path / "out", summary, 3)
    assert "a_b.png" in names and any(n.startswith("a_b-") for n in names)


def test_encode_takes_encode_options(folder, tmp_path, tiny_model_dir):
    from vqgan_datasets.options import EncodeOptions

    options = EncodeOptions(on_error="null", keep_image=True, workers=0, batch_size=2)
    summary = jobs.encode(folder, tmp_path / "t", model=str(tiny_model_dir), options=options,
                          keep_image=False, progress=False)  # a keyword overrides options
    assert summary["complete"] and summary["rows_out"] == summary["encoded"] == 3
    assert datasets.load_from_disk(str(tmp_path / "t")).column_names == [
        "file_name", "vqgan_tokens", "vqgan_tokens_error"]


def test_decode_finds_the_record_in_a_hub_layout(tmp_path, tiny_model_dir):
    """`push_to_hub --dry-run DIR` output (data/*.parquet and a README.md card): decoded
    without a model, from the folder or from a parquet file in it. Tokens with no record at
    all: the message says to pass --model, and with one they decode."""
    from vqgan_datasets.handle import ModelHandle
    from vqgan_datasets.hf import write_hub_files, write_metadata

    dataset = datasets.Dataset.from_dict({"file_name": ["x.jpg", "y.jpg"],
                                          "vqgan_tokens": _token_rows(2).tolist()})
    write_metadata(dataset, ModelHandle(str(tiny_model_dir)).spec())
    files = write_hub_files(dataset, tmp_path / "hub")
    assert jobs.decode(tmp_path / "hub", tmp_path / "a")["images"] == 2
    parquet = next(p for p in files if p.suffix == ".parquet")
    assert jobs.decode(parquet, tmp_path / "b", limit=1)["images"] == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.png", "y.png"]
    bare = datasets.Dataset.from_dict({"vqgan_tokens": _token_rows(2).tolist()})
    bare.to_parquet(str(tmp_path / "bare.parquet"))
    with pytest.raises(ValueError, match="pass --model"):
        jobs.decode(tmp_path / "bare.parquet", tmp_path / "c")
    summary = jobs.decode(tmp_path / "bare.parquet", tmp_path / "c", model=str(tiny_model_dir))
    assert summary["images"] == 2


# ------------------------------------------------------------------------------ null and bad rows


def test_null_rows_from_encode_are_counted_and_skipped_on_decode(folder, tmp_path,
                                                                 tiny_model_dir):
    """`encode --on-error null` then `decode`: every good row decoded, also those after the
    null, for datasets and for token shards; the summary counts the nulls."""
    import shutil

    import webdataset as wds

    from vqgan_datasets.jobs.shards import tokenize_shards

    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "broken.png").write_bytes(b"not a png")  # the second row of four
    jobs.encode(images, tmp_path / "t", model=str(tiny_model_dir), on_error="null",
                progress=False)
    summary = jobs.decode(tmp_path / "t", tmp_path / "d")
    assert (summary["images"], summary["nulls"], summary["skipped"]) == (3, 1, 0)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "astronaut.png", "coffee.png", "sub_chelsea.png"]
    page = Path(jobs.report(tmp_path / "t", tmp_path / "r", max_samples=4))  # nulls left out
    assert "data:image/png;base64" in page.read_text()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [  # nothing added to it
        "data-00000-of-00001.arrow", "dataset_info.json", "state.json"]

    with open(tmp_path / "in.tar", "wb") as f, wds.TarWriter(f) as writer:
        for key, data in (("a", b"not a jpeg"), ("b", (folder / "coffee.jpg").read_bytes()),
                          ("c", (folder / "astronaut.jpg").read_bytes())):
            writer.write({"__key__": key, "jpg": data})
    tokenize_shards(str(tmp_path / "in.tar"), tmp_path / "s", model=str(tiny_model_dir),
                    on_error="null", progress=False)
    summary = jobs.decode(tmp_path / "s", tmp_path / "ds")
    assert (summary["images"], summary["nulls"]) == (2, 1)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["b.png", "c.png"]


def test_decode_on_error_for_tokens_that_cannot_be_decoded(tmp_path, tiny_model_dir):
    from vqgan_datasets.handle import ModelHandle
    from vqgan_datasets.hf import write_metadata

    rows = _token_rows(3)
    rows[1, 5] = 200  # outside the 64-code codebook
    dataset = datasets.Dataset.from_dict(
        {"__key__": ["x", "bad", "z"], "vqgan_tokens": rows.tolist()},
        features=datasets.Features({"__key__": datasets.Value("string"),
                                    "vqgan_tokens": datasets.Sequence(datasets.Value("uint8"))}),
    )
    write_metadata(dataset, ModelHandle(str(tiny_model_dir)).spec())
    dataset.save_to_disk(str(tmp_path / "tokens"))
    with pytest.raises(ValueError, match="'bad'.*token id 200"):
        jobs.decode(tmp_path / "tokens", tmp_path / "a")
    summary = jobs.decode(tmp_path / "tokens", tmp_path / "b", on_error="skip")
    assert (summary["images"], summary["skipped"], summary["nulls"]) == (2, 1, 0)
    assert "token id 200" in summary["errors"][0]["reason"]
    with pytest.raises(ValueError, match="on_error"):
        jobs.decode(tmp_path / "tokens", tmp_path / "c", on_error="null")


def test_a_saved_dataset_with_no_rows_encodes_and_decodes_to_nothing(tmp_path, tiny_model_dir):
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features(
        {"image": datasets.Image()}))
    empty.save_to_disk(str(tmp_path / "empty"))  # datasets writes no data file for 0 rows
    summary = jobs.encode(tmp_path / "empty", tmp_path / "tokens", model=str(tiny_model_dir),
                          progress=False)
    assert summary["rows_in"] == summary["rows_out"] == summary["encoded"] == 0
    tokens = datasets.load_from_disk(str(tmp_path / "tokens"))
    assert len(tokens) == 0 and tokens.features["vqgan_tokens"].length == 256
    assert jobs.decode(tmp_path / "tokens", tmp_path / "decoded")["images"] == 0
