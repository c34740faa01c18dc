"""handle.py: one rule for models by name, by path and in memory; one cache."""

from __future__ import annotations

import os
import pickle

import pytest

from vqgan_datasets.handle import ModelHandle, parse_value_range
from vqgan_datasets.models import checkpoints
from vqgan_datasets.models.modeling import VQModel


def test_a_path_is_described_without_loading_and_loaded_once(tiny_model, tiny_model_dir):
    handle = ModelHandle(str(tiny_model_dir))
    assert handle.ref == os.path.abspath(tiny_model_dir) and not handle.loaded
    config, digest, commit = handle.describe()
    assert digest == checkpoints.file_digest(checkpoints.weights_file(tiny_model_dir))
    assert config == tiny_model.config and commit is None and not handle.loaded
    assert handle.spec(32).image_size == 32 and handle.spec().model_name == handle.ref
    model = handle.load()
    assert handle.loaded and model.weights_digest == digest
    # Equal handles share the one cached model; another dtype is another model.
    assert ModelHandle(tiny_model_dir).load() is model
    assert ModelHandle(tiny_model_dir, dtype="bfloat16").load() is not model
    assert ModelHandle.of(handle) is handle
    assert ModelHandle.of(handle, dtype="bfloat16").dtype == "bfloat16"


def test_pickles_as_a_reference_or_by_value(tiny_model, tiny_model_dir):
    handle = ModelHandle(str(tiny_model_dir))
    handle.describe()
    blob = pickle.dumps(handle)
    assert len(blob) < 2000  # the reference, not the weights
    clone = pickle.loads(blob)
    assert not clone.loaded and clone.describe() == handle.describe()
    assert clone.load() is handle.load()  # the one cache

    # A VQModel loaded from a checkpoint travels as its reference too.
    loaded = VQModel.from_pretrained(str(tiny_model_dir), value_range=(0, 1))
    clone = pickle.loads(pickle.dumps(ModelHandle(loaded)))
    assert clone.ref == os.path.abspath(tiny_model_dir)
    assert tuple(clone.load().config.value_range) == (0.0, 1.0)

    # In-memory weights travel by value, and cannot go to other machines.
    memory = ModelHandle(tiny_model)
    assert memory.ref is None and memory.loaded
    assert len(pickle.dumps(memory)) > 100_000
    clone = pickle.loads(pickle.dumps(memory))
    assert clone.load().weights_digest == tiny_model.weights_digest
    with pytest.raises(ValueError, match="save_pretrained"):
        memory.portable()


def test_portable_pins_the_identity_and_changed_weights_raise(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    portable = ModelHandle(str(tmp_path / "m")).portable()
    assert portable.describe()[1] == VQModel.from_pretrained(str(tmp_path / "m")).weights_digest
    # The weights change on disk after the handle was described: loading refuses.
    other = VQModel(tiny_model.config, seed=1)
    other.save_pretrained(tmp_path / "m")
    stale = pickle.loads(pickle.dumps(portable))
    with pytest.raises(checkpoints.CheckpointError, match="changed"):
        stale.load()


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="VQModel"):
        ModelHandle(3)
    with pytest.raises(ValueError, match="dtype"):
        ModelHandle("x", dtype="int8")
    assert parse_value_range("0,1") == (0.0, 1.0)
    with pytest.raises(ValueError, match="low < high"):
        parse_value_range((1, 0))


def test_a_cached_model_whose_weights_were_replaced_is_not_reused(tiny_model, tmp_path):
    # vqgan-jax's `model.params = state` on a model the cache holds: a later handle to the
    # checkpoint (or to the old in-memory weights) must get those weights, not the new ones.
    tiny_model.save_pretrained(tmp_path / "m")
    held = ModelHandle(str(tmp_path / "m")).load()
    digest = held.weights_digest
    held.params = VQModel(tiny_model.config, seed=1).params
    fresh = ModelHandle(str(tmp_path / "m")).load()
    assert fresh is not held and fresh.weights_digest == digest
    assert ModelHandle(str(tmp_path / "m")).load() is fresh  # the cache holds it now

    memory = VQModel(tiny_model.config, seed=2)
    blob = pickle.dumps(ModelHandle(memory))
    old = memory.weights_digest
    memory.params = VQModel(tiny_model.config, seed=3).params
    assert pickle.loads(blob).load().weights_digest == old
