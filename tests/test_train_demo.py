"""The demo checkpoint installed with the package (vqgan_datasets/_demo/model, its card and stats
in model/demo) and the script that trains it (model/train_demo.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from vqgan_datasets.models.modeling import VQModel

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "vqgan_datasets" / "_demo" / "model"
CARD = ROOT / "model" / "demo"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "model" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


td = _load_script()


def test_demo_checkpoint_reconstructs_heldout_photos_as_reported():
    stats = json.loads((CARD / "train_stats.json").read_text(encoding="utf-8"))
    model = VQModel.from_pretrained(str(DEMO))
    assert model.config.value_range == (-1.0, 1.0)
    assert sorted(f.name for f in DEMO.iterdir()) == ["config.json", "model.safetensors"]
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 8 * 2**20  # package data
    result = td.evaluate(model, td.load_photos(td.HELDOUT_PHOTOS))
    assert result["psnr"] >= stats["psnr_heldout"] - 0.5
    assert result["codes"].shape == (2, np.prod(model.config.grid_shape()))


def test_reseed_resets_exactly_the_dead_codes():
    codebook = np.arange(12, dtype=np.float32).reshape(6, 2)
    last_used = np.array([10, 3, 9, 0, 5, 10], np.int32)
    latents = 100 + np.arange(16, dtype=np.float32).reshape(8, 2)
    new, new_last, count = td.reseed_dead_codes(
        codebook, last_used, 10, latents, jax.random.PRNGKey(0), window=5
    )
    new, new_last = np.asarray(new), np.asarray(new_last)
    dead = np.array([False, True, False, True, True, False])
    assert int(count) == 3
    np.testing.assert_array_equal(new[~dead], codebook[~dead])
    latent_rows = {tuple(row) for row in latents}
    assert all(tuple(row) in latent_rows for row in new[dead])
    assert len({tuple(row) for row in new[dead]}) == 3  # distinct recent outputs
    np.testing.assert_array_equal(new_last, np.where(dead, 10, last_used))


def test_training_script_is_deterministic(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, str(ROOT / "model" / "train_demo.py"), "--tiny", "--steps", "3",
               "--seed", "7", "--out", str(out), "--card-dir", str(tmp_path / "card"), "--quiet",
               "--no-sklearn"]
    subprocess.run(command, check=True, cwd=ROOT, timeout=120, capture_output=True)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    stats = json.loads((tmp_path / "card" / "train_stats.json").read_text(encoding="utf-8"))
    assert stats["steps"] == 3 and stats["seed"] == 7
    saved = VQModel.from_pretrained(str(out))

    photos = td.training_photos(with_sklearn=False)
    result = td.train(td.Settings.tiny(steps=3, seed=7), photos, progress=False)
    assert result.losses[-1] == stats["final_loss"]
    ours = jax.tree_util.tree_leaves_with_path(result.params)
    theirs = dict(jax.tree_util.tree_leaves_with_path(saved.params))
    assert len(ours) == len(theirs)
    for path, value in ours:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(theirs[path]),
                                      err_msg=jax.tree_util.keystr(path))
    other = td.train(td.Settings.tiny(steps=3, seed=8), photos, progress=False)
    assert other.losses[-1] != result.losses[-1]  # the seed matters, so the match above is real
