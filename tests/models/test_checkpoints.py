"""Checkpoint files: layouts, Hub cache offline, safetensors/msgpack, digests, and the layering
(checkpoints sits below modeling). taming conversion: tests/test_taming.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets.models import checkpoints
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.modeling import VQModel, param_shapes


def _same_params(a, b) -> bool:
    fa, fb = checkpoints.flatten(a), checkpoints.flatten(b)
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
    flat = checkpoints.flatten(tiny_model.params)
    legacy = {
        k: (v.reshape(1, 1, 1, -1) if k[-1] in ("scale",) or ("norm" in k[-2] and k[-1] == "bias") else v)
        for k, v in flat.items()
    }
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints.unflatten(legacy)))
    loaded = VQModel.from_pretrained(str(tmp_path))
    assert loaded.config.value_range == (-1.0, 1.0)
    assert _same_params(loaded.params, tiny_model.params)


def test_mismatched_params_give_one_readable_diff(tiny_model, tmp_path):
    from flax.serialization import msgpack_serialize

    flat = checkpoints.flatten(tiny_model.params)
    del flat[("encoder", "conv_in", "bias")]
    flat[("encoder", "extra", "kernel")] = np.zeros(3)
    flat[("quantize", "embedding", "embedding")] = np.zeros((10, 16))
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints.unflatten(flat)))
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert "missing (1): encoder/conv_in/bias" in message
    assert "unexpected (1): encoder/extra/kernel" in message
    assert "quantize/embedding/embedding: expected (64, 16), got (10, 16)" in message


def _hub_cache(root: Path, repo_id: str, model_dir: Path, commit: str = "a" * 40) -> None:
    """The huggingface_hub cache layout: blobs named by sha256, snapshots linking to them."""
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
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert error.startswith("ERR CheckpointError")
    assert "test-org/not-cached" in error and "HF_HUB_OFFLINE" in error
    assert "pass a local model directory" in error


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_with_one_message(tiny_model_dir, tmp_path):
    """No HF_HUB_OFFLINE, the Hub endpoint a closed local port: a cached model still loads, a
    missing one fails at once with one message and no retries (huggingface_hub alone retries
    for about half a minute per file)."""
    _hub_cache(tmp_path / "hf" / "hub", "test-org/tiny-vqgan", tiny_model_dir)
    script = (
        "import logging, time\n"
        "logging.basicConfig()\n"
        "from vqgan_datasets import VQModel\n"
        "print(VQModel.from_pretrained('test-org/tiny-vqgan').revision)\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    VQModel.from_pretrained('test-org/not-cached')\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
        "print(time.perf_counter() - start)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    revision, error, seconds = out.stdout.strip().splitlines()[-3:]
    assert revision == "a" * 40
    assert error.startswith("ERR CheckpointError") and "test-org/not-cached" in error
    assert "not in the local Hugging Face cache" in error and "Connection refused" in error
    assert float(seconds) < 5
    assert "Retry" not in out.stderr and "WARNING" not in out.stderr, out.stderr


def test_a_hub_that_never_answers_is_given_up_on_quickly(tmp_path, monkeypatch):
    """A server that accepts the connection and says nothing (a black-holed proxy)."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # as HF_ENDPOINT sets at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match="not in the local Hugging Face cache") as info:
            checkpoints.resolve("test-org/not-cached", cache_dir=tmp_path)
        assert time.perf_counter() - start < 5
    assert "after 3 s" in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("name", ["/nonexistent", "./missing", "../missing", "~/missing/model",
                                  "a/b/c", "models\\demo", "C:/models/x", "missing/"])
def test_a_missing_path_is_no_such_directory_not_a_hub_lookup(name):
    with pytest.raises(CheckpointError, match="no such directory") as info:
        checkpoints.resolve(name)
    assert repr(name) in str(info.value)


def test_a_file_is_not_a_model_directory(tiny_model_dir):
    with pytest.raises(CheckpointError, match="is a file, not a model directory"):
        checkpoints.resolve(tiny_model_dir / "config.json")


def test_file_digest_hashes_local_files_once(tiny_model_dir):
    file = tiny_model_dir / "model.safetensors"
    first = checkpoints.file_digest(file)
    assert first.startswith("sha256:") and checkpoints.file_digest(file) == first


def _hashed_long_ago(monkeypatch) -> None:
    """Let files written a moment ago enter the digest cache (normally they must be 2 s old)."""
    monkeypatch.setattr(checkpoints, "_RACY_MARGIN_NS", 0)
    checkpoints._DIGEST_CACHE.clear()
    time.sleep(0.05)  # past the file system's timestamp tick


def test_file_digest_misses_on_a_replaced_file_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    file, other = tmp_path / "model.safetensors", tmp_path / "new.tmp"
    file.write_bytes(b"A" * 1000)
    _hashed_long_ago(monkeypatch)
    first = checkpoints.file_digest(file)
    assert first == "sha256:" + hashlib.sha256(b"A" * 1000).hexdigest()
    assert len(checkpoints._DIGEST_CACHE) == 1  # cached: the stale hit below was possible
    stat = file.stat()
    other.write_bytes(b"B" * 1000)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, file)
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert checkpoints.file_digest(file) == "sha256:" + hashlib.sha256(b"B" * 1000).hexdigest()


