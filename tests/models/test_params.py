"""Parameter trees and the checks a weights file passes before it becomes a model: enough
tensors for the config (counted before anything is built), float tensors only."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets.models import params
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.modeling import VQModel


def _model_dir(tiny_model_dir, tmp_path, **change):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **change}))
    return out


@pytest.mark.parametrize("change", [{"num_res_blocks": 64},
                                    {"num_res_blocks": 8, "ch_mult": [1] * 14, "resolution": 8192}])
def test_a_config_wanting_more_blocks_than_the_weights_fails_before_building(
        tiny_model_dir, tmp_path, change):
    # Within every bound, but the file holds a 1-block, 3-level model: building the config's
    # shapes first would trace hundreds of blocks (tens of seconds) before the diff.
    directory = _model_dir(tiny_model_dir, tmp_path, **change)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(directory))
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "the weights do not fit the config (config.json)" in message
    assert f"num_res_blocks={change['num_res_blocks']}" in message
    assert "the file holds 58" in message


def test_check_fits_counts_kernels_only():
    flat = {("a", "kernel"): np.zeros((3, 3, 1, 1))} | {("b", str(i)): np.zeros(3) for i in range(9)}
    params.check_fits(flat, TINY.replace(num_res_blocks=0), origin="x")
    with pytest.raises(CheckpointError, match="needs at least 12 convolution kernels, the file "
                                              "holds 1"):
        params.check_fits(flat, TINY, origin="x")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_tensors_are_refused_by_name(tiny_model_dir, tmp_path, dtype):
    from safetensors.numpy import load_file, save_file

    directory = _model_dir(tiny_model_dir, tmp_path)
    (directory / "flax_model.msgpack").unlink()
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["quantize.embedding.embedding"] = tensors["quantize.embedding.embedding"].astype(dtype)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(directory))
    message = str(info.value)
    assert "tensor 'quantize.embedding.embedding' holds" in message
    assert np.dtype(dtype).name in message and "expected floating point weights" in message


def test_integer_tensors_in_msgpack_are_refused_by_name(tiny_model, tmp_path):
    from flax.serialization import msgpack_serialize

    flat = params.flatten(tiny_model.params)
    flat[("decoder", "conv_out", "bias")] = np.zeros(3, np.int64)
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(params.unflatten(flat)))
    with pytest.raises(CheckpointError, match="tensor 'decoder/conv_out/bias' holds int64"):
        VQModel.from_pretrained(str(tmp_path))


def test_float_tensors_of_every_width_load_as_float32(tmp_path):
    file = tmp_path / "model.safetensors"
    for dtype in (np.float16, np.float32, np.float64):
        out = params.float_tensor(np.ones(2, dtype), file, ("a", "b"))
        assert out.dtype == np.float32 and out.tolist() == [1.0, 1.0]
