"""Checkpoint files: layouts, Hub cache offline, safetensors/msgpack, digests, taming conversion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets import checkpoints
from vqgan_datasets.checkpoints import CheckpointError
from vqgan_datasets.modeling import VQModel


def _same_params(a, b) -> bool:
    fa, fb = checkpoints._flatten(a), checkpoints._flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_save_pretrained_round_trips_exactly(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "model.safetensors", "flax_model.msgpack",
    }
    loaded = VQModel.from_pretrained(str(tmp_path))
    assert loaded.config == tiny_model.config
    assert _same_params(loaded.params, tiny_model.params)
    # Each format alone loads the same weights.
    for keep in ("model.safetensors", "flax_model.msgpack"):
        only = tmp_path / keep.split(".")[0]
        only.mkdir()
        shutil.copy(tmp_path / "config.json", only)
        shutil.copy(tmp_path / keep, only)
        assert _same_params(VQModel.from_pretrained(str(only)).params, tiny_model.params)


def test_msgpack_is_vqgan_jax_tree(tiny_model, tmp_path):
    from flax.serialization import msgpack_restore

    tiny_model.save_pretrained(tmp_path, formats=("msgpack",))
    tree = msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    assert sorted(tree) == ["decoder", "encoder", "post_quant_conv", "quant_conv", "quantize"]
    assert tree["encoder"]["down_0"]["block_0"]["norm1"]["scale"].shape == (32,)
    assert tree["quantize"]["embedding"]["embedding"].shape == (64, 16)
    assert tree["encoder"]["down_1"]["downsample"]["conv"]["kernel"].shape == (3, 3, 64, 64)
    assert tree["decoder"]["up_1"]["upsample"]["conv"]["kernel"].shape == (3, 3, 64, 64)


def test_vqgan_jax_config_and_legacy_shapes_load(tiny_model, tmp_path):
    """A vqgan-jax upload: transformers keys in config.json, a "params"-free tree, and GroupNorm
    scale/bias stored as (1, 1, 1, C) as older uploads did."""
    from flax.serialization import msgpack_serialize

    config = TINY.to_dict()
    del config["value_range"], config["norm_groups"]
    config.update(architectures=["VQGANModel"], transformers_version="4.9.0", model_type="vqgan")
    (tmp_path / "config.json").write_text(json.dumps(config))
    flat = checkpoints._flatten(tiny_model.params)
    legacy = {
        k: (v.reshape(1, 1, 1, -1) if k[-1] in ("scale",) or ("norm" in k[-2] and k[-1] == "bias") else v)
        for k, v in flat.items()
    }
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints._unflatten(legacy)))
    loaded = VQModel.from_pretrained(str(tmp_path))
    assert loaded.config.value_range == (-1.0, 1.0)
    assert _same_params(loaded.params, tiny_model.params)


def test_mismatched_params_give_one_readable_diff(tiny_model, tmp_path):
    from flax.serialization import msgpack_serialize

    flat = checkpoints._flatten(tiny_model.params)
    del flat[("encoder", "conv_in", "bias")]
    flat[("encoder", "extra", "kernel")] = np.zeros(3)
    flat[("quantize", "embedding", "embedding")] = np.zeros((10, 16))
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints._unflatten(flat)))
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "missing (1): encoder/conv_in/bias" in message
    assert "unexpected (1): encoder/extra/kernel" in message
    assert "quantize/embedding/embedding: expected (64, 16), got (10, 16)" in message


def _hub_cache(root: Path, repo_id: str, model_dir: Path, commit: str = "a" * 40) -> None:
    """The huggingface_hub cache layout: blobs named by sha256, snapshots linking to them."""
    import hashlib

    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("config.json", "flax_model.msgpack"):
        data = (model_dir / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)


def test_loads_by_repo_id_from_offline_hub_cache(tiny_model_dir, tmp_path):
    """A fresh process with HF_HOME pointing at a cache we built and HF_HUB_OFFLINE=1."""
    _hub_cache(tmp_path / "hf" / "hub", "test-org/tiny-vqgan", tiny_model_dir)
    script = (
        "from vqgan_datasets import VQModel\n"
        "m = VQModel.from_pretrained('test-org/tiny-vqgan')\n"
        "print(m.revision, m.weights_digest, m.config.n_embed)\n"
        "try:\n"
        "    VQModel.from_pretrained('test-org/not-cached')\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first, error = out.stdout.strip().splitlines()[-2:]
    revision, digest, n_embed = first.split()
    assert revision == "a" * 40 and n_embed == "64"
    data = (tiny_model_dir / "flax_model.msgpack").read_bytes()
    import hashlib

    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert error.startswith("ERR CheckpointError")
    assert "test-org/not-cached" in error and "HF_HUB_OFFLINE" in error
    assert "pass a local model directory" in error


def test_file_digest_hashes_local_files_once(tiny_model_dir):
    file = tiny_model_dir / "model.safetensors"
    first = checkpoints.file_digest(file)
    assert first.startswith("sha256:") and checkpoints.file_digest(file) == first


def test_ckpt_path_is_not_a_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="convert_taming_checkpoint"):
        VQModel.from_pretrained(str(tmp_path / "last.ckpt"))


def test_known_checkpoint_gets_its_recorded_value_range(tmp_path):
    config = TINY.to_dict()
    del config["value_range"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoints.load_config(tmp_path, "flax-community/vqgan_f16_16384").value_range == (-1.0, 1.0)
    config["value_range"] = [0, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoints.load_config(tmp_path, "anything").value_range == (0.0, 1.0)


torch = pytest.importorskip("torch")


def _taming_state(model: VQModel) -> dict:
    """Our tree back to taming's names and layouts (the inverse of the conversion)."""
    state = {}
    for key, value in checkpoints._flatten(model.params).items():
        *path, leaf = key
        name = ".".join(path)
        for prefix in ("down", "up", "block", "attn"):
            name = name.replace(f"{prefix}_", f"{prefix}.")
        if leaf == "kernel":
            state[name + ".weight"] = torch.from_numpy(np.asarray(value).transpose(3, 2, 0, 1).copy())
        elif leaf in ("scale", "embedding"):
            state[name + ".weight"] = torch.from_numpy(np.asarray(value).copy())
        else:
            state[name + ".bias"] = torch.from_numpy(np.asarray(value).copy())
    return state


