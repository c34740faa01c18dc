"""The Flax VQGAN against taming-transformers' PyTorch modules, both per-backend formulations
against float64 references, and VQModel's surface."""

from __future__ import annotations

import functools
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, photos

from vqgan_datasets import modeling
from vqgan_datasets.config import VQGANConfig
from vqgan_datasets.modeling import VQModel, check_codes, nearest_codes

DEMO = Path(__file__).resolve().parents[1] / "model" / "demo"

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
    from vqgan_datasets.checkpoints import convert_taming_checkpoint

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
    from vqgan_datasets.checkpoints import infer_taming_config, load_taming_state_dict

    config, ref, *_ = parity_pair
    save_taming_checkpoint(ref, tmp_path / "x.ckpt")
    state = load_taming_state_dict(tmp_path / "x.ckpt")
    assert infer_taming_config(state, resolution=config.resolution) == config


# -- the per-backend formulations: the choice, and each branch's numerics on CPU -------------


@pytest.fixture
def accelerator_formulation(monkeypatch):
    """Every per-backend choice takes its GPU/TPU branch, here on CPU (for new traces only)."""
    monkeypatch.setattr(modeling, "_per_backend", lambda cpu, accelerator, *args: accelerator(*args))


def test_each_platform_lowers_to_its_own_formulation():
    module = modeling.module_from_config(TINY)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), modeling.init_params(TINY))
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    pixels = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    cpu_names = ("group_norm_cpu", "upsample_cpu", "nearest_codes_exact")
    accelerator_names = ("group_norm_accelerator", "upsample_accelerator", "nearest_codes_rescored")
    for platform in ("cpu", "cuda", "tpu"):
        # Lowered for a platform this machine need not have; debug locations name the branches.
        text = jax.export.export(forward, platforms=[platform])(shapes, pixels).mlir_module()
        wanted, unwanted = ((cpu_names, accelerator_names) if platform == "cpu"
                            else (accelerator_names, cpu_names))
        assert all(name in text for name in wanted), platform
        assert not any(name in text for name in unwanted), platform


def _group_norm_f64(x, scale, bias, offset, groups, eps=1e-6):
    x = x.astype(np.float64) + (0.0 if offset is None else offset.astype(np.float64))
    grouped = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    return ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("branch", [modeling.group_norm_cpu, modeling.group_norm_accelerator])
def test_group_norm_branches_match_float64(branch):
    # Offset activations (channel means far from 0, std ~1) are where a one-pass variance cancels.
    # Measured max errors: float32 <= 1.4e-5 (flax.linen.GroupNorm: 4e-3 at mean 50); bfloat16
    # output within a bfloat16 step of the output's magnitude.
    rng = np.random.default_rng(0)
    scale = rng.normal(1, 0.2, 64).astype(np.float32)
    bias = rng.normal(0, 0.5, 64).astype(np.float32)
    for mean in (0.0, 5.0, 50.0):
        x = (rng.normal(mean, 1.0, (2, 8, 8, 64)) + rng.normal(0, 3, 64)).astype(np.float32)
        for offset in (None, rng.normal(0, 2, 64).astype(np.float32)):
            args = (scale, bias) if offset is None else (scale, bias, offset)
            for dtype, tolerance in ((jnp.float32, 3e-5), (jnp.bfloat16, 2.0**-7)):
                xd = jnp.asarray(x, dtype)
                fn = functools.partial(branch, num_groups=32, epsilon=1e-6, dtype=dtype)
                got = jax.jit(fn)(xd, *args)
                assert got.dtype == dtype and got.shape == x.shape
                expected = _group_norm_f64(np.asarray(xd, np.float32), scale, bias, offset, 32)
                error = np.abs(np.asarray(got, np.float32) - expected).max()
                assert error <= tolerance * max(1.0, np.abs(expected).max()), (mean, dtype, error)


@pytest.mark.parametrize("branch", [modeling.upsample_cpu, modeling.upsample_accelerator])
def test_upsample_branches_match_float64(branch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 32)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 32, 32)) / np.sqrt(9 * 32)).astype(np.float32)
    bias = rng.normal(0, 0.1, 32).astype(np.float32)
    up = np.pad(x.astype(np.float64).repeat(2, 1).repeat(2, 2), ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = bias + sum(np.einsum("bhwi,io->bhwo", up[:, dy : dy + 16, dx : dx + 16], kernel[dy, dx])
                          for dy in range(3) for dx in range(3))
    # Measured: 1.7e-6 (float32), 2.2e-2 (bfloat16; outputs up to ~4).
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.05)):
        got = jax.jit(functools.partial(branch, dtype=dtype))(x, kernel, bias)
        assert got.dtype == dtype and got.shape == (2, 16, 16, 32)
        assert np.abs(np.asarray(got, np.float32) - expected).max() < tolerance


