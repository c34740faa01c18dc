"""MaskGIT's VQGAN (vqgan_datasets.models.maskgit): tokens and pixels equal its reference code's,
both published file layouts load, and mismatches are named (fixtures: tests/fixtures/maskgit)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY
from test_taming import taming_state_dict

from vqgan_datasets.models import checkpoints, maskgit
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.modeling import VQModel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "maskgit"


def _shapes(state) -> dict:
    return {k: tuple(np.shape(v)) for k, v in state.items()}


@pytest.fixture(scope="module")
def port_state() -> dict:
    """The PyTorch port's state dict as torch.save wrote it (float16-exact values)."""
    state = torch.load(FIXTURES / "maskgit-vqgan-tiny.bin", map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="module")
def loaded(port_state):
    config = maskgit.infer_config(_shapes(port_state))
    module = maskgit.module_from_config(config)
    return config, module, maskgit.to_flax(port_state, config)


@pytest.fixture(scope="module")
def encode(loaded):
    _, module, _ = loaded
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))


def test_infer_config_reads_the_architecture(loaded):
    config, _, _ = loaded
    arch = json.loads((FIXTURES / "arch.json").read_text())
    assert (config.ch, list(config.ch_mult), config.num_res_blocks) == (
        arch["hidden_channels"], arch["channel_mult"], arch["num_res_blocks"])
    assert (config.z_channels, config.embed_dim, config.n_embed) == (
        arch["z_channels"], arch["z_channels"], arch["n_embed"])
    assert config.family == "maskgit" and config.quantizer == "l2"
    assert config.value_range == (0.0, 1.0) and config.attn_resolutions == ()


def test_tokens_equal_the_reference(loaded, encode, golden):
    _, _, params = loaded
    pixels = golden["images"].astype(np.float32) / 255.0
    quantized, tokens = encode(params, pixels)
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens"])
    codebook = params["quantize"]["embedding"]["embedding"]
    np.testing.assert_array_equal(np.asarray(quantized).reshape(-1, codebook.shape[1]),
                                  codebook[golden["tokens"].reshape(-1)])


def test_decoded_pixels_match_the_reference(loaded, golden):
    _, module, params = loaded

    @jax.jit
    def decode(params, tokens):  # the clamped decode, and the decoder's output before the clamp
        variables = {"params": params}
        codes = module.apply(variables, tokens, method=lambda m, t: m.quantize.lookup(t))
        raw = module.apply(variables, codes.reshape(4, 16, 16, -1), method=lambda m, q: m.decoder(q))
        return module.apply(variables, tokens, method="decode_code"), raw

    pixels, raw = map(np.asarray, decode(params, jnp.asarray(golden["tokens"])))
    np.testing.assert_allclose(pixels, golden["pixels"], atol=1e-4, rtol=0)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0  # decode clamps, as the reference's
    np.testing.assert_allclose(raw, golden["raw_pixels"], atol=1e-4, rtol=0)
    assert ((golden["raw_pixels"] < 0) | (golden["raw_pixels"] > 1)).any()  # clamping was tested


def test_reconstruction_and_rectangular_grids(loaded, golden):
    _, module, params = loaded

    @jax.jit
    def run(params, pixels, wide):  # wide: 32x64 images, a 16x32 grid
        reconstruction = module.apply({"params": params}, pixels)
        _, codes = module.apply({"params": params}, wide, method="encode")
        return reconstruction, codes, module.apply({"params": params}, codes, (16, 32),
                                                   method="decode_code")

    pixels = golden["images"][:2].astype(np.float32) / 255.0
    (recon, quantized, latents, tokens), wide_tokens, decoded = run(
        params, pixels, np.concatenate([pixels, pixels], axis=2))
    assert recon.shape == pixels.shape and latents.shape == quantized.shape == (2, 16, 16, 8)
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens"][:2])
    assert wide_tokens.shape == (2, 512) and decoded.shape == (2, 32, 64, 3)


def test_vqmodel_runs_a_maskgit_config_in_bfloat16(loaded, golden):
    config, _, params = loaded
    tokens = VQModel(config, params, dtype=jnp.bfloat16).encode_images(golden["images"])
    assert tokens.shape == golden["tokens"].shape
    assert np.mean(tokens == golden["tokens"]) > 0.8  # bfloat16 flips near-ties only


