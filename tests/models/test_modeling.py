"""The Flax VQGAN against taming-transformers' PyTorch modules (both per-backend formulations),
and VQModel's surface. Each branch's numerics alone: tests/test_layers.py."""

from __future__ import annotations

import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, photos

from vqgan_datasets.models import layers
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.modeling import VQModel, check_codes

PARITY_CONFIGS = {
    # attention at a downsampled resolution (16×16 of 64×64), f4
    "attn-downsampled": TINY.replace(n_embed=256),
    # several res blocks, no attention outside mid, f8, 1×1-shortcut changes in every level
    "three-res-blocks": VQGANConfig(
        ch=32, ch_mult=(1, 2, 1, 2), num_res_blocks=3, attn_resolutions=(), resolution=64,
        z_channels=64, embed_dim=32, n_embed=512,
    ),
    # attention at full resolution, resampling without convs (avg-pool / plain nearest)
    "full-res-attn-no-conv": VQGANConfig(
        ch=64, ch_mult=(1, 1), num_res_blocks=2, attn_resolutions=(32, 16), resolution=32,
        z_channels=32, embed_dim=32, n_embed=128, resamp_with_conv=False,
    ),
}


def _fake_lightning_callback_class():
    """A class pickled under Lightning's name, as real taming checkpoints reference one."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 1.0

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    return name, module, ModelCheckpoint


def save_taming_checkpoint(ref, path) -> None:
    import torch

    name, module, callback = _fake_lightning_callback_class()
    parents = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    added = [n for n in [*parents, name] if n not in sys.modules]
    for n in parents:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[name] = module
    try:
        blob = ref.lightning_checkpoint()
        blob["callbacks"] = {callback: {"best_model_score": torch.tensor(1.0)}}
        blob["hyper_parameters"] = {"callback": callback()}
        torch.save(blob, path)
    finally:
        for n in added:
            sys.modules.pop(n, None)


@pytest.fixture(scope="module")
def taming():
    """tests/taming_reference.py, which needs torch and taming's modules (skip without them)."""
    pytest.importorskip("torch")
    pytest.importorskip("taming.modules.diffusionmodules.model")
    import taming_reference

    return taming_reference


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def parity_pair(request, tmp_path_factory, taming):
    from vqgan_datasets.models.taming import convert_taming_checkpoint

    TamingVQGAN, nhwc_to_nchw = taming.TamingVQGAN, taming.nhwc_to_nchw
    config = PARITY_CONFIGS[request.param]
    ref = TamingVQGAN(config, seed=0)
    size = config.resolution
    real = photos(size, 4)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 255, size=(2, size, size, 3)).round().astype(np.uint8)
    images = np.concatenate([real, noise])
    pixels = images.astype(np.float32) / 127.5 - 1.0
    ref.spread_codebook(nhwc_to_nchw(pixels))
    tmp = tmp_path_factory.mktemp(request.param)
    save_taming_checkpoint(ref, tmp / "last.ckpt")
    convert_taming_checkpoint(tmp / "last.ckpt", tmp / "model", config)
    model = VQModel.from_pretrained(str(tmp / "model"))
    return config, ref, model, images, pixels


