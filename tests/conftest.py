"""Shared fixtures: tiny configs, tiny random checkpoints in the real on-disk layout, caches in tmp."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Tests mirror the package's folders; a few share helpers across folders (test_wds's shard makers,
# test_taming's state dicts), so every folder is importable by module name.
for _folder in sorted(Path(__file__).parent.iterdir()):
    if _folder.is_dir() and not _folder.name.startswith(("_", ".")) and _folder.name != "fixtures":
        sys.path.insert(0, str(_folder))

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI, worker and Ray processes they start) compile the same tiny programs:
# one compilation cache for the whole run, new each run, shared by every process it starts.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vqgan-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vqgan_datasets.models.config import VQGANConfig  # noqa: E402

# f4, attention at the downsampled 16×16 level: the smallest config with every module kind.
TINY = VQGANConfig(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=64,
    z_channels=32, embed_dim=16, n_embed=64,
)


@pytest.fixture(scope="session")
def tiny_config() -> VQGANConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from vqgan_datasets.models.modeling import VQModel

    return VQModel(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    """A random tiny checkpoint saved as config.json + model.safetensors + flax_model.msgpack."""
    out = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(out)
    return out


def photos(size: int, count: int = 4) -> np.ndarray:
    """Real photos from scikit-image, centre-cropped and resized to size×size uint8 RGB."""
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")[:count]:
        array = getattr(data, name)()
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(array[top : top + side, left : left + side])
        out.append(np.asarray(crop.resize((size, size), Image.LANCZOS)))
    return np.stack(out)


# Shared by the webdataset, shards, Ray and multi-host tests: the same tiny checkpoint loaded
# from disk (so subprocesses that load the directory get the same weights digest), real-photo
# samples, their direct-encode tokens, and tar shards of them.


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from vqgan_datasets.models.modeling import VQModel

    return VQModel.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def samples():
    from test_wds import make_samples

    return make_samples()


@pytest.fixture(scope="module")
def reference(model, samples):
    from test_wds import reference_tokens

    return reference_tokens(model, samples)


@pytest.fixture(scope="module")
def shards(samples, tmp_path_factory):
    from test_wds import make_shards

    root = tmp_path_factory.mktemp("shards")
    return root, make_shards(root, samples)


SAMPLES = Path(__file__).resolve().parents[1] / "vqgan_datasets" / "_demo" / "images"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three of the sample photos in a nested folder (file names are kept as row names)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for name in ("astronaut", "coffee"):
        shutil.copy(SAMPLES / f"{name}.jpg", root / f"{name}.jpg")
    shutil.copy(SAMPLES / "chelsea.jpg", root / "sub" / "chelsea.jpg")
    return root


class FullDisk:
    """A file whose writes fail with ENOSPC, as a full disk's do (no file name in them)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
