"""The leaf layers' per-backend formulations: which one each platform lowers to, and each
branch's numerics on CPU against float64 references."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, photos

from vqgan_datasets.models import layers, modeling
from vqgan_datasets.models.layers import nearest_codes
from vqgan_datasets.models.modeling import VQModel

DEMO = Path(__file__).resolve().parents[2] / "model" / "demo"


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


@pytest.mark.parametrize("branch", [layers.group_norm_cpu, layers.group_norm_accelerator])
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


@pytest.mark.parametrize("branch", [layers.upsample_cpu, layers.upsample_accelerator])
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


@pytest.mark.parametrize("branch", [layers.nearest_codes_exact, layers.nearest_codes_rescored])
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
        bf16_argmin = np.asarray(layers.nearest_codes_rescored(z, e, candidates=1))
        fast_pass_misses[name] = float((bf16_argmin != expected).mean())
    # The cases are sharp: a bfloat16 matmul alone picks the wrong code for many of them.
    assert fast_pass_misses["near ties"] > 0.2, fast_pass_misses
    assert fast_pass_misses["demo model, real photos"] > 0.005, fast_pass_misses


@pytest.mark.parametrize("branch", [layers.nearest_codes_exact, layers.nearest_codes_rescored])
def test_nearest_codes_ties_go_to_the_lowest_index(branch):
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(40, 8)).astype(np.float32)
    codebook[[9, 30]] = codebook[5]  # duplicated codes
    z = codebook[[5, 5, 7]] + np.float32(1e-3)
    assert np.asarray(branch(z, codebook)).tolist() == [5, 5, 7]


def test_nearest_codes_is_argmin_of_euclidean_distance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 8)).astype(np.float32)
    codebook = rng.normal(size=(30, 8)).astype(np.float32)
    brute = np.argmin(((z[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(np.asarray(nearest_codes(jnp.asarray(z), jnp.asarray(codebook))), brute)
    assert modeling.nearest_codes is nearest_codes  # still importable from modeling
