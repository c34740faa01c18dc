"""wds.py: the webdataset namespace re-exports the stages and the shard jobs.

The sample and shard helpers (real photos as webdataset samples, tar writing and reading, output
checks) are shared: test_stages.py, test_shards.py, test_convert.py, test_ray.py and
test_distributed.py import them from here."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data

from vqgan_datasets import options
from vqgan_datasets import wds as vqwds
from vqgan_datasets.jobs import shards as vqshards
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.pipeline.images import load_image
from vqgan_datasets.wds import stages

S = 64  # tiny config resolution: 16x16 tokens
BATCH = 2  # per device: shards of 3 samples end on an incomplete batch

# (skimage image, width, height, format): real photos at several sizes and modes; the 300x200 one
# is large enough for JPEG draft decoding.
PHOTOS = [
    ("astronaut", 96, 96, "JPEG"),
    ("coffee", 150, 100, "JPEG"),
    ("chelsea", 90, 60, "PNG"),
    ("rocket", 64, 80, "JPEG"),
    ("camera", 70, 70, "JPEG"),
    ("cat", 300, 200, "JPEG"),
    ("immunohistochemistry", 100, 100, "JPEG"),
    ("hubble_deep_field", 120, 110, "JPEG"),
    ("astronaut", 64, 64, "PNG"),
    ("coffee", 81, 67, "JPEG"),
]
SHARD_SIZES = (4, 3, 3)


def image_bytes(name: str, width: int, height: int, fmt: str) -> bytes:
    image = Image.fromarray(getattr(data, name)()).resize((width, height), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_samples() -> list[dict]:
    samples = []
    for i, (name, w, h, fmt) in enumerate(PHOTOS):
        ext = "jpg" if fmt == "JPEG" else "png"
        samples.append({
            "__key__": f"sample_{i:04d}",
            ext: image_bytes(name, w, h, fmt),
            "txt": f"a photo of {name}, {w}x{h}".encode(),
            "json": json.dumps({"index": i, "source": name}).encode(),
        })
    return samples


def write_tar(path, samples) -> str:
    with open(path, "wb") as f, wds.TarWriter(f) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def image_of(sample: dict) -> bytes:
    return sample.get("jpg", sample.get("png"))


def read_tar(path) -> list[dict]:
    return list(vqwds.read_shard(str(path)))


def tokens_of(sample: dict) -> np.ndarray:
    value = sample["vqgan.npy"]
    return np.load(io.BytesIO(value)) if isinstance(value, bytes) else value


def reference_tokens(model: VQModel, samples: list[dict]) -> dict[str, np.ndarray]:
    """Tokens of a direct encode, by key: what every path through the library must reproduce."""
    pixels = np.stack([load_image(image_of(s), S) for s in samples])
    tokens = model.encode_images(pixels)
    return {s["__key__"]: t for s, t in zip(samples, tokens, strict=True)}


def make_shards(root, samples, sizes=SHARD_SIZES) -> list[str]:
    """`samples` cut into tars root/shard-00000.tar... of `sizes` samples each."""
    urls, start = [], 0
    for i, size in enumerate(sizes):
        urls.append(write_tar(root / f"shard-{i:05d}.tar", samples[start : start + size]))
        start += size
    return urls


def check_outputs(paths, samples, reference, *, keep_image=False):
    """Every input sample exactly once across `paths`, in order, fields intact, tokens right."""
    out = [s for p in paths for s in read_tar(p)]
    assert [s["__key__"] for s in out] == [s["__key__"] for s in samples]
    for got, want in zip(out, samples, strict=True):
        assert got["txt"] == want["txt"] and got["json"] == want["json"]
        tokens = tokens_of(got)
        assert tokens.dtype == np.uint16 and tokens.shape == (256,)  # up to 65,536 codes
        np.testing.assert_array_equal(tokens, reference[want["__key__"]])
        assert ("jpg" in got or "png" in got) == keep_image


def snapshot(directory) -> dict:
    """Every file but the manifest: name -> (mtime, bytes). Equal snapshots: nothing rewritten."""
    return {
        name: (os.stat(directory / name).st_mtime_ns, (directory / name).read_bytes())
        for name in sorted(os.listdir(directory)) if name != "manifest.json"
    }


# ------------------------------------------------------------------------------ the namespace


def test_wds_keeps_the_shard_names():
    """README and examples import tokenize_shards & co. from vqgan_datasets.wds, the stages
    too; wds.py only re-exports, so every name is the defining module's own object."""
    for name in ("tokenize_shards", "convert_shard", "Manifest", "ShardReport", "ShardOptions",
                 "ShardReadError", "read_shard", "expand_urls", "open_url", "register_fsspec",
                 "write_manifest"):
        assert getattr(vqwds, name) is getattr(vqshards, name)
    for name in ("encode", "decode", "encode_samples", "decode_samples", "Stage"):
        assert getattr(vqwds, name) is getattr(stages, name)
    assert vqwds.SampleError is options.SampleError and vqwds.StageStats is options.StageStats
    with pytest.raises(AttributeError, match="no_such_name"):
        vqwds.no_such_name  # noqa: B018
