"""The IBQ family (models/ibq.py) against SEED-Voken's own code (tests/fixtures/ibq)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vqgan_datasets.models import families, ibq, quantizers
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.conversion import convert_checkpoint
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.models.sourcefiles import read_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ibq"
CKPT = FIXTURES / "ibq-tiny.ckpt"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = convert_checkpoint(CKPT, tmp_path_factory.mktemp("ibq") / "model")
    return VQModel.from_pretrained(str(out))


def _pixels(golden) -> np.ndarray:
    return (golden["pixels"] / 127.5 - 1.0).astype(np.float32)  # SEED-Voken's scaling


@pytest.fixture(scope="module")
def encoded(converted, golden):
    quant, tokens = converted.encode(_pixels(golden))
    return np.asarray(quant), np.asarray(tokens)


def test_detected_converted_with_its_ema_weights(converted):
    config = converted.config
    assert config.family == "ibq" and config.quantizer == "dot"
    assert config.weights == "ema"
    assert config.preprocess == "opencv_linear_center_crop"
    assert (config.ch, tuple(config.ch_mult), config.num_res_blocks) == (32, (1, 1), 1)
    assert (config.z_channels, config.embed_dim, config.n_embed) == (16, 8, 64)


def test_tokens_equal_seed_vokens_and_come_from_the_ema_weights(encoded, golden):
    tokens = encoded[1]
    np.testing.assert_array_equal(tokens, golden["tokens_ema"])
    # The live weights give other tokens at most positions: the EMA copies were used.
    assert (golden["tokens_live"] != golden["tokens_ema"]).mean() > 0.5


def test_decoded_pixels_match_within_1e4(converted, encoded, golden):
    decoded = np.asarray(converted.decode(jnp.asarray(encoded[0][:1])))
    np.testing.assert_allclose(decoded, golden["decoded_ema"], atol=1e-4, rtol=0)
    from_codes = np.asarray(converted.decode_code(jnp.asarray(golden["tokens_ema"][:1])))
    np.testing.assert_allclose(from_codes, golden["decoded_ema"], atol=1e-4, rtol=0)


def test_an_ibq_file_is_never_taken_for_taming():
    loaded = read_source(CKPT)
    family, signs = families.detect(loaded.shapes, loaded.extras, str(CKPT))
    assert family == "ibq" and any("model_ema" in s for s in signs)
    # Its tensor names are taming's: the taming family sees its own signs too.
    assert families.family_module("taming").evidence(loaded.shapes, loaded.extras)


def _live_state_dict(tmp_path) -> Path:
    """The fixture's live weights as a bare state dict (no EMA, no Lightning wrapper)."""
    blob = torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"]
    path = tmp_path / "bare.pt"
    torch.save({k: v for k, v in blob.items() if not k.startswith(("model_ema.", "loss."))}, path)
    return path


def test_a_bare_state_dict_that_fits_both_stays_taming(tmp_path, golden, caplog):
    path = _live_state_dict(tmp_path)
    loaded = read_source(path)
    with caplog.at_level("INFO"):
        family, _ = families.detect(loaded.shapes, loaded.extras, str(path))
    assert family == "taming"
    assert "--family ibq" in caplog.text
    # Chosen explicitly it converts as IBQ with the live weights, and gives IBQ's live tokens.
    out = convert_checkpoint(path, tmp_path / "forced", family="ibq")
    model = VQModel.from_pretrained(str(out))
    assert model.config.family == "ibq" and model.config.weights is None
    np.testing.assert_array_equal(np.asarray(model.encode(_pixels(golden))[1]),
                                  golden["tokens_live"])


def test_other_signs_of_ibq():
    taming_names = {"encoder.down.0.block.0.conv1.weight": (32, 32, 3, 3)}
    assert ibq.evidence(taming_names, {}) == []
    hub = {"source": {"repo_id": "TencentARC/IBQ-Tokenizer-262144",
                      "filename": "imagenet256_262144.ckpt"}}
    assert ibq.evidence(taming_names, hub)
    pretrain = {"source": {"repo_id": None, "filename": "IBQ_pretrain_16384.ckpt"}}
    assert ibq.evidence(taming_names, pretrain)
    hyper = {"hyper_parameters": {"class_path": "src.IBQ.models.ibqgan.IBQ"}}
    assert ibq.evidence(taming_names, hyper)
    entropy = {"hyper_parameters": {"n_embed": 16384, "use_entropy_loss": True}}
    assert ibq.evidence(taming_names, entropy)
    assert ibq.evidence(taming_names, {"hyper_parameters": {"n_embed": 16384}}) == []


