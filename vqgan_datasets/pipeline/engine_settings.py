"""The engine's settings, checked once, every None resolved for this host and backend.

Per-device batch size by backend and device memory (`default_batch_size`), the few padded
global batch sizes a run compiles (`bucket_sizes`), the devices, and the preprocessing side
(workers, threads, time per sample: `workers.host_settings`). `get_engine` keys its cache on
the resolved values, so a default given explicitly finds the same engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from .workers import host_settings

__all__ = ["bucket_sizes", "check_int", "default_batch_size", "image_bytes",
           "memory_available", "resolve_settings", "rows_that_fit"]

_CPU_BATCH = 8
_ACCELERATOR_BATCH = 128
# XLA's compiled memory analysis of the f16 encoder (ch 128) at 256²: 97 MiB per image in
# float32 beyond the weights (BENCHMARKS.md). Batches take at most half a device's memory.
_BYTES_PER_IMAGE = 97 * 2**20


# Attention's [tokens, tokens] float32 scores, per image: scores, exponentials, softmax and one
# more copy live at once. The tests' tiny model (attention at 1/4 scale) encoding 4 images of
# 512 px on CPU peaked at 14.6 GiB resident (1.2 GiB at 256 px) for 4 x 1 GiB score matrices:
# 3.4 copies each.
_ATTENTION_COPIES = 4


def image_bytes(config, height: int, width: int, *, decode: bool = False) -> int:
    """Memory one image of height x width pixels takes on a device, estimated from above: the
    convolutions' activations (scaled from `_BYTES_PER_IMAGE` by pixels and width `ch`; twice
    that to decode) plus the score matrices of the finest level with attention (the lowest
    level's middle block has it in taming's architecture)."""
    convs = _BYTES_PER_IMAGE * (height * width / 256**2) * (config.ch / 128) * (1 + decode)
    levels = [i for i in range(config.num_resolutions)
              if config.resolution // 2**i in config.attn_resolutions]
    finest = min([*levels, config.num_resolutions - 1])
    tokens = (height // 2**finest) * (width // 2**finest)
    return int(convs + _ATTENTION_COPIES * 4 * tokens**2)


def memory_available(device: jax.Device) -> int | None:
    """Bytes free for batches on `device`: an accelerator's limit less what it holds (the
    parameters included); on CPU the host's available memory. None where unknown."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend reports memory
        return None
    limit = stats.get("bytes_limit")
    return None if limit is None else int(limit) - int(stats.get("bytes_in_use", 0))


def rows_that_fit(config, height: int, width: int, buckets: Sequence[int],
                  devices: Sequence[jax.Device], *, decode: bool = False) -> int:
    """The largest bucket (global rows per device call) whose images fit the devices' free
    memory; a size of which not even one image per device fits raises a ValueError naming it."""
    per_image = image_bytes(config, height, width, decode=decode)
    free = memory_available(devices[0])
    if free is None:
        return buckets[-1]
    platform = devices[0].platform
    per_device = free // (per_image * (len(devices) if platform == "cpu" else 1))  # CPUs share
    if per_device < 1:
        where = "of host memory available" if platform == "cpu" else f"free on {platform}"
        if platform == "cpu" and len(devices) > 1:
            where += f" to {len(devices)} CPU devices, one image each"
        raise ValueError(
            f"images of {height}x{width} pixels need about {per_image / 2**30:,.1f} GiB each to "
            f"{'decode' if decode else 'encode'} with this model (ch={config.ch}), more than the "
            f"{free / 2**30:,.1f} GiB {where}: use a smaller image size"
        )
    fitting = [b for b in buckets if b // len(devices) <= per_device]
    return fitting[-1] if fitting else buckets[0]


def bucket_sizes(per_device: int, num_devices: int) -> tuple[int, ...]:
    """Global batch sizes num_devices * {1, 2, 4, ..., per_device}: ceil(log2(b)) + 1 shapes.

    Doubling keeps padding under half a batch while bounding compilations; every bucket is a
    multiple of the device count so the leading axis always splits evenly over the mesh.
    """
    sizes, rows = [], 1
    while rows < per_device:
        sizes.append(rows * num_devices)
        rows *= 2
    sizes.append(per_device * num_devices)
    return tuple(sizes)


def default_batch_size(devices: Sequence[jax.Device], config) -> int:
    """Per-device batch for these devices: 8 on CPU (larger batches buy nothing there and delay
    the first result); 128 on GPUs and TPUs (measured best on an H200; batch 8 cost 30%), less
    when half the device's memory cannot hold that many images of this model."""
    if devices[0].platform == "cpu":
        return _CPU_BATCH
    try:
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # not every backend reports memory
        limit = None
    per_image = _BYTES_PER_IMAGE * max((config.resolution / 256) ** 2 * config.ch / 128, 1e-3)
    fits = min(_ACCELERATOR_BATCH, int(limit / 2 / per_image)) if limit else _ACCELERATOR_BATCH
    batch = 1  # a power of two: the buckets stay few; at least 1 even when none fits
    while batch * 2 <= fits:
        batch *= 2
    return batch


def check_int(name: str, value, *, minimum: int) -> None:
    """Raise unless `value` is an int (not a bool) of at least `minimum`, naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def resolve_settings(config, *, batch_size, devices, num_threads, prefetch, workers,
                     sample_timeout_s) -> dict:
    """Engine arguments checked, with every None default resolved to its value."""
    check_int("prefetch", prefetch, minimum=0)
    devices = tuple(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass None to use every local device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device twice: {devices}")
    batch_size = default_batch_size(devices, config) if batch_size is None else batch_size
    check_int("batch_size", batch_size, minimum=1)
    return {"batch_size": int(batch_size), "devices": devices, "prefetch": int(prefetch),
            **host_settings(workers, num_threads, sample_timeout_s)}