def test_tokens_identical_to_reference(parity_pair, taming):
    nhwc_to_nchw, nchw_to_nhwc = taming.nhwc_to_nchw, taming.nchw_to_nhwc
    config, ref, model, images, pixels = parity_pair
    ref_quant, ref_codes = ref.encode(nhwc_to_nchw(pixels))
    quant, codes = model.encode(pixels)
    ref_codes = ref_codes.numpy()
    assert np.array_equal(np.asarray(codes), ref_codes)
    # The same through the uint8 helper (scaling x/127.5 - 1 on the device).
    assert np.array_equal(model.encode_images(images), ref_codes)
    # Meaningful: tokens are spread over the codebook, not one code everywhere.
    assert len(np.unique(ref_codes)) >= min(32, config.n_embed // 4)
    np.testing.assert_allclose(np.asarray(quant), nchw_to_nhwc(ref_quant), atol=1e-6)


def test_decoder_matches_reference(parity_pair, taming):
    nhwc_to_nchw, nchw_to_nhwc = taming.nhwc_to_nchw, taming.nchw_to_nhwc
    config, ref, model, images, pixels = parity_pair
    ref_quant, ref_codes = ref.encode(nhwc_to_nchw(pixels))
    expected = nchw_to_nhwc(ref.decode(ref_quant))
    got = np.asarray(model.decode(nchw_to_nhwc(ref_quant)))
    assert got.shape == expected.shape == images.shape
    assert np.abs(got - expected).max() < 1e-4
    from_codes = np.asarray(model.decode_code(ref_codes.numpy()))
    assert np.abs(from_codes - expected).max() < 1e-4


def test_inferred_config_matches(parity_pair, tmp_path, taming):
    from vqgan_datasets.models.taming import infer_taming_config, load_taming_state_dict

    config, ref, *_ = parity_pair
    save_taming_checkpoint(ref, tmp_path / "x.ckpt")
    state = load_taming_state_dict(tmp_path / "x.ckpt")
    assert infer_taming_config(state, resolution=config.resolution) == config


# -- the whole model in its GPU/TPU formulation, run on CPU (branches alone: test_layers.py) ---


@pytest.fixture
def accelerator_formulation(monkeypatch):
    """Every per-backend choice takes its GPU/TPU branch, here on CPU (for new traces only)."""
    monkeypatch.setattr(layers, "per_backend", lambda cpu, accelerator, *args: accelerator(*args))


@pytest.mark.parametrize("parity_pair", ["attn-downsampled"], indirect=True)  # every module kind
def test_accelerator_formulation_matches_reference(parity_pair, taming, accelerator_formulation):
    # The whole model as GPUs/TPUs run it, on CPU: float32 tokens identical to taming's, decoder
    # within the same 1e-4 as the CPU formulation.
    nhwc_to_nchw, nchw_to_nhwc = taming.nhwc_to_nchw, taming.nchw_to_nhwc
    config, ref, model, images, pixels = parity_pair
    accelerated = VQModel(config, model.params)  # fresh jit wrappers: traced with the patch
    ref_quant, ref_codes = ref.encode(nhwc_to_nchw(pixels))
    _, codes = accelerated.encode(pixels)
    assert np.array_equal(np.asarray(codes), ref_codes.numpy())
    expected = nchw_to_nhwc(ref.decode(ref_quant))
    assert np.abs(np.asarray(accelerated.decode(nchw_to_nhwc(ref_quant))) - expected).max() < 1e-4


def test_accelerator_formulation_in_bfloat16_mostly_agrees(tiny_model, accelerator_formulation):
    images = photos(64, 4)
    bf16 = VQModel(TINY, tiny_model.params, dtype=jnp.bfloat16)
    assert (bf16.encode_images(images) == tiny_model.encode_images(images)).mean() > 0.5


def test_decode_code_rejects_out_of_range_ids(tiny_model):
    codes = np.zeros((2, 256), np.int32)
    codes[1, 17] = TINY.n_embed
    with pytest.raises(ValueError, match=r"token id 64 at position \(1, 17\) is outside \[0, 64\)"):
        tiny_model.decode_code(codes)
    codes[1, 17] = -1
    with pytest.raises(ValueError, match="position"):
        tiny_model.decode_images(codes)
    with pytest.raises(ValueError, match="integers"):
        check_codes(np.zeros((1, 4), np.float32), 64)


def test_decode_code_under_callers_jit_marks_bad_ids_nan(tiny_model):
    import jax

    codes = np.zeros((1, 256), np.int32)
    codes[0, 0] = 10_000
    out = jax.jit(lambda c: tiny_model.decode_code(c))(codes)
    assert np.isnan(np.asarray(out)).any()


def test_seed_usage_works_with_only_the_import_changed(tiny_model_dir):
    # The seed's calls: from_pretrained, `_, indices = model.encode(batch)`, decode_code,
    # and pmap over a function that closes over the model.
    import jax

    model = VQModel.from_pretrained(str(tiny_model_dir))
    batch = np.random.default_rng(0).uniform(-1, 1, (jax.device_count(), 2, 64, 64, 3))
    batch = batch.astype(np.float32)
    p_encode = jax.pmap(lambda b: model.encode(b)[1])
    indices = np.asarray(p_encode(batch)).reshape(-1, 256)
    _, direct = model.encode(batch.reshape(-1, 64, 64, 3))
    assert np.array_equal(indices, np.asarray(direct))
    images = model.decode_code(indices)
    assert images.shape == (batch.shape[0] * 2, 64, 64, 3)
    # dalle-mini's form: _do_init=False returns (model, params); methods take params=.
    model2, params = VQModel.from_pretrained(str(tiny_model_dir), _do_init=False)
    assert np.array_equal(np.asarray(model2.decode_code(indices, params=params)), np.asarray(images))


def test_uint8_helpers_apply_value_range(tiny_model):
    images = photos(64, 2)
    codes = tiny_model.encode_images(images)
    assert codes.shape == (2, 256) and codes.dtype == np.int32
    _, direct = tiny_model.encode(images.astype(np.float32) / 127.5 - 1.0)
    assert np.array_equal(codes, np.asarray(direct))
    decoded = tiny_model.decode_images(codes)
    pixels = np.asarray(tiny_model.decode_code(codes))
    expected = np.round(np.clip((pixels + 1) / 2, 0, 1) * 255).astype(np.uint8)
    assert decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="uint8"):
        tiny_model.encode_images(images.astype(np.float32))


