"""The leaf layers' per-backend formulations: which one each platform lowers to, and each
branch's numerics on CPU against float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets.models import layers, modeling


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