def test_convert_plain_state_dict_and_errors(tiny_model, tmp_path):
    state = _taming_state(tiny_model)
    torch.save(state, tmp_path / "plain.pt")
    out = checkpoints.convert_taming_checkpoint(tmp_path / "plain.pt", tmp_path / "m", TINY)
    assert _same_params(VQModel.from_pretrained(str(out)).params, tiny_model.params)
    # Architecture read off the weights when no config is given.
    out2 = checkpoints.convert_taming_checkpoint(tmp_path / "plain.pt", tmp_path / "m2")
    assert VQModel.from_pretrained(str(out2)).config == TINY.replace(resolution=256, attn_resolutions=(64,))
    broken = dict(state)
    broken.pop("encoder.conv_in.bias")
    broken["decoder.extra.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError) as info:
        checkpoints.convert_taming_checkpoint(tmp_path / "broken.ckpt", tmp_path / "b", TINY)
    assert "missing (1): encoder/conv_in/bias" in str(info.value)
    assert "decoder/extra/kernel" in str(info.value)


class Payload:
    """Stands for anything a malicious pickle could construct."""

    def __reduce__(self):
        return (print, ("side effect from the checkpoint",))


def test_pickled_code_is_refused_without_the_flag(tiny_model, tmp_path, capsys):
    import pickle

    torch.save({"state_dict": _taming_state(tiny_model), "evil": Payload()}, tmp_path / "x.ckpt",
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="builtins.print.*unsafe_pickle=True"):
        checkpoints.convert_taming_checkpoint(tmp_path / "x.ckpt", tmp_path / "m", TINY)
    assert "side effect" not in capsys.readouterr().out
    checkpoints.convert_taming_checkpoint(tmp_path / "x.ckpt", tmp_path / "m", TINY,
                                          unsafe_pickle=True)
    assert "side effect" in capsys.readouterr().out


def test_taming_yaml_config(tmp_path):
    (tmp_path / "model.yaml").write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 16\n"
        "    n_embed: 64\n    ddconfig:\n      double_z: false\n      z_channels: 32\n"
        "      resolution: 64\n      in_channels: 3\n      out_ch: 3\n      ch: 32\n"
        "      ch_mult: [1, 2, 2]\n      num_res_blocks: 1\n      attn_resolutions: [16]\n"
        "      dropout: 0.0\n    lossconfig:\n      target: taming.modules.losses.DummyLoss\n"
    )
    from vqgan_datasets.config import VQGANConfig

    assert VQGANConfig.from_taming_yaml(tmp_path / "model.yaml") == TINY
