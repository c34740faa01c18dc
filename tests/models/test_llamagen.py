"""The LlamaGen VQ family: a small random checkpoint made by LlamaGen's own code, in its file
layout, converted and run here; tokens equal LlamaGen's exactly on CPU in float32, decoded pixels
within 1e-4 (tests/fixtures/llamagen/README.md says how they were made)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from vqgan_datasets.models import checkpoints, llamagen
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.conversion import convert_checkpoint
from vqgan_datasets.models.modeling import VQModel, param_shapes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamagen"
pytest.importorskip("torch")


def llamagen_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter tree's shapes under LlamaGen's tensor names and layouts (the inverse of
    the conversion), plus its codebook-usage buffer."""
    levels = config.num_resolutions
    mid = {"block_1": "0", "attn_1": "1", "block_2": "2"}
    out = {"quantize.codebook_used": (65536,)}
    for key, leaf in checkpoints.flatten(param_shapes(config)).items():
        *path, kind = key
        shape = tuple(leaf.shape)
        names = []
        for i, part in enumerate(path):
            if part.startswith(("down_", "up_")):
                level = int(part.split("_")[1])
                names += ["conv_blocks", str(level if part.startswith("down_") else levels - 1 - level)]
            elif part.startswith(("block_", "attn_")) and path[i - 1] != "mid":
                names += ["res" if part.startswith("block_") else "attn", part.split("_")[1]]
            elif path[i - 1:i] == ["mid"]:
                names.append(mid[part])
            else:
                names.append(part)
        if kind == "kernel":
            names.append("weight")
            shape = (shape[3], shape[2], shape[0], shape[1])
        else:
            names.append("weight" if kind in ("scale", "embedding") else "bias")
        out[".".join(names)] = shape
    return out


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURES / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """The fixture checkpoint as LlamaGen writes it (a plain .pt file)."""
    path = tmp_path_factory.mktemp("llamagen") / "vq_tiny_c2i.pt"
    with gzip.open(FIXTURES / "vq_tiny_c2i.pt.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint_file, tmp_path_factory):
    out = convert_checkpoint(checkpoint_file, tmp_path_factory.mktemp("converted") / "model")
    return VQModel.from_pretrained(str(out))


def test_converted_model_reads_the_architecture_off_the_file(converted):
    config = converted.config
    assert config.family == "llamagen" and config.quantizer == "cosine"
    assert config.preprocess == "adm_center_crop" and config.weights is None
    assert (config.ch, config.ch_mult, config.num_res_blocks) == (32, (1, 1), 1)
    assert (config.z_channels, config.embed_dim, config.n_embed) == (16, 4, 128)
    assert config.attn_resolutions == (config.resolution // 2,)  # the lowest level only


def test_tokens_equal_llamagen_exactly(converted, golden):
    tokens = converted.encode_images(golden["images"])
    assert np.array_equal(tokens, golden["tokens"])
    assert len(np.unique(golden["tokens"])) > 32  # spread over the codebook, not one code
    quantized, indices = converted.encode(golden["images"].astype(np.float32) / 127.5 - 1.0)
    assert np.array_equal(np.asarray(indices), golden["tokens"])
    # LlamaGen's quantized latents are the L2-normalised codes.
    np.testing.assert_allclose(np.asarray(quantized), golden["quantized"], atol=1e-6)


def test_decoded_pixels_match_llamagen(converted, golden):
    pixels = np.asarray(converted.decode_code(golden["tokens"]))
    assert pixels.shape == golden["decoded"].shape
    assert np.abs(pixels - golden["decoded"]).max() < 1e-4
    images = converted.decode_images(golden["tokens"])
    expected = np.round(np.clip((golden["decoded"] + 1) / 2, 0, 1) * 255)
    assert np.abs(images.astype(np.int16) - expected).max() <= 1


def test_from_pretrained_on_the_published_file(checkpoint_file, converted, tmp_path):
    cache = tmp_path / "cache"
    digest = "sha256:" + hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()
    by_path = VQModel.from_pretrained(str(checkpoint_file), cache_dir=str(cache))
    by_name = VQModel.from_pretrained(str(checkpoint_file.parent), filename=checkpoint_file.name,
                                      cache_dir=str(cache))
    for model in (by_path, by_name):
        assert model.weights_digest == digest  # the source file's, stable across machines
        assert model.source.weights_file == str(checkpoint_file.resolve())
        assert model.config == converted.config
        flat, expected = checkpoints.flatten(model.params), checkpoints.flatten(converted.params)
        assert flat.keys() == expected.keys()
        assert all(np.array_equal(flat[k], expected[k]) for k in flat)
    converted_dirs = list(cache.glob("*/*/config.json"))
    assert len(converted_dirs) == 1  # converted once, then reused
    with pytest.raises(CheckpointError, match="no file 'missing.pt'"):
        VQModel.from_pretrained(str(checkpoint_file.parent), filename="missing.pt",
                                cache_dir=str(cache))


def test_from_pretrained_with_a_hub_repo_and_filename(checkpoint_file, converted, tmp_path):
    # The Hub cache's own layout (blob named by its sha256, snapshot link), read offline.
    commit = "c" * 40
    digest = hashlib.sha256(checkpoint_file.read_bytes()).hexdigest()
    repo = tmp_path / "hub" / "models--FoundationVision--LlamaGen"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(checkpoint_file, repo / "blobs" / digest)
    (repo / "snapshots" / commit / "vq_ds16_c2i.pt").symlink_to(repo / "blobs" / digest)
    model = VQModel.from_pretrained("FoundationVision/LlamaGen", filename="vq_ds16_c2i.pt",
                                    cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert (model.name, model.revision) == ("FoundationVision/LlamaGen/vq_ds16_c2i.pt", commit)
    assert model.weights_digest == f"sha256:{digest}" and model.config == converted.config
    # The recorded name loads the same model again.
    again = VQModel.from_pretrained(model.name, cache_dir=str(tmp_path / "hub"),
                                    local_files_only=True)
    assert again.weights_digest == model.weights_digest
    with pytest.raises(CheckpointError, match="'vq_ds8_c2i.pt' of Hub repo 'FoundationVision/"
                       "LlamaGen'.*not in the local Hugging Face cache"):
        VQModel.from_pretrained("FoundationVision/LlamaGen", filename="vq_ds8_c2i.pt",
                                cache_dir=str(tmp_path / "hub"), local_files_only=True)


@pytest.mark.parametrize("levels", [(1, 1, 2, 2, 4), (1, 2, 2, 4)], ids=["VQ-16", "VQ-8"])
def test_infer_config_of_the_published_architectures(levels):
    # LlamaGen's VQ-16 and VQ-8: ch 128, 2 res blocks, z 256, 16,384 codes of dimension 8.
    expected = VQGANConfig(ch_mult=levels, attn_resolutions=(256 // 2 ** (len(levels) - 1),),
                           embed_dim=8, n_embed=16384, family="llamagen")
    shapes = llamagen_shapes(expected)
    assert llamagen.evidence(shapes, {}) != []
    assert llamagen.infer_config(shapes) == expected


def test_to_flax_names_the_tensor_and_both_shapes(tmp_path):
    config = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,),
                         z_channels=32, embed_dim=8, n_embed=64, family="llamagen")
    rng = np.random.default_rng(0)
    state = {n: rng.normal(size=s).astype(np.float32) for n, s in llamagen_shapes(config).items()}
    params = llamagen.to_flax(state, config)
    # Decoder levels are listed from the lowest resolution up; nin_shortcut where widths change.
    np.testing.assert_array_equal(params["decoder"]["up_0"]["block_0"]["nin_shortcut"]["kernel"],
                                  state["decoder.conv_blocks.1.res.0.nin_shortcut.weight"]
                                  .transpose(2, 3, 1, 0))
    assert set(params["decoder"]["up_1"]) == {"block_0", "block_1", "attn_0", "attn_1", "upsample"}
    state["encoder.conv_blocks.1.res.0.conv1.weight"] = np.zeros((64, 16, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"encoder\.conv_blocks\.1\.res\.0\.conv1\.weight: "
                       r"the config expects \(64, 32, 3, 3\), the file has \(64, 16, 3, 3\)"):
        llamagen.to_flax(state, config)
    del state["encoder.conv_blocks.1.res.0.conv1.weight"]
    with pytest.raises(CheckpointError, match="missing .1.: encoder/down_1/block_0/conv1/kernel"):
        llamagen.to_flax(state, config)


def test_a_decoder_that_does_not_mirror_the_encoder_is_refused():
    config = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,),
                         z_channels=32, embed_dim=8, n_embed=64, family="llamagen")
    shapes = llamagen_shapes(config)
    shapes["decoder.conv_blocks.0.res.0.conv1.weight"] = (96, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"the encoder .channel multipliers \[1, 2\].* and "
                       r"the decoder .\[1, 3\]"):
        llamagen.infer_config(shapes)
