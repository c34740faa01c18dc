"""hf_model.py and the tokenizer's pickled identity: fingerprints across processes, the model
loaded lazily and checked, num_proc workers, Hub identities read from the cache."""

from __future__ import annotations

import json
import pickle
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from datasets.fingerprint import Hasher
from hf_helpers import SIZE, N, run_python, tokens_of

from vqgan_datasets import hf
from vqgan_datasets.handle import ModelHandle
from vqgan_datasets.hf import VQGANTokenizer
from vqgan_datasets.metadata import TokenizerSpec
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.options import EncodeOptions

pytest_plugins = ["hf_fixtures"]


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
        "preprocess": VQGANTokenizer(model_dir, preprocess="fast"),
        "token dtype": VQGANTokenizer(model_dir, token_dtype="int32"),
    }
    hashes = {name: Hasher.hash(t) for name, t in variants.items()}
    assert len(set(hashes.values()) | {Hasher.hash(tok)}) == len(variants) + 1, hashes
    assert not any(t.loaded for t in variants.values())
    # Settings that change speed, not tokens, are not part of it; nor is the deprecated draft
    # (preprocess="exact" decodes every JPEG fully, as draft=False did).
    same = [VQGANTokenizer(model_dir, batch_size=3), VQGANTokenizer(model_dir, workers=0),
            VQGANTokenizer(model_dir, options=EncodeOptions(image_field="image"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        same.append(VQGANTokenizer(model_dir, draft=False))
    assert {Hasher.hash(t) for t in same} == {Hasher.hash(tok)}


def test_replacing_a_models_params_changes_the_tokenizers_fingerprint(model_dir, tok):
    # vqgan-jax's `model.params = state` after the tokenizer was made (e.g. a training loop
    # tokenizing with the current weights): other weights must never hit the old cache entry,
    # nor travel to workers as the checkpoint they no longer are.
    model = VQModel.from_pretrained(model_dir)
    current = VQGANTokenizer(model)
    assert Hasher.hash(current) == Hasher.hash(tok)
    model.params = VQModel(TINY, seed=1).params
    assert current.spec.weights_digest == model.weights_digest != tok.spec.weights_digest
    assert Hasher.hash(current) == Hasher.hash(VQGANTokenizer(model)) != Hasher.hash(tok)
    assert current.spec.model_name is None  # in memory now, not the checkpoint's reference
    assert pickle.loads(pickle.dumps(current)).spec.model_name is None


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


def test_a_second_process_hits_the_cache_without_encoding(photo_dataset, model_dir, tmp_path):
    data = tmp_path / "ds"
    photo_dataset.save_to_disk(str(data))
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    first = run_python(CACHE_SCRIPT, str(data), model_dir, env_extra=env)
    assert first.returncode == 0, first.stderr
    second = run_python(CACHE_SCRIPT, str(data), model_dir, env_extra=env)
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
    assert not np.array_equal(tokens_of(a), tokens_of(b))
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
    proc = run_python(NUM_PROC_SCRIPT, str(data), model_dir,
                      env_extra={"HF_DATASETS_CACHE": str(tmp_path / "cache")}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["parent_loaded_after_workers"] is False
    assert result["same_tokens"] is True
    assert result["error"] and "RuntimeError" in result["error"]
    assert "forked after JAX" in result["error"] and "Drop num_proc" in result["error"]
    assert result["seconds"] < 60
    # One warning in the parent that the workers buy nothing, none from each worker.
    assert proc.stderr.count("buy nothing") == 1, proc.stderr[-3000:]
    assert "forked worker process" not in proc.stderr


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json
    from datasets import Dataset
    from vqgan_datasets.hf import vqgan_detokenize, vqgan_tokenize

    errors = []
    for data, fn in ((Dataset.from_dict({"image": ["/nowhere/a.jpg"]}), vqgan_tokenize),
                     (Dataset.from_dict({"vqgan_tokens": [[1] * 256]}), vqgan_detokenize)):
        try:
            data.map(fn, batched=True)
            errors.append(None)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    print(json.dumps(errors))
    """
)


def test_the_default_model_offline_fails_with_the_reason_not_a_hash_warning(tmp_path):
    """Offline with an empty Hub cache, pickling (datasets' fingerprint) cannot describe the
    default model: no "couldn't be hashed" warning first, and the call says what to do."""
    proc = run_python(OFFLINE_SCRIPT, env_extra={"HF_HOME": str(tmp_path / "hf"),
                                                 "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for error in errors:
        assert error and error.startswith("CheckpointError"), errors
        assert "not in the local Hugging Face cache" in error and "hf download" in error
    assert "couldn't be hashed" not in proc.stderr, proc.stderr[-3000:]


# -- Hub checkpoints ------------------------------------------------------------------------------


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


def test_a_model_handle_is_a_model_too(model_dir, tok):
    assert Hasher.hash(VQGANTokenizer(ModelHandle(model_dir))) == Hasher.hash(tok)
    handle = ModelHandle(model_dir)
    assert VQGANTokenizer(handle)._source is handle  # shared: loaded once for both
