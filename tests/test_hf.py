"""hf.py: the datasets one-liner (fixed-size tokens, image column dropped), error policies,
fingerprints across processes, num_proc, decoding (map, lazy transform, streaming), metadata
through the Hub's parquet + card layout. Tiny checkpoints; every cache in a temp dir."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import TINY, photos
from datasets import Dataset, Features, Image, List, Value, load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from PIL import Image as PILImage

from vqgan_datasets import hf
from vqgan_datasets.hf import (
    VQGANDetokenizer,
    VQGANTokenizer,
    read_metadata,
    write_hub_files,
    write_metadata,
)
from vqgan_datasets.images import ImageDecodeError, load_image
from vqgan_datasets.metadata import TokenizerSpec
from vqgan_datasets.modeling import VQModel

REPO = Path(__file__).resolve().parents[1]
SIZE = TINY.resolution  # 64: 16×16 tokens
N = 6


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    """Six real photos, 96×96 (so preprocessing resizes), alternately PNG and JPEG below."""
    return np.concatenate([photos(96, 4), photos(96, 4)[::-1]])[:N]


def _image_rows(pictures) -> list[dict]:
    return [{"bytes": _encode(a, "PNG" if i % 2 else "JPEG"), "path": None}
            for i, a in enumerate(pictures)]


@pytest.fixture(scope="module")
def photo_dataset(pictures) -> Dataset:
    return Dataset.from_dict(
        {"image": _image_rows(pictures), "label": list(range(N)), "id": [f"k{i}" for i in range(N)]},
        features=Features({"image": Image(), "label": Value("int64"), "id": Value("string")}),
    )


@pytest.fixture(scope="module")
def ds_dir(photo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos_ds")
    photo_dataset.save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def ds(ds_dir) -> Dataset:
    """On disk, so that map caches (from_dict datasets are never cached)."""
    return load_from_disk(str(ds_dir))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> str:
    """Same config, other weights."""
    out = tmp_path_factory.mktemp("tiny_other")
    VQModel(TINY, seed=1).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tok(model_dir) -> VQGANTokenizer:
    return VQGANTokenizer(model_dir)


@pytest.fixture(scope="module")
def expected(tok, photo_dataset) -> np.ndarray:
    """Tokens of the photos computed without datasets: load_image + VQModel.encode_images."""
    images = [load_image(row, SIZE) for row in photo_dataset.cast_column("image", Image(decode=False))["image"]]
    return tok.model.encode_images(np.stack(images)).astype(np.uint8)


@pytest.fixture(scope="module")
def tokenized(tok, ds) -> Dataset:
    return tok.apply(ds)


class _Records(logging.Handler):
    """datasets' logger does not propagate to the root: listen on it directly."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def datasets_log():
    handler = _Records()
    logger = logging.getLogger("datasets")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _tokens(dataset, column="vqgan_tokens") -> np.ndarray:
    return np.asarray(dataset.with_format("numpy", dtype=np.uint8)[column])


# -- the one-liner ---------------------------------------------------------------------------