def test_original_flax_layout_converts_to_the_same_tree(loaded, port_state, golden, encode):
    """google-research/maskgit's own tree (names from its `init`, weights from the fixture, which
    the recipe checked gives the port's tokens), flattened with or without "params"."""
    config, _, params = loaded
    names = json.loads((FIXTURES / "flax_names.json").read_text())
    tree = {}
    for path, torch_name in names.items():
        value = port_state[torch_name]
        tree[f"params/{path}"] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    assert maskgit.evidence(_shapes(tree), {})
    assert maskgit.infer_config(_shapes(tree)) == config
    converted = maskgit.to_flax(tree, config)
    flat, expected = checkpoints.flatten(converted), checkpoints.flatten(params)
    assert flat.keys() == expected.keys()
    assert all(np.array_equal(flat[k], expected[k]) for k in flat)
    dotted = {k.replace("params/", "").replace("/", "."): v for k, v in tree.items()}
    assert maskgit.infer_config(_shapes(dotted)) == config
    _, tokens = encode(maskgit.to_flax(dotted, config), golden["images"] / np.float32(255))
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens"])


def test_published_file_layout():
    """maskgit-vqgan-imagenet-f16-256.bin's names and shapes (from the reference's state_dict)."""
    shapes = {k: tuple(v) for k, v in
              json.loads((FIXTURES / "published_shapes.json").read_text()).items()}
    extras = {"top_level_keys": sorted(shapes)[:3],
              "source": {"repo_id": "fun-research/TiTok",
                         "filename": "maskgit-vqgan-imagenet-f16-256.bin"}}
    assert len(maskgit.evidence(shapes, extras)) == 3
    config = maskgit.infer_config(shapes)
    assert (config.ch, config.ch_mult, config.num_res_blocks) == (128, (1, 1, 2, 2, 4), 2)
    assert (config.z_channels, config.n_embed, config.downsample_factor) == (256, 1024, 16)
    zeros = {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}
    params = maskgit.to_flax(zeros, config)
    count = sum(int(np.prod(v.shape)) for v in checkpoints.flatten(params).values())
    assert count == sum(int(np.prod(v)) for v in shapes.values())


def test_published_file_converts_and_loads(tmp_path, golden):
    """The .bin as the authors publish it: detected, converted, loaded, tokens as the reference."""
    from vqgan_datasets.models.conversion import convert_checkpoint

    out = convert_checkpoint(FIXTURES / "maskgit-vqgan-tiny.bin", tmp_path / "converted")
    model = VQModel.from_pretrained(str(out))
    assert model.config.family == "maskgit" and model.config.value_range == (0.0, 1.0)
    np.testing.assert_array_equal(model.encode_images(golden["images"]), golden["tokens"])
    expected = np.round(np.clip(golden["pixels"], 0, 1) * 255)
    assert np.abs(model.decode_images(golden["tokens"]).astype(float) - expected).max() <= 1


def test_other_families_show_no_maskgit_signs(tiny_model):
    state = taming_state_dict(tiny_model)
    assert maskgit.evidence(_shapes(state), {"top_level_keys": ["state_dict"]}) == []
    with pytest.raises(CheckpointError, match="no MaskGIT VQGAN tensors"):
        maskgit.infer_config(_shapes(state))
    with pytest.raises(CheckpointError, match="no MaskGIT VQGAN tensors"):
        maskgit.to_flax(state, TINY)


def test_mismatched_config_names_the_tensor_and_both_shapes(loaded, port_state):
    config, _, _ = loaded
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight: the config expects "
                                              r"shape \(16, 64, 1, 1\), the file holds \(8, 64, 1, 1\)"):
        maskgit.to_flax(port_state, config.replace(z_channels=16, embed_dim=16))
    with pytest.raises(CheckpointError, match=r"encoder\.down\.1\.block\.0\.conv1\.weight: the config "
                                              r"expects shape \(96, 32, 3, 3\), the file holds "
                                              r"\(64, 32, 3, 3\)"):
        maskgit.to_flax(port_state, config.replace(ch_mult=(1, 3)))
    missing = {k: v for k, v in port_state.items() if k != "decoder.up.1.upsample_conv.bias"}
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder/up_1/upsample/conv/bias"):
        maskgit.to_flax(missing, config)
    extra = {**port_state, "encoder.down.0.block.5.conv1.weight": np.zeros((32, 32, 3, 3))}
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder\.down\.0\.block\.5"):
        maskgit.to_flax(extra, config)


def test_yaml_overrides_and_refused_configs(loaded, port_state, tmp_path):
    config, _, _ = loaded
    (tmp_path / "vq.yaml").write_text("resolution: 32\nchannel_mult: [1, 2]\nnum_channels: 3\n")
    from_yaml = maskgit.infer_config(_shapes(port_state), str(tmp_path / "vq.yaml"))
    assert from_yaml == config.replace(resolution=32)
    (tmp_path / "other.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="no MaskGIT VQGAN settings"):
        maskgit.infer_config(_shapes(port_state), str(tmp_path / "other.yaml"))
    with pytest.raises(ValueError, match="no attention"):
        maskgit.module_from_config(config.replace(attn_resolutions=(16,)))
