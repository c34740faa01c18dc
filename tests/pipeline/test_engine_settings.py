"""The engine's settings: bucket sizes, the per-device batch by backend and memory, and the
argument checks, without building an engine (fake devices stand in for GPUs and TPUs)."""

from __future__ import annotations

import jax
import pytest

from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.pipeline import engine_settings
from vqgan_datasets.pipeline.workers import default_workers

F16 = VQGANConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                  resolution=256, z_channels=256, embed_dim=256, n_embed=16384)


class _FakeDevice:
    def __init__(self, platform: str, memory: int | None):
        self.platform, self._memory = platform, memory

    def memory_stats(self):
        return None if self._memory is None else {"bytes_limit": self._memory}


def test_buckets():
    assert engine_settings.bucket_sizes(1, 8) == (8,)
    assert engine_settings.bucket_sizes(3, 8) == (8, 16, 24)
    assert engine_settings.bucket_sizes(64, 1) == (1, 2, 4, 8, 16, 32, 64)
    assert engine_settings.bucket_sizes(5, 2) == (2, 4, 8, 10)


def test_default_batch_size_by_backend_and_memory():
    default = engine_settings.default_batch_size
    assert default([_FakeDevice("cpu", None)], F16) == 8
    assert default([_FakeDevice("gpu", 141 * 2**30)], F16) == 128  # H200
    assert default([_FakeDevice("gpu", 16 * 2**30)], F16) == 64
    assert default([_FakeDevice("gpu", 4 * 2**30)], F16) == 16
    assert default([_FakeDevice("tpu", None)], F16) == 128  # memory unknown


def test_resolve_settings_fills_defaults_and_checks():
    defaults = {"batch_size": None, "devices": None, "num_threads": None, "prefetch": 2,
                "workers": None, "sample_timeout_s": 60}
    resolved = engine_settings.resolve_settings(F16, **defaults)
    assert resolved["devices"] == tuple(jax.local_devices())
    assert resolved["batch_size"] == 8 and resolved["workers"] == default_workers()
    assert resolved["sample_timeout_s"] == 60.0 and resolved["prefetch"] == 2
    for change, error, match in (
        ({"prefetch": -1}, ValueError, "prefetch must be >= 0"),
        ({"batch_size": True}, TypeError, "batch_size must be an int, got bool"),
        ({"devices": [jax.local_devices()[0]] * 2}, ValueError, "devices lists a device twice"),
    ):
        with pytest.raises(error, match=match):
            engine_settings.resolve_settings(F16, **{**defaults, **change})


def test_default_batch_size_never_exceeds_what_memory_holds():
    # Half of 1 GiB holds 5 f16 images at 256²: the default must not start at 8 regardless.
    default = engine_settings.default_batch_size
    assert default([_FakeDevice("gpu", 2**30)], F16) == 4
    assert default([_FakeDevice("gpu", 2**28)], F16) == 1  # not even one fits: the least


def test_image_memory_estimate_grows_with_pixels_and_attention():
    per = engine_settings.image_bytes
    base = per(F16, 256, 256)
    assert base == 98 * 2**20  # the measured f16 figure (97 MiB), plus 1 MiB of 16x16 attention
    assert per(F16, 256, 256, decode=True) > 2 * 97 * 2**20
    # 4096 px: 256x256 tokens at the attention level, 16 GiB per score matrix.
    assert per(F16, 4096, 4096) > 64 * 2**30
    assert per(F16, 512, 512) > 4 * 97 * 2**20


def test_a_size_that_cannot_fit_is_refused_naming_it_and_batches_shrink_to_fit():
    fits = engine_settings.rows_that_fit
    h100 = [_FakeDevice("gpu", 80 * 2**30)]
    buckets = engine_settings.bucket_sizes(128, 1)
    assert fits(F16, 256, 256, buckets, h100) == 128
    assert fits(F16, 1024, 1024, buckets, h100) == 32  # ~1.8 GiB each: 45 fit
    for side in (4096, 100_000):
        with pytest.raises(ValueError, match=f"images of {side}x{side} pixels need about "
                                             r"[\d,.]+ GiB each to encode .* more than the "
                                             r"80\.0 GiB free on gpu"):
            fits(F16, side, side, buckets, h100)
    assert fits(F16, 4096, 4096, buckets, [_FakeDevice("tpu", None)]) == 128  # memory unknown


def test_cpu_memory_is_the_hosts_available_memory():
    free = engine_settings.memory_available(jax.devices("cpu")[0])
    assert free is not None and free > 0