def test_select_weights_maps_litema_names():
    state = {"encoder.conv_in.weight": np.zeros((2, 3, 3, 3)), "loss.w": np.zeros(1),
             "model_ema.encoderconv_inweight": np.ones((2, 3, 3, 3)),
             "model_ema.lossw": np.ones(1), "model_ema.decay": np.array(0.999)}
    chosen, weights = ibq.select_weights(state)
    assert weights == "ema"
    assert set(chosen) == {"encoder.conv_in.weight", "loss.w"}
    assert chosen["encoder.conv_in.weight"].sum() == 2 * 3 * 9
    live, none = ibq.select_weights({k: v for k, v in state.items() if "model_ema" not in k})
    assert none is None and live["encoder.conv_in.weight"].sum() == 0
    state["encoder.conv_out.bias"] = np.zeros(2)
    with pytest.raises(CheckpointError, match="encoder.conv_out.bias.*model_ema.encoderconv_outbias"):
        ibq.select_weights(state)


def test_infer_config_from_a_seed_voken_yaml(tmp_path):
    yaml_path = tmp_path / "imagenet_ibqgan_262144.yaml"
    yaml_path.write_text(
        "model:\n  class_path: src.IBQ.models.ibqgan.IBQ\n  init_args:\n    ddconfig:\n"
        "      double_z: False\n      z_channels: 256\n      resolution: 256\n"
        "      in_channels: 3\n      out_ch: 3\n      ch: 128\n      ch_mult: [1,1,2,2,4]\n"
        "      num_res_blocks: 4\n      attn_resolutions: [16]\n      dropout: 0.0\n"
        "    n_embed: 262144\n    embed_dim: 256\n    use_ema: True\n"
    )
    config = ibq.infer_config({}, str(yaml_path))
    assert config == VQGANConfig(num_res_blocks=4, n_embed=262144, family="ibq")
    assert config.token_dtype == "int32"
    with pytest.raises(CheckpointError, match="init_args.ddconfig"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: {}\n")
        ibq.infer_config({}, str(bad))


def test_dot_quantizer_takes_the_exact_argmax_on_near_ties():
    # Nonnegative z and codes: a dot's float32 error stays below 8 ulps of it, so codes 2^-20
    # apart (16 ulps) rank as in float64; exact copies tie and go to the lower index.
    rng = np.random.default_rng(0)
    z = rng.uniform(0.5, 1.0, (256, 8)).astype(np.float32)
    codebook = rng.uniform(0.5, 1.0, (512, 8)).astype(np.float32)
    best = np.argmax(z.astype(np.float64) @ codebook.T.astype(np.float64), axis=1)
    winners = list(dict.fromkeys(best.tolist()))[:3]
    assert len(winners) == 3
    spare = [i for i in range(len(codebook)) if i not in set(best.tolist())]
    for code, factor, slot in zip(winners, (1 + 2**-20, 1 - 2**-20, 1.0), spare[-3:], strict=True):
        codebook[slot] = codebook[code] * np.float32(factor)
    expected = np.argmax(z.astype(np.float64) @ codebook.T.astype(np.float64), axis=1)
    got = np.asarray(quantizers.nearest_codes(jnp.asarray(z), jnp.asarray(codebook), "dot"))
    np.testing.assert_array_equal(got, expected)
    assert (got == spare[-3]).any()  # the code 2^-20 above its original won


def test_the_published_architecture_is_read_off_its_tensors():
    # Names and shapes of SEED-Voken's 262,144-code model (its yaml's), EMA copies included.
    shapes = {k: tuple(v) for k, v in
              json.loads((FIXTURES / "ibq_f16_262144_shapes.json").read_text()).items()}
    family, _ = families.detect(shapes, {"top_level_keys": ["state_dict"]})
    assert family == "ibq"
    zero = np.zeros(1, np.float32)  # every tensor a view of one float: no memory
    state = {k: np.lib.stride_tricks.as_strided(zero, v, (0,) * len(v)) for k, v in shapes.items()}
    chosen, weights = ibq.select_weights(state)
    assert weights == "ema"
    config = ibq.infer_config({k: v.shape for k, v in chosen.items()})
    assert config == VQGANConfig(num_res_blocks=4, n_embed=262144, family="ibq")
    params = ibq.to_flax(chosen, config)  # every tensor placed, every shape checked
    assert params["quantize"]["embedding"]["embedding"].shape == (262144, 256)