def test_one_liner_writes_fixed_size_tokens_and_drops_the_image(model_dir, ds, expected, datasets_log):
    tok = VQGANTokenizer(model_dir)
    assert not tok.loaded  # hashing for the fingerprint must not load the weights
    out = ds.map(tok, batched=True)
    assert out.column_names == ["label", "id", "vqgan_tokens"]
    assert out.features["vqgan_tokens"] == List(Value("uint8"), length=SIZE // 4 * SIZE // 4)
    assert out.data.schema.field("vqgan_tokens").type == pa.list_(pa.uint8(), 256)
    np.testing.assert_array_equal(_tokens(out), expected)
    assert out["label"] == list(range(N))
    assert not any("couldn't be hashed" in m for m in datasets_log), datasets_log
    assert out.features == tok.features(ds.features)


def test_keep_image_passes_the_stored_bytes_through(model_dir, ds, expected):
    tok = VQGANTokenizer(model_dir, keep_image=True, output_column="codes")
    out = ds.map(tok, batched=True)
    assert out.features["image"] == Image()
    assert out.data.column("image").to_pylist() == ds.data.column("image").to_pylist()
    np.testing.assert_array_equal(_tokens(out, "codes"), expected)


def test_the_callers_remove_columns_still_applies(tok, ds, expected):
    out = ds.map(tok, batched=True, remove_columns=["label", "id"])
    assert out.column_names == ["vqgan_tokens"]
    np.testing.assert_array_equal(_tokens(out), expected)


def test_every_input_kind_gives_the_same_tokens(tok, photo_dataset, expected, tmp_path):
    rows = photo_dataset.cast_column("image", Image(decode=False))["image"]
    paths = []
    for i, row in enumerate(rows):
        paths.append(str(tmp_path / f"{i}.img"))
        Path(paths[-1]).write_bytes(row["bytes"])
    kinds = {
        "decoded Image": photo_dataset,
        "Image(decode=False)": photo_dataset.cast_column("image", Image(decode=False)),
        "paths": Dataset.from_dict({"image": paths}),
        "bytes": Dataset.from_dict({"image": [r["bytes"] for r in rows]}),
        "numpy format": photo_dataset.with_format("numpy"),
        "arrow format": photo_dataset.with_format("arrow"),
        "stream": photo_dataset.to_iterable_dataset(),
        "arrow stream": photo_dataset.to_iterable_dataset().with_format("arrow"),
    }
    for name, dataset in kinds.items():
        out = tok.apply(dataset)
        assert "image" not in out.column_names, name
        assert out.features["vqgan_tokens"].length == 256, name
        if name.endswith("stream"):
            out = Dataset.from_list(list(out.with_format(None)), features=out.features)
        np.testing.assert_array_equal(_tokens(out), expected, err_msg=name)
    # The one-liner on an arrow-formatted dataset: a table in, a table out.
    out = photo_dataset.with_format("arrow").map(tok, batched=True)
    assert out.column_names == ["label", "id", "vqgan_tokens"]
    assert out.features["vqgan_tokens"] == List(Value("uint8"), length=256)
    # map(input_columns=[...]) hands over the column alone.
    out = photo_dataset.map(tok, batched=True, input_columns=["image"], remove_columns=["image"])
    np.testing.assert_array_equal(_tokens(out), expected)


def test_map_without_batched_is_refused(tok, photo_dataset):
    with pytest.raises(TypeError, match="batched=True"):
        photo_dataset.select(range(1)).map(tok)


# -- error policies ---------------------------------------------------------------------------


def _with_bad_row(photo_dataset, *, key_column=True, path=None) -> Dataset:
    rows = list(photo_dataset.cast_column("image", Image(decode=False))["image"])
    rows[3] = {"bytes": None, "path": path} if path else {"bytes": b"not an image", "path": None}
    data = {"image": rows, "label": list(range(N))}
    features = {"image": Image(), "label": Value("int64")}
    if key_column:
        data["id"], features["id"] = [f"k{i}" for i in range(N)], Value("string")
    return Dataset.from_dict(data, features=Features(features))


def test_raise_names_the_key_the_index_or_the_path(tok, photo_dataset):
    with pytest.raises(ImageDecodeError, match=r"sample 'k3' \(key\): column 'image'") as err:
        _with_bad_row(photo_dataset).map(tok, batched=True)
    assert err.value.key == "k3"
    plain = _with_bad_row(photo_dataset, key_column=False)
    with pytest.raises(ImageDecodeError, match=r"sample 3 \(index\)") as err:
        plain.map(tok, batched=True, with_indices=True)
    assert err.value.key == 3
    missing = _with_bad_row(photo_dataset, key_column=False, path="/nowhere/x.jpg")
    with pytest.raises(ImageDecodeError, match=r"row 3 of this map batch \(path '/nowhere/x.jpg'\)"):
        missing.map(tok, batched=True)


def test_skip_drops_rows_and_keeps_columns_aligned(model_dir, photo_dataset, expected, caplog):
    tok = VQGANTokenizer(model_dir, on_error="skip")
    bad = _with_bad_row(photo_dataset)
    with caplog.at_level(logging.WARNING, logger="vqgan_datasets.hf"):
        out = bad.map(tok, batched=True)
    keep = [i for i in range(N) if i != 3]
    assert out["label"] == keep and out["id"] == [f"k{i}" for i in keep]
    np.testing.assert_array_equal(_tokens(out), expected[keep])
    assert tok.stats.skipped == 1 and tok.stats.encoded == N - 1
    assert any("1 of 6 rows" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    # The same on a stream, where datasets requires every returned column to line up.
    streamed = list(tok.apply(bad.to_iterable_dataset()))
    assert [r["label"] for r in streamed] == keep and "image" not in streamed[0]
    np.testing.assert_array_equal(np.stack([r["vqgan_tokens"] for r in streamed]), expected[keep])


def test_null_writes_null_tokens_and_the_reason(model_dir, photo_dataset, expected):
    tok = VQGANTokenizer(model_dir, on_error="null")
    bad = _with_bad_row(photo_dataset)
    out = bad.map(tok, batched=True)
    assert out.features == tok.features(bad.features)
    tokens = out["vqgan_tokens"]
    errors = out["vqgan_tokens_error"]
    assert tokens[3] is None and "image" in errors[3]
    assert [e is None for e in errors] == [i != 3 for i in range(N)]
    np.testing.assert_array_equal(np.array([t for t in tokens if t is not None]),
                                  expected[[0, 1, 2, 4, 5]])
    assert tok.stats.nulls == 1


# -- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_is_the_small_identity(model_dir, other_dir, tok):
    fresh = VQGANTokenizer(model_dir)
    assert Hasher.hash(fresh) == Hasher.hash(tok) == Hasher.hash(pickle.loads(pickle.dumps(tok)))
    assert not fresh.loaded
    assert len(pickle.dumps(fresh)) < 4000  # no weights, no jitted functions
    variants = {
        "other weights": VQGANTokenizer(other_dir),
        "image size": VQGANTokenizer(model_dir, image_size=32),
        "value range": VQGANTokenizer(model_dir, value_range=(0, 1)),
        "dtype": VQGANTokenizer(model_dir, dtype="bfloat16"),
        "output column": VQGANTokenizer(model_dir, output_column="codes"),
        "on_error": VQGANTokenizer(model_dir, on_error="null"),
        "keep_image": VQGANTokenizer(model_dir, keep_image=True),
        "draft": VQGANTokenizer(model_dir, draft=False),
    }
    hashes = {name: Hasher.hash(t) for name, t in variants.items()}
    assert len(set(hashes.values()) | {Hasher.hash(tok)}) == len(variants) + 1, hashes
    assert not any(t.loaded for t in variants.values())


def test_lazy_spec_matches_the_loaded_model(model_dir, tok):
    model = VQModel.from_pretrained(model_dir)
    assert tok.spec == TokenizerSpec.from_model(model, image_size=SIZE)
    # A VQModel loaded from the same files is the same tokenizer.
    assert Hasher.hash(VQGANTokenizer(model)) == Hasher.hash(tok)
    # In-memory weights: a params digest, stable for equal weights.
    a, b = VQGANTokenizer(VQModel(TINY, seed=0)), VQGANTokenizer(VQModel(TINY, seed=0))
    assert Hasher.hash(a) == Hasher.hash(b)
    assert a.spec.weights_digest.startswith("params-sha256:")


CACHE_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import datasets
    from vqgan_datasets.hf import VQGANTokenizer

    datasets.logging.set_verbosity_info()
    ds = datasets.load_from_disk(sys.argv[1])
    tok = VQGANTokenizer(sys.argv[2])
    out = ds.map(tok, batched=True)
    print(json.dumps({"cache_files": [f["filename"] for f in out.cache_files],
                      "loaded": tok.loaded, "rows": tok.stats.rows,
                      "tokens": out["vqgan_tokens"][0][:8]}))
    """
)


def _run(script: str, *args: str, env_extra: dict | None = None, timeout: float = 240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_a_second_process_hits_the_cache_without_encoding(photo_dataset, model_dir, tmp_path):
    data = tmp_path / "ds"
    photo_dataset.save_to_disk(str(data))
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    first = _run(CACHE_SCRIPT, str(data), model_dir, env_extra=env)
    assert first.returncode == 0, first.stderr
    second = _run(CACHE_SCRIPT, str(data), model_dir, env_extra=env)
    assert second.returncode == 0, second.stderr
    one, two = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, second))
    assert one["loaded"] and one["rows"] == N
    assert not two["loaded"] and two["rows"] == 0  # the encoder never ran
    assert "Loading cached processed dataset" in second.stderr
    assert one["cache_files"] == two["cache_files"] and one["tokens"] == two["tokens"]
    for p in (first, second):
        assert "couldn't be hashed" not in p.stderr


def test_two_checkpoints_never_share_a_cache_entry(tok, other_dir, ds):
    other = VQGANTokenizer(other_dir)
    a = ds.map(tok, batched=True)
    b = ds.map(other, batched=True)
    assert a.cache_files[0]["filename"] != b.cache_files[0]["filename"]
    assert not np.array_equal(_tokens(a), _tokens(b))
    assert ds.map(tok, batched=True).cache_files == a.cache_files  # and the same one does


# -- pickling and processes ---------------------------------------------------------------------


def test_an_unpickled_copy_reloads_from_the_checkpoint(tok, photo_dataset, expected):
    copy = pickle.loads(pickle.dumps(tok))
    assert not copy.loaded and copy.spec == tok.spec
    out = copy(photo_dataset[:N])
    np.testing.assert_array_equal(np.asarray(out["vqgan_tokens"]), expected)


def test_in_memory_weights_cannot_be_rebuilt_elsewhere(photo_dataset):
    copy = pickle.loads(pickle.dumps(VQGANTokenizer(VQModel(TINY, seed=0))))
    with pytest.raises(RuntimeError, match="in-memory VQModel"):
        copy(photo_dataset[:2])


def test_changed_weights_are_noticed_before_encoding(tiny_model, other_dir, photo_dataset, tmp_path):
    directory = tmp_path / "model"
    tiny_model.save_pretrained(directory)
    tok = VQGANTokenizer(str(directory))
    fingerprint = Hasher.hash(tok)
    VQModel.from_pretrained(other_dir).save_pretrained(directory)
    with pytest.raises(ValueError, match="changed since"):
        tok(photo_dataset[:2])
    assert Hasher.hash(VQGANTokenizer(str(directory))) != fingerprint


NUM_PROC_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import datasets
    import numpy as np
    from vqgan_datasets.hf import VQGANTokenizer

    ds = datasets.load_from_disk(sys.argv[1])
    tok = VQGANTokenizer(sys.argv[2])
    # JAX has not started here: each worker loads the model itself.
    parallel = ds.map(tok, batched=True, batch_size=2, num_proc=2)
    result = {"parent_loaded_after_workers": tok.loaded}
    serial = ds.map(tok, batched=True, batch_size=2, load_from_cache_file=False)  # JAX starts
    result["same_tokens"] = parallel["vqgan_tokens"] == serial["vqgan_tokens"]
    start = time.monotonic()
    try:
        ds.map(VQGANTokenizer(sys.argv[2], output_column="again"), batched=True, num_proc=2)
        result["error"] = None
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.monotonic() - start
    print(json.dumps(result))
    """
)


def test_num_proc_workers_load_lazily_or_fail_fast(photo_dataset, model_dir, tmp_path):
    data = tmp_path / "ds"
    photo_dataset.save_to_disk(str(data))
    # A hang fails this test (timeout) instead of blocking the suite.
    proc = _run(NUM_PROC_SCRIPT, str(data), model_dir,
                env_extra={"HF_DATASETS_CACHE": str(tmp_path / "cache")}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["parent_loaded_after_workers"] is False
    assert result["same_tokens"] is True
    assert result["error"] and "RuntimeError" in result["error"]
    assert "forked after JAX" in result["error"] and "Drop num_proc" in result["error"]
    assert result["seconds"] < 60


# -- the default instances ------------------------------------------------------------------------


def test_ready_instances_resolve_nothing_until_used():
    assert hf.vqgan_tokenize.loaded is False and hf.vqgan_tokenize._spec is None
    assert hf.vqgan_tokenize._source._described is None  # not even config.json
    assert hf.vqgan_detokenize._source._described is None


def test_hub_identity_comes_from_the_cache_without_reading_weights(tmp_path, monkeypatch):
    """A fake Hub cache whose weights blob is not even a checkpoint: the digest is its name."""
    from huggingface_hub import constants

    commit = "a" * 40
    sha = "b" * 64
    repo = tmp_path / "models--flax-community--vqgan_f16_16384"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs" / sha).write_bytes(b"never read")
    (repo / "blobs" / ("c" * 40)).write_text(json.dumps({"_name_or_path": "x", **TINY.to_dict()}))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "flax_model.msgpack").symlink_to(Path("../../blobs") / sha)
    (snapshot / "config.json").symlink_to(Path("../../blobs") / ("c" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tok = VQGANTokenizer()  # flax-community/vqgan_f16_16384, as vqgan_tokenize
    assert Hasher.hash(tok) == Hasher.hash(VQGANTokenizer())
    assert tok.spec.weights_digest == f"sha256:{sha}"
    assert tok.spec.revision == commit and tok.spec.model_name == hf.DEFAULT_MODEL
    assert not tok.loaded


# -- decoding --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detok(tokenized) -> VQGANDetokenizer:
    return VQGANDetokenizer.from_dataset(tokenized)


@pytest.fixture(scope="module")
def expected_images(tok, expected) -> np.ndarray:
    return tok.model.decode_images(expected)


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


# -- metadata and the Hub layout ----------------------------------------------------------------


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
    loaded = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))
    np.testing.assert_array_equal(_tokens(loaded), expected)
    assert VQGANDetokenizer.from_dataset(loaded).spec_for().weights_digest == read_metadata(
        loaded).weights_digest