def test_other_value_range_changes_the_input_scaling(tiny_model):
    zero_one = VQModel(TINY.replace(value_range=(0.0, 1.0)), tiny_model.params)
    images = photos(64, 1)
    _, expected = tiny_model.encode(images.astype(np.float32) / 255.0)
    assert np.array_equal(zero_one.encode_images(images), np.asarray(expected))


def test_bfloat16_compute_mostly_agrees(tiny_model):
    bf16 = VQModel(TINY, tiny_model.params, dtype=jnp.bfloat16)
    images = photos(64, 4)
    ref = tiny_model.encode_images(images)
    got = bf16.encode_images(images)
    assert got.shape == ref.shape
    # Agreement is measured and reported (model/README.md), not asserted exact.
    assert (got == ref).mean() > 0.5


def test_weights_digest_is_stable_and_content_based(tiny_model, tiny_config):
    again = VQModel(tiny_config, tiny_model.params)
    assert again.weights_digest == tiny_model.weights_digest
    other = VQModel(tiny_config, seed=1)
    assert other.weights_digest != tiny_model.weights_digest


def test_replaced_params_are_no_longer_the_checkpoints(tiny_model_dir, tiny_config):
    # vqgan-jax's own idiom (`model.params = state`): the digest, which fingerprints and records
    # use, must follow the weights, and the model must not pickle as the file's reference.
    model = VQModel.from_pretrained(str(tiny_model_dir))
    file_digest = model.weights_digest
    model.params = model.params  # the same tree: still the checkpoint's
    assert model.weights_digest == file_digest and model.source is not None
    other = VQModel(tiny_config, seed=1)
    model.params = other.params
    assert model.params is other.params
    assert model.weights_digest == other.weights_digest != file_digest
    assert model.source is None and model.name is None


# -- encode's warning for pixels outside the model's range (the seed's HowTo passes uint8) ------

# The smallest model (one level, no resampling): each test needs a fresh model, hence a compile.
MICRO = VQGANConfig(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), resolution=8,
                    z_channels=8, embed_dim=8, n_embed=16)


def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_encode_warns_once_for_uint8_pixels():
    model = VQModel(MICRO)
    images = photos(8, 2)
    messages = _warnings(lambda: [model.encode(images) for _ in range(3)])
    assert len(messages) == 1
    assert "uint8 pixels" in messages[0] and "[-1, 1]" in messages[0]
    assert "encode_images" in messages[0] and "pixels / 127.5 - 1" in messages[0]
    # Drop-in behaviour kept: nothing was scaled.
    _, codes = model.encode(images)
    assert np.array_equal(np.asarray(codes), np.asarray(model.encode(images.astype(np.float32))[1]))


def test_encode_warns_for_float_pixels_far_outside_the_range():
    images = photos(8, 1).astype(np.float32)
    zero_one = VQModel(MICRO.replace(value_range=(0.0, 1.0)))
    messages = _warnings(lambda: zero_one.encode(jnp.asarray(images)))  # a jax array, first call
    assert len(messages) == 1 and "values from" in messages[0] and "[0, 1]" in messages[0]
    assert "pixels / 255." in messages[0]
    model = VQModel(MICRO, zero_one.params)
    model.encode(images / 127.5 - 1.0)
    assert len(_warnings(lambda: model.encode(images))) == 1  # numpy: checked on every call


def test_encode_does_not_warn_for_in_range_floats():
    model = VQModel(MICRO)
    images = photos(8, 2).astype(np.float32)
    in_range = [images / 127.5 - 1.0, images / 255.0, np.clip(images / 100 - 1.1, -3, 3)]
    assert _warnings(lambda: [model.encode(x) for x in in_range]) == []
    assert _warnings(lambda: model.encode(jnp.asarray(in_range[0], jnp.bfloat16))) == []


def test_encode_check_skips_traced_values_and_reads_their_dtype():
    model = VQModel(MICRO)
    batch = photos(8, 2).astype(np.float32)[None]  # 0-255 floats: values unknown under pmap
    assert _warnings(lambda: jax.pmap(lambda b: model.encode(b)[1])(batch)) == []
    assert _warnings(lambda: jax.jit(lambda b: model.encode(b)[1])(batch[0])) == []
    messages = _warnings(lambda: jax.jit(lambda b: model.encode(b)[1])(batch[0].astype(np.uint8)))
    assert len(messages) == 1 and "uint8 pixels" in messages[0]