def test_file_digest_misses_on_an_in_place_rewrite(tmp_path, monkeypatch):
    file = tmp_path / "flax_model.msgpack"
    file.write_bytes(b"A" * 1000)
    _hashed_long_ago(monkeypatch)
    checkpoints.file_digest(file)
    stat = file.stat()
    time.sleep(0.05)
    with open(file, "r+b") as f:  # same inode, same size
        f.write(b"C" * 1000)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # utime cannot restore ctime
    assert file.stat().st_ino == stat.st_ino and file.stat().st_mtime_ns == stat.st_mtime_ns
    assert checkpoints.file_digest(file) == "sha256:" + hashlib.sha256(b"C" * 1000).hexdigest()


def test_file_digest_does_not_cache_a_file_changed_just_before_hashing(tmp_path):
    """A rewrite within one timestamp tick keeps the ctime: such files are hashed every time."""
    checkpoints._DIGEST_CACHE.clear()
    file = tmp_path / "model.safetensors"
    for data in (b"A" * 1000, b"D" * 1000):
        file.write_bytes(data)
        assert checkpoints.file_digest(file) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert not checkpoints._DIGEST_CACHE


@pytest.mark.parametrize("name", ["model.safetensors", "flax_model.msgpack"])
@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_garbage_weight_files_name_the_file_and_format(tiny_model_dir, tmp_path, name, damage):
    data = (tiny_model_dir / name).read_bytes()
    blob = {"random": np.random.default_rng(0).bytes(4096), "truncated": data[: len(data) // 2],
            "empty": b""}[damage]
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: not a readable ")
    assert ("safetensors" if name.endswith("safetensors") else "msgpack") in message


def test_msgpack_of_the_wrong_shape_is_refused(tiny_model, tmp_path):
    from flax.serialization import msgpack_serialize

    (tmp_path / "config.json").write_text(TINY.to_json_string())
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize([1, 2, 3]))
    with pytest.raises(CheckpointError, match="expected a tree of named arrays, got list"):
        VQModel.from_pretrained(str(tmp_path))
    flat = checkpoints.flatten(tiny_model.params)
    flat[("encoder", "conv_in", "bias")] = "not numbers"
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints.unflatten(flat)))
    with pytest.raises(CheckpointError, match="encoder/conv_in/bias: expected a float array, got str"):
        VQModel.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("fmt,inf", [("safetensors", np.inf), ("msgpack", -np.inf)])
def test_non_finite_weights_are_refused(tiny_model, tmp_path, fmt, inf):
    from flax.serialization import msgpack_serialize

    flat = {k: np.array(v) for k, v in checkpoints.flatten(tiny_model.params).items()}
    flat[("encoder", "mid", "attn_1", "q", "kernel")][0, 0, 1, 2] = np.nan
    flat[("quantize", "embedding", "embedding")][3] = inf
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    if fmt == "safetensors":
        (tmp_path / "model.safetensors").write_bytes(checkpoints._safetensors_bytes(flat))
    else:
        (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(checkpoints.unflatten(flat)))
    with pytest.raises(CheckpointError) as info:
        VQModel.from_pretrained(str(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / ('model.' + fmt if fmt == 'safetensors' else 'flax_model.msgpack')}: " \
        "non-finite values (NaN or Inf) in encoder/mid/attn_1/q/kernel and 1 more (2 tensors: " \
        "encoder/mid/attn_1/q/kernel, quantize/embedding/embedding)" in message
    # Nor is such a tree written: it could not be read back.
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoints.save(tmp_path / "out", TINY, checkpoints.unflatten(flat), param_shapes(TINY))
    assert not (tmp_path / "out").exists()


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


def test_a_missing_value_range_is_warned_once_per_file(tmp_path, caplog):
    config = TINY.to_dict()
    del config["value_range"]
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger=checkpoints.__name__):
        for _ in range(3):
            for sub in ("a", "b"):
                assert checkpoints.load_config(tmp_path / sub).value_range == (-1.0, 1.0)
    warned = [r.getMessage() for r in caplog.records if "has no value_range" in r.getMessage()]
    assert len(warned) == 2 and str(tmp_path / "a") in warned[0]


@pytest.mark.parametrize("module,allowed", [("checkpoints", {"config", "params", "storage"}),
                                            ("params", {"config"})])
def test_checkpoints_sits_below_modeling(module, allowed):
    """checkpoints imports no package module but config, params and storage (params only config),
    not even inside a function: modeling imports it, so anything more could close a circle."""
    import ast
    import importlib

    file = importlib.import_module(f"vqgan_datasets.models.{module}").__file__
    tree = ast.parse(Path(file).read_text())
    imported = {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    imported |= {alias.name for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                 for alias in node.names}
    imported |= {alias.name.split(".")[1] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names if alias.name.startswith("vqgan_datasets.")}
    assert imported <= allowed


def test_check_params_takes_shape_trees_or_flat_tables(tiny_model):
    flat = checkpoints.flatten(tiny_model.params)
    shapes = param_shapes(TINY)
    table = {k: tuple(np.shape(v)) for k, v in flat.items()}
    for expected in (shapes, table, checkpoints.unflatten(table)):
        checkpoints.check_params(flat, expected, origin="x")
    table[("encoder", "conv_in", "bias")] = (7,)
    with pytest.raises(CheckpointError, match=r"^x: parameters do not match the config\n"
                       r"  mis-shaped \(1\): encoder/conv_in/bias: expected \(7,\), got \(32,\)$"):
        checkpoints.check_params(flat, table, origin="x")


def test_save_writes_ordinary_files_and_no_temporaries(tiny_model, tmp_path):
    umask = os.umask(0o022)
    try:
        checkpoints.save(tmp_path, TINY, tiny_model.params, param_shapes(TINY))
    finally:
        os.umask(umask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "flax_model.msgpack", "model.safetensors"]
    assert {oct(os.stat(tmp_path / n).st_mode & 0o777) for n in names} == {oct(0o644)}
