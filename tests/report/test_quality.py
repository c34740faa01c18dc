"""Quality metrics on known arrays: PSNR values and errors, codebook usage and perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vqgan_datasets.report.quality import codebook_usage, psnr


def test_psnr_known_values():
    a = np.full((3, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1 → 10·log10(255²) = 48.1308 dB
    b[1] -= 10  # MSE 100 → 28.1308 dB
    out = psnr(a, b)
    assert out.shape == (3,)
    np.testing.assert_allclose(out[:2], [48.1308036, 28.1308036], atol=1e-6)
    assert math.isinf(out[2]) and out[2] > 0  # identical: exact inf, not an error
    assert psnr(a[0], b[0]).shape == ()  # one image
    # Symmetric, and no uint8 wrap-around in the difference.
    np.testing.assert_array_equal(psnr(b, a), out)
    black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(psnr(black, white), [0.0], atol=1e-12)


def test_psnr_rejects_bad_inputs():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:1])


def test_codebook_usage_known_codes():
    k, size = 5, 64
    codes = np.tile(np.arange(k), 12).reshape(6, 10)  # uniform over 5 of 64 codes
    usage = codebook_usage(codes, size)
    assert usage.total == 60 and usage.used == k
    assert usage.used_fraction == pytest.approx(k / size)
    assert usage.perplexity == pytest.approx(k)
    assert usage.counts.shape == (size,) and usage.counts[:k].tolist() == [12] * k
    assert usage.counts[k:].sum() == 0

    skewed = codebook_usage(np.array([7, 7, 7, 3]), 8, top=3)
    assert skewed.top_codes == [(7, 3), (3, 1)]  # only codes that occur
    p = np.array([0.75, 0.25])
    assert skewed.perplexity == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert codebook_usage(np.zeros(10, np.uint16), 8).perplexity == pytest.approx(1.0)
    assert json.dumps(skewed.to_dict())


def test_codebook_usage_rejects_bad_codes():
    with pytest.raises(ValueError, match="outside"):
        codebook_usage(np.array([0, 8]), 8)
    with pytest.raises(ValueError, match="outside"):
        codebook_usage(np.array([-1, 2]), 8)
    with pytest.raises(ValueError, match="empty"):
        codebook_usage(np.array([], np.int32), 8)
    with pytest.raises(ValueError, match="integers"):
        codebook_usage(np.array([0.5]), 8)