def _argmin_f64(z, codebook):
    z, codebook = z.astype(np.float64), codebook.astype(np.float64)
    return ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)


def _near_ties(rng, size=1024, dim=32, pairs=64):
    """A codebook whose first 2*pairs rows are pairs closer than bfloat16 resolves (|b - a| =
    2^-8 |a|), and latents between each pair at 0.2-0.4 of the way out from the midpoint: the
    distances differ by >= 50 float32 ulps, below what a bfloat16 matmul resolves."""
    codebook = rng.normal(size=(size, dim)) / np.sqrt(dim)
    a = codebook[: 2 * pairs : 2]
    u = rng.normal(size=(pairs, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    delta = 2.0**-8 * np.linalg.norm(a, axis=1, keepdims=True)
    codebook[1 : 2 * pairs : 2] = a + delta * u
    latents = []
    for s in (-0.4, -0.2, 0.2, 0.4):
        noise = rng.normal(size=(pairs, dim)) * 0.05 / np.sqrt(dim)
        noise -= (noise * u).sum(1, keepdims=True) * u  # orthogonal: leaves the gap alone
        latents.append(a + (0.5 + s) * delta * u + noise)
    return codebook.astype(np.float32), np.concatenate(latents).astype(np.float32)


@pytest.fixture(scope="module")
def held_out_latents():
    """(latents, codebook): the trained demo model's latents of real photos, its codebook."""
    demo = VQModel.from_pretrained(str(DEMO))
    pixels = photos(128, 4).astype(np.float32) / 127.5 - 1.0
    latents = demo.module.apply({"params": demo.params}, pixels, method=modeling.VQGAN.encode_latents)
    codebook = demo.params["quantize"]["embedding"]["embedding"]
    return np.asarray(latents).reshape(-1, demo.config.embed_dim), np.asarray(codebook)


@pytest.mark.parametrize("branch", [modeling.nearest_codes_exact, modeling.nearest_codes_rescored])
def test_nearest_codes_branches_equal_float64_argmin(branch, held_out_latents):
    rng = np.random.default_rng(2)
    codebook, tied = _near_ties(rng)
    far = (rng.normal(size=(1000, 32)) / np.sqrt(32)).astype(np.float32)  # many similar distances
    cases = {"near ties": (tied, codebook), "far from all codes": (far, codebook),
             "demo model, real photos": held_out_latents}
    fast_pass_misses = {}
    for name, (z, e) in cases.items():
        expected = _argmin_f64(z, e)
        got = np.asarray(jax.jit(branch)(z, e))
        assert got.dtype == np.int32
        assert np.array_equal(got, expected), (name, int((got != expected).sum()))
        bf16_argmin = np.asarray(modeling.nearest_codes_rescored(z, e, candidates=1))
        fast_pass_misses[name] = float((bf16_argmin != expected).mean())
    # The cases are sharp: a bfloat16 matmul alone picks the wrong code for many of them.
    assert fast_pass_misses["near ties"] > 0.2, fast_pass_misses
    assert fast_pass_misses["demo model, real photos"] > 0.005, fast_pass_misses


@pytest.mark.parametrize("branch", [modeling.nearest_codes_exact, modeling.nearest_codes_rescored])
def test_nearest_codes_ties_go_to_the_lowest_index(branch):
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(40, 8)).astype(np.float32)
    codebook[[9, 30]] = codebook[5]  # duplicated codes
    z = codebook[[5, 5, 7]] + np.float32(1e-3)
    assert np.asarray(branch(z, codebook)).tolist() == [5, 5, 7]


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


def test_nearest_codes_is_argmin_of_euclidean_distance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 8)).astype(np.float32)
    codebook = rng.normal(size=(30, 8)).astype(np.float32)
    brute = np.argmin(((z[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(np.asarray(nearest_codes(jnp.asarray(z), jnp.asarray(codebook))), brute)


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
