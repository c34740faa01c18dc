"""The quantizer kinds (l2, cosine, dot): each backend's formulation against a float64 numpy
reference, on near-ties built for each kind, and the VectorQuantizer module."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import photos

from vqgan_datasets.models import modeling, quantizers
from vqgan_datasets.models.quantizers import VectorQuantizer, nearest_codes

DEMO = Path(__file__).resolve().parents[2] / "vqgan_datasets" / "_demo" / "model"
BRANCHES = [quantizers.nearest_codes_exact, quantizers.nearest_codes_rescored]


def reference_f64(z, codebook, kind):
    """The code each row of z takes, in float64: argmin distance (l2; cosine after normalising
    z and the codes), argmax z·e (dot); ties to the lowest index."""
    z, codebook = z.astype(np.float64), codebook.astype(np.float64)
    if kind == "dot":
        return (z @ codebook.T).argmax(1)
    if kind == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        codebook = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    return ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def near_ties(rng, kind, size=1024, dim=32, pairs=64):
    """(latents, codebook) where the first 2*pairs codes are pairs closer than bfloat16 resolves
    (|b - a| = 2^-8 |a|), and the latents sit between each pair, 0.2-0.4 of the gap out from
    the tie: float32 ranks them right (the gap is many float32 ulps), a bfloat16 matmul cannot."""
    codebook = rng.normal(size=(size, dim)) / np.sqrt(dim)
    u = _unit(rng.normal(size=(pairs, dim)))
    if kind == "l2":
        a = codebook[: 2 * pairs : 2]
    else:  # unit directions for the pair, its gap orthogonal to them
        a = _unit(codebook[: 2 * pairs : 2])
        u = _unit(u - (u * a).sum(1, keepdims=True) * a)
        if kind == "dot":  # the pair's norm above every other code's, so that it holds the max
            a = 3 * a
    delta = 2.0**-8 * np.linalg.norm(a, axis=1, keepdims=True)
    codebook[: 2 * pairs : 2] = a
    codebook[1 : 2 * pairs : 2] = a + delta * u
    latents = []
    for s in (-0.4, -0.2, 0.2, 0.4):
        noise = rng.normal(size=(pairs, dim)) * 0.05 / np.sqrt(dim)
        noise -= (noise * u).sum(1, keepdims=True) * u  # orthogonal: leaves the gap alone
        if kind == "l2":
            z = a + (0.5 + s) * delta * u + noise
        else:  # the tie between a and b's directions, at random norms (cosine ignores them)
            noise -= (noise * _unit(a)).sum(1, keepdims=True) * _unit(a)
            z = _unit(a) + (0.5 + s) * 2.0**-8 * u + 0.1 * noise
            z *= rng.uniform(0.3, 3.0, size=(pairs, 1))
        latents.append(z)
    if kind != "l2":  # codes at random norms too: cosine must normalise them
        scales = rng.uniform(0.5, 2.0, size=(size, 1))
        scales[: 2 * pairs] = 1.0
        codebook *= scales
    return np.concatenate(latents).astype(np.float32), codebook.astype(np.float32)


@pytest.fixture(scope="module")
def held_out_latents():
    """(latents, codebook): the trained demo model's latents of real photos, its codebook."""
    demo = modeling.VQModel.from_pretrained(str(DEMO))
    pixels = photos(128, 4).astype(np.float32) / 127.5 - 1.0
    latents = demo.module.apply({"params": demo.params}, pixels, method="encode_latents")
    codebook = demo.params["quantize"]["embedding"]["embedding"]
    return np.asarray(latents).reshape(-1, demo.config.embed_dim), np.asarray(codebook)


@pytest.mark.parametrize("kind", quantizers.KINDS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_branches_equal_float64_reference(branch, kind, held_out_latents):
    rng = np.random.default_rng(2)
    tied, codebook = near_ties(rng, kind)
    far = (rng.normal(size=(1000, 32)) / np.sqrt(32)).astype(np.float32)  # many similar scores
    cases = {"near ties": (tied, codebook), "far from all codes": (far, codebook),
             "demo model, real photos": held_out_latents}
    fast_pass_misses = {}
    for name, (z, e) in cases.items():
        expected = reference_f64(z, e, kind)
        got = np.asarray(jax.jit(branch, static_argnames="kind")(z, e, kind=kind))
        assert got.dtype == np.int32
        assert np.array_equal(got, expected), (name, int((got != expected).sum()))
        fast = np.asarray(quantizers.nearest_codes_rescored(z, e, kind, candidates=1))
        fast_pass_misses[name] = float((fast != expected).mean())
    # The cases are sharp: a bfloat16 matmul alone picks the wrong code for many of them.
    assert fast_pass_misses["near ties"] > 0.2, fast_pass_misses
    if kind == "l2":
        assert fast_pass_misses["demo model, real photos"] > 0.005, fast_pass_misses


@pytest.mark.parametrize("kind", quantizers.KINDS)
@pytest.mark.parametrize("branch", BRANCHES)
def test_ties_go_to_the_lowest_index(branch, kind):
    rng = np.random.default_rng(3)
    codebook = _unit(rng.normal(size=(40, 8))).astype(np.float32)
    codebook[[9, 30]] = codebook[5]  # duplicated codes
    z = 2 * codebook[[5, 5, 7]] + np.float32(1e-3)
    assert np.asarray(branch(z, codebook, kind)).tolist() == [5, 5, 7]


def test_the_kinds_differ_where_they_should():
    # Cosine ignores norms, dot rewards them, l2 penalises them.
    codebook = np.array([[1.0, 0.0], [0.0, 5.0], [0.0, 0.5]], np.float32)
    z = np.array([[0.9, 0.6]], np.float32)
    picked = {kind: int(nearest_codes(jnp.asarray(z), jnp.asarray(codebook), kind)[0])
              for kind in quantizers.KINDS}
    assert picked == {"l2": 0, "cosine": 0, "dot": 1}
    z = np.array([[0.1, 0.6]], np.float32)
    picked = {kind: int(nearest_codes(jnp.asarray(z), jnp.asarray(codebook), kind)[0])
              for kind in quantizers.KINDS}
    assert picked == {"l2": 2, "cosine": 1, "dot": 1}
    with pytest.raises(ValueError, match="unknown quantizer kind 'hamming'"):
        nearest_codes(jnp.asarray(z), jnp.asarray(codebook), "hamming")
    assert modeling.nearest_codes is nearest_codes  # still importable from modeling


@pytest.mark.parametrize("kind", quantizers.KINDS)
def test_vector_quantizer_returns_the_codes_its_decoder_reads(kind):
    rng = np.random.default_rng(4)
    table = rng.normal(size=(16, 4)).astype(np.float32) * rng.uniform(0.5, 2, (16, 1)).astype(np.float32)
    params = {"embedding": {"embedding": table}}
    z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    module = VectorQuantizer(16, 4, kind)
    quantized, indices = module.apply({"params": params}, z)
    assert indices.shape == (2, 9) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(indices).ravel(),
                                  reference_f64(z.reshape(-1, 4), table, kind))
    codes = table / np.linalg.norm(table, axis=1, keepdims=True) if kind == "cosine" else table
    np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 4),
                               codes[np.asarray(indices).ravel()], rtol=1e-6)
    looked_up = np.asarray(module.apply({"params": params}, indices, method="lookup"))
    np.testing.assert_array_equal(looked_up, np.asarray(quantized).reshape(2, 9, 4))
    bad = np.asarray(module.apply({"params": params}, jnp.array([[16, -1]]), method="lookup"))
    assert np.isnan(bad).all()  # out-of-range ids are NaN, never another code
