"""The Open-MAGVIT2 family (models/magvit2.py) against SEED-Voken's own code
(tests/fixtures/open_magvit2)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vqgan_datasets.models import config as config_module
from vqgan_datasets.models import magvit2
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.sourcefiles import read_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CKPT = FIXTURES / "open_magvit2" / "magvit2-tiny.ckpt"
REGISTERED = magvit2.FAMILY in config_module.FAMILIES
# (quantizer kind, default preprocessing): SEED-Voken's evaluation data code resizes with
# torchvision's Resize + CenterCrop.
_REGISTRATION = ("lfq", "torchvision_bilinear_center_crop")


@pytest.fixture(autouse=True)
def _family_known(monkeypatch):
    """VQGANConfig accepts only registered families; register this one where it is not yet."""
    if not REGISTERED:
        monkeypatch.setitem(config_module.FAMILIES, magvit2.FAMILY,
                            _REGISTRATION)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "open_magvit2" / "golden.npz"))


@pytest.fixture(scope="module")
def source():
    return read_source(CKPT)


def _converted(state):
    """(config, params, jitted apply) for a state dict, as the converter builds them."""
    with pytest.MonkeyPatch.context() as patch:
        if not REGISTERED:
            patch.setitem(config_module.FAMILIES, magvit2.FAMILY, _REGISTRATION)
        config = magvit2.infer_config({k: tuple(v.shape) for k, v in state.items()})
        params = magvit2.to_flax(state, config)
        module = magvit2.module_from_config(config)
    apply = jax.jit(module.apply, static_argnames=("method",))
    return config, params, apply


@pytest.fixture(scope="module")
def ema(source):
    state, weights = magvit2.select_weights(source.state)
    assert weights == "ema"
    return _converted(state)


def _pixels(images: np.ndarray) -> np.ndarray:
    return (images / 127.5 - 1.0).astype(np.float32)  # SEED-Voken's data/base.py scaling


def test_architecture_read_off_the_file(ema):
    config = ema[0]
    assert config.family == "open_magvit2"
    assert (config.ch, tuple(config.ch_mult), config.num_res_blocks) == (32, (1, 1), 1)
    assert (config.z_channels, config.embed_dim, config.n_embed) == (18, 18, 2**18)
    assert config.attn_resolutions == () and config.token_dtype == "int32"


def test_tokens_equal_seed_vokens_ema_tokens(ema, golden):
    _, params, apply = ema
    quantized, tokens = apply({"params": params}, _pixels(golden["pixels"]), method="encode")
    assert tokens.dtype == jnp.int32 and tokens.shape == (4, 32 * 32)
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens_ema"])
    assert set(np.unique(np.asarray(quantized))) == {-1.0, 1.0}
    # A 48 x 64 input: a 24 x 32 grid, raster order.
    _, rect = apply({"params": params}, _pixels(golden["pixels_rect"]), method="encode")
    np.testing.assert_array_equal(np.asarray(rect), golden["tokens_rect"])
    latents = apply({"params": params}, _pixels(golden["pixels"][:1]), method="encode_latents")
    np.testing.assert_allclose(np.asarray(latents), golden["latents_0"], atol=1e-4, rtol=0)


def test_live_weights_give_the_references_live_tokens(source, golden):
    live = {k: v for k, v in source.state.items() if not k.startswith("model_ema.")}
    _, params, apply = _converted(live)
    _, tokens = apply({"params": params}, _pixels(golden["pixels"]), method="encode")
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens_live"])
    assert (golden["tokens_live"] != golden["tokens_ema"]).mean() > 0.5  # EMA copies matter


def test_decoded_pixels_within_1e4(ema, golden):
    _, params, apply = ema
    quantized, _ = apply({"params": params}, _pixels(golden["pixels"][:1]), method="encode")
    decoded = apply({"params": params}, quantized, method="decode")
    np.testing.assert_allclose(np.asarray(decoded), golden["decoded_ema"], atol=1e-4, rtol=0)
    from_codes = apply({"params": params}, jnp.asarray(golden["tokens_ema"][:1]),
                       method="decode_code")
    np.testing.assert_allclose(np.asarray(from_codes), golden["decoded_codes"], atol=1e-4, rtol=0)


def test_lfq_bit_order_matches_the_reference(golden):
    codes = np.asarray(magvit2.lfq_codes(jnp.asarray(golden["probe_indices"][0]), 18))
    np.testing.assert_array_equal(codes, golden["probe_codes"])
    # Channel d weighs 2**d: index 1 is channel 0 alone, 2**17 the last channel alone.
    assert codes[1].tolist() == [1.0] + [-1.0] * 17
    assert codes[4].tolist() == [-1.0] * 17 + [1.0]
    np.testing.assert_array_equal(np.asarray(magvit2.lfq_indices(jnp.asarray(codes))),
                                  golden["probe_indices"][0])
    # A channel at exactly 0 is not > 0: its bit is clear, as in the reference.
    z = jnp.asarray([[0.0, -0.0, 1e-30, -1e-30]])
    assert int(magvit2.lfq_indices(z)[0]) == 0b0100


def test_select_weights_takes_every_ema_copy_or_says_which_is_missing(source):
    state, weights = magvit2.select_weights(source.state)
    name = "decoder.adaptive.0.gamma.weight"
    np.testing.assert_array_equal(state[name], source.state["model_ema.decoderadaptive0gammaweight"])
    assert not any(k.startswith("model_ema.") for k in state)
    broken = {k: v for k, v in source.state.items() if k != "model_ema.encoderconv_inweight"}
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight"):
        magvit2.select_weights(broken)
    bare = {k: v for k, v in source.state.items() if not k.startswith("model_ema.")}
    assert magvit2.select_weights(bare)[1] is None


def test_file_layout_evidence_and_no_false_signs(source):
    signs = magvit2.evidence(source.shapes, source.extras)
    assert signs and "adaptive" in signs[0]
    published = {**source.extras,
                 "source": {"repo_id": "TencentARC/Open-MAGVIT2-Tokenizer-262144-Pretrain",
                            "filename": "pretrain256_262144.ckpt"}}
    assert len(magvit2.evidence(source.shapes, published)) == 3
    for other in ("ibq/ibq-tiny.ckpt", "maskgit/maskgit-vqgan-tiny.bin"):
        path = FIXTURES / other
        if path.exists():
            loaded = read_source(path)
            assert magvit2.evidence(loaded.shapes, loaded.extras) == [], other


def test_mismatched_shapes_name_the_tensor_and_both_shapes(source):
    state, _ = magvit2.select_weights(source.state)
    config = magvit2.infer_config({k: tuple(v.shape) for k, v in state.items()})
    wider = config.replace(ch_mult=(1, 2))
    with pytest.raises(CheckpointError, match=r"encoder\.down\.1\.block\.0\.norm2\.weight: the "
                       r"config expects shape \(64,\), the file holds \(32,\)"):
        magvit2.to_flax(state, wider)
    narrow = {**state, "encoder.conv_out.weight": np.zeros((10, 32, 1, 1), np.float32)}
    with pytest.raises(CheckpointError, match=r"encoder\.conv_out\.weight: the config expects "
                       r"shape \(18, 32, 1, 1\), the file holds \(10, 32, 1, 1\)"):
        magvit2.to_flax(narrow, config)
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): decoder/adaptive_0"):
        magvit2.to_flax({k: v for k, v in state.items() if ".adaptive.0." not in k}, config)
    with pytest.raises(ValueError, match=r"n_embed == 2 \*\* z_channels"):
        magvit2.module_from_config(config.replace(n_embed=1024))


def test_config_from_seed_vokens_yaml(tmp_path):
    yaml_file = tmp_path / "pretrain_lfqgan_256_262144.yaml"
    yaml_file.write_text(
        "model:\n  class_path: src.Open_MAGVIT2.models.lfqgan_pretrain.VQModel\n  init_args:\n"
        "    ddconfig:\n      double_z: False\n      z_channels: 18\n      resolution: 128\n"
        "      in_channels: 3\n      out_ch: 3\n      ch: 128\n      ch_mult: [1,1,2,2,4]\n"
        "      num_res_blocks: 4\n    n_embed: 262144\n    embed_dim: 18\n    use_ema: True\n",
        encoding="utf-8")
    config = magvit2.infer_config({}, str(yaml_file))
    assert (config.ch, tuple(config.ch_mult), config.num_res_blocks) == (128, (1, 1, 2, 2, 4), 4)
    assert (config.n_embed, config.embed_dim, config.downsample_factor) == (2**18, 18, 16)
    (tmp_path / "bad.yaml").write_text("model: {}\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="no model.init_args.ddconfig"):
        magvit2.infer_config({}, str(tmp_path / "bad.yaml"))


@pytest.mark.skipif(not REGISTERED, reason="open_magvit2 is not yet a family in models/config.py")
def test_convert_and_load_the_published_layout(tmp_path, golden):
    from vqgan_datasets.models.conversion import convert_checkpoint
    from vqgan_datasets.models.modeling import VQModel

    out = convert_checkpoint(CKPT, tmp_path / "model")
    model = VQModel.from_pretrained(str(out))
    assert model.config.family == "open_magvit2" and model.config.weights == "ema"
    assert (model.config.quantizer, model.config.preprocess) == _REGISTRATION
    _, tokens = model.encode(_pixels(golden["pixels"]))
    np.testing.assert_array_equal(np.asarray(tokens), golden["tokens_ema"])
    decoded = model.decode_code(jnp.asarray(golden["tokens_ema"][:1]))
    np.testing.assert_allclose(np.asarray(decoded), golden["decoded_codes"], atol=1e-4, rtol=0)


def test_fixture_checkpoint_is_seed_vokens_lightning_layout():
    blob = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert {"state_dict", "epoch", "global_step"} <= set(blob)
    assert "model_ema.decay" in blob["state_dict"]
    assert not any(k.startswith("quantize.") for k in blob["state_dict"])  # LFQ saves nothing
