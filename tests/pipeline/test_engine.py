"""The device loop: same tokens on 1 or 8 devices and any batch size, bounded compiles and
read-ahead, error policies, decode validation. Eight CPU devices are forced in one subprocess
(XLA reads the flag once, before JAX starts); everything else runs on this process's device."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.pipeline import engine as engine_lib
from vqgan_datasets.pipeline import engine_settings
from vqgan_datasets.pipeline.engine import Engine, get_engine
from vqgan_datasets.pipeline.images import ImageDecodeError
from vqgan_datasets.pipeline.workers import default_workers

REPO = Path(__file__).resolve().parents[2]

# f2: 8×8 images give 4×4 tokens, which keeps every compile and run here well under a second.
CONFIG = VQGANConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
    z_channels=32, embed_dim=16, n_embed=64,
)
SIZE = 8
TOKENS = (SIZE // CONFIG.downsample_factor) ** 2


@pytest.fixture(scope="module")
def model() -> VQModel:
    return VQModel(CONFIG, seed=0)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    # Through get_engine, so that the module-level conveniences below hit the same compiled fns.
    return get_engine(model, batch_size=4, num_threads=2)


def _images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- eight devices, in one subprocess ---------------------------------------------------------

MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import traverse_util
    from vqgan_datasets.models.config import VQGANConfig
    from vqgan_datasets.pipeline.engine import Engine
    from vqgan_datasets.models.modeling import VQModel

    config = VQGANConfig(**json.loads(sys.argv[1]))
    stored = np.load(sys.argv[2])
    params = traverse_util.unflatten_dict({k: stored[k] for k in stored.files}, sep="/")
    model = VQModel(config, params)
    devices = jax.devices()
    x = np.random.default_rng(1).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    reference = model.encode_images(x)  # the plain single-call path
    out = {"num_devices": len(devices), "mismatches": [], "counts_ok": True}

    def check(engine, n, label):
        tokens = engine.encode(x[:n])
        if tokens.shape != (n, 64) or tokens.dtype != np.int32:
            out["counts_ok"] = False
            out["mismatches"].append(f"{label} n={n}: shape {tokens.shape} {tokens.dtype}")
        elif not np.array_equal(tokens, reference[:n]):
            out["mismatches"].append(f"{label} n={n}: {int((tokens != reference[:n]).sum())}")

    # Each (engine, bucket) is one compile, the main cost here: per-device 64 runs only the
    # 64-image case (its small buckets are the same programs as per-device 8's).
    engines = {}
    for per_device in (1, 3, 8):
        engines[per_device] = Engine(model, batch_size=per_device, devices=devices)
        for n in (0, 1, 7, 8, 9, 17):
            check(engines[per_device], n, f"8 devices, batch {per_device}")
    check(Engine(model, batch_size=64, devices=devices), 64, "8 devices, batch 64")
    single = Engine(model, batch_size=1, devices=devices[:1])
    for n in (0, 1, 7, 8, 9, 17):
        check(single, n, "1 device, batch 1")
    check(Engine(model, batch_size=64, devices=devices[:1]), 64, "1 device, global 64 in one call")

    # Ragged sizes after warm-up: every bucket of this engine is compiled, so nothing retraces.
    ragged = engines[3]
    warm = ragged._encode_fn._cache_size()
    for n in range(1, 41):
        check(ragged, n, "ragged")
    out["buckets"] = list(ragged.buckets)
    out["cache_warm"] = warm
    out["cache_after_ragged"] = ragged._encode_fn._cache_size()

    streamed = list(ragged.encode_iter(list(x[:17]), image_size=16))
    out["stream_keys"] = [r.key for r in streamed]
    out["stream_equal"] = bool(np.array_equal(np.stack([r.tokens for r in streamed]),
                                              reference[:17]))

    decoded = engines[1].decode(reference[:9])
    out["decode_shape"] = list(decoded.shape)
    # Pixels, unlike tokens, may round one level apart between batch shapes: XLA's CPU convs
    # block the batch differently (seen at one pixel of 9 x 16 x 16 x 3 against batch 16).
    plain = model.decode_images(reference[:9]).astype(int)
    out["decode_max_diff"] = int(np.abs(decoded.astype(int) - plain).max())
    out["param_sharding_replicated"] = all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
        for leaf in jax.tree_util.tree_leaves(engines[1]._params))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def multi_device(model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("engine")
    params_file = folder / "params.npz"
    np.savez(params_file, **traverse_util.flatten_dict(model.params, sep="/"))
    script = folder / "multi_device.py"
    script.write_text(MULTI_DEVICE_SCRIPT)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(CONFIG.to_dict()), str(params_file)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_same_tokens_on_1_and_8_devices_for_every_batch_size(multi_device):
    assert multi_device["num_devices"] == 8
    assert multi_device["counts_ok"]
    assert multi_device["mismatches"] == []


def test_padding_causes_no_retrace_after_warm_up(multi_device):
    buckets = multi_device["buckets"]
    assert buckets == [8, 16, 24]
    assert multi_device["cache_warm"] <= len(buckets)
    assert multi_device["cache_after_ragged"] == multi_device["cache_warm"]


def test_stream_and_decode_on_8_devices(multi_device):
    assert multi_device["stream_keys"] == list(range(17))
    assert multi_device["stream_equal"]
    assert multi_device["decode_shape"] == [9, 16, 16, 3]
    assert multi_device["decode_max_diff"] <= 1
    assert multi_device["param_sharding_replicated"]


# -- one device ----------------------------------------------------------------------------


def test_encode_matches_plain_path_and_counts(engine, model):
    x = _images(9)
    assert np.array_equal(engine.encode(x), model.encode_images(x))
    for n in (0, 1, 4, 5):
        tokens = engine.encode(x[:n])
        assert tokens.shape == (n, TOKENS) and tokens.dtype == np.int32
    assert engine.num_devices == 1 and engine.buckets == (1, 2, 4)
    assert engine._encode_fn._cache_size() <= len(engine.buckets)


def test_encode_rejects_bad_arrays_with_what_it_expects(engine):
    with pytest.raises(ValueError, match=r"uint8 images \[N,H,W,3\].*float32.*uint8 0..255"):
        engine.encode(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of the downsample factor 2"):
        engine.encode(np.zeros((2, 9, 9, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        engine.encode(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image_size 9 is not a multiple"):
        engine.encode_iter([], image_size=9)
    with pytest.raises(ValueError, match="on_error"):
        engine.encode_iter([], on_error="ignore")


def test_engine_arguments_are_checked(model):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Engine(model, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        Engine(model, batch_size=2.0)
    with pytest.raises(ValueError, match="devices is empty"):
        Engine(model, devices=[])
    with pytest.raises(TypeError, match="unknown Engine arguments"):
        get_engine(model, image_size=8)


def test_on_error_policies(engine, caplog):
    good = list(_images(6))
    inputs = [good[0], good[1], b"not an image", good[2], good[3], good[4], b"", good[5]]
    keys = [f"k{i}" for i in range(len(inputs))]
    expected = engine.encode(np.stack(good))

    yielded = []
    with pytest.raises(ImageDecodeError, match="'k2'.*cannot identify image") as info:
        for result in engine.encode_iter(inputs, image_size=SIZE, keys=keys):
            yielded.append(result.key)
    assert info.value.key == "k2"
    assert yielded == ["k0", "k1"]  # everything before the bad sample came out first

    before = engine_lib.EngineStats(**vars(engine.stats))
    with caplog.at_level(logging.DEBUG, logger="vqgan_datasets.pipeline.engine"):
        skipped = list(engine.encode_iter(inputs, image_size=SIZE, keys=keys, on_error="skip"))
    assert [r.key for r in skipped] == ["k0", "k1", "k3", "k4", "k5", "k7"]
    assert np.array_equal(np.stack([r.tokens for r in skipped]), expected)
    assert engine.stats.skipped - before.skipped == 2
    assert engine.stats.encoded - before.encoded == 6
    assert engine.stats.samples_in - before.samples_in == 8
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping sample 'k6'" in m for m in messages)
    assert any("skipped 2 of 8 inputs" in m for m in messages)

    nulled = list(engine.encode_iter(inputs, image_size=SIZE, on_error="null"))
    assert [r.key for r in nulled] == list(range(8))
    assert [r.tokens is None for r in nulled] == [False, False, True, False, False, False, True,
                                                  False]
    assert nulled[2].error.startswith("cannot identify image file")
    assert nulled[6].error == "empty bytes"
    assert nulled[0].error is None
    assert np.array_equal(np.stack([r.tokens for r in nulled if r.tokens is not None]), expected)


def test_stream_reads_a_bounded_distance_ahead(engine):
    total = 2000
    pulled = 0
    tiles = _images(7)

    def source():
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield tiles[i % 7]

    yielded, furthest = 0, 0
    for result in engine.encode_iter(source(), image_size=SIZE):
        assert result.key == yielded
        yielded += 1
        furthest = max(furthest, pulled - yielded)
    assert yielded == total
    bound = (engine.prefetch + 2) * engine.global_batch_size
    assert engine.global_batch_size < furthest <= bound  # it does run ahead, and no further


def test_stream_keys_and_early_stop(engine):
    results = engine.encode_iter(iter(_images(20)), image_size=SIZE, keys=iter("abcdefghij" * 2))
    first = [next(results).key for _ in range(3)]
    results.close()  # the consumer stops early: queued work is cancelled, nothing hangs
    assert first == ["a", "b", "c"]
    with pytest.raises(ValueError, match="keys ran out after 2 keys"):
        list(engine.encode_iter(_images(3), image_size=SIZE, keys=["a", "b"]))


def test_decode_round_trip_and_validation(engine, model):
    codes = engine.encode(_images(4))
    images = engine.decode(codes)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, model.decode_images(codes))
    assert engine.decode(codes[:0]).shape == (0, SIZE, SIZE, 3)

    streamed = list(engine.decode_iter(iter(codes.astype(np.uint16)), keys="wxyz"))
    assert [r.key for r in streamed] == list("wxyz")
    assert np.array_equal(np.stack([r.image for r in streamed]), images)
    assert list(engine.decode_iter([])) == []

    bad = codes.copy()
    bad[1, 5] = CONFIG.n_embed
    with pytest.raises(ValueError, match=r"token id 64 at position \(1, 5\)"):
        engine.decode(bad)
    with pytest.raises(ValueError, match=r"key 'x'.*token id 64 at position \(5,\)"):
        list(engine.decode_iter(bad, keys="wxyz"))
    with pytest.raises(ValueError, match="not a square grid"):
        engine.decode(codes[:, :15])
    with pytest.raises(ValueError, match="integer token ids"):
        engine.decode(codes.astype(np.float32))
    with pytest.raises(ValueError, match=r"grid \(2, 4\) does not hold 16"):
        engine.decode(codes, grid=(2, 4))


def test_module_level_conveniences_reuse_the_cached_engine(engine, model):
    x = _images(5)
    results = list(engine_lib.encode_iter(x, model, batch_size=4, num_threads=2,
                                          image_size=SIZE))
    assert np.array_equal(np.stack([r.tokens for r in results]), engine.encode(x))
    decoded = list(engine_lib.decode_iter([r.tokens for r in results][:4], model, batch_size=4,
                                          num_threads=2))
    assert len(decoded) == 4 and decoded[0].image.shape == (SIZE, SIZE, 3)
    assert get_engine(model, batch_size=4, num_threads=2) is engine


def test_get_engine_caches_per_model_and_lets_models_go(model):
    gc.collect()  # earlier tests' dead models must not leave the cache during this test
    cached = len(engine_lib._ENGINES)
    other = VQModel(CONFIG, params=model.params)
    first = get_engine(other, batch_size=2)
    assert get_engine(other, batch_size=2) is first
    assert get_engine(other, batch_size=1) is not first
    assert get_engine(other, batch_size=2, prefetch=2, devices=None) is first  # defaults filled
    assert first.model is other
    other.params = dict(model.params)  # replaced weights: a fresh engine, not stale ones
    assert get_engine(other, batch_size=2) is not first
    assert len(engine_lib._ENGINES) == cached + 1

    alive = weakref.ref(other)
    gc.collect()
    before = len(engine_lib._ENGINES)
    del other
    gc.collect()
    assert alive() is None
    assert len(engine_lib._ENGINES) == before - 1
    with pytest.raises(ReferenceError):
        _ = first.model


def test_close_and_context_manager(model):
    with Engine(model, batch_size=1, num_threads=1, prefetch=0) as local:
        assert [r.key for r in local.encode_iter(_images(3), image_size=SIZE)] == [0, 1, 2]
        assert local._load_pool is not None
    assert local._load_pool is None


# -- defaults, preprocessing workers, time bound ----------------------------------------------


def test_engine_defaults_on_this_host(model):
    # The defaults themselves are tested in test_engine_settings.py.
    assert engine_lib.default_batch_size is engine_settings.default_batch_size  # still here
    local = Engine(model)
    assert local.batch_size == 8 and local.workers == default_workers()  # CPU here
    assert local.sample_timeout_s == 60.0


def test_get_engine_resolves_defaults_into_its_key(model):
    import jax

    first = get_engine(model)
    assert first.batch_size == 8
    same = get_engine(model, batch_size=8, devices=jax.local_devices(), workers=default_workers(),
                      sample_timeout_s=60, num_threads=min(8, os.cpu_count() or 1))
    assert same is first
    assert get_engine(model, workers=0) is not first
    with pytest.raises(ValueError, match="sample_timeout_s must be > 0"):
        get_engine(model, sample_timeout_s=0)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        Engine(model, workers=-1)


def test_threads_and_processes_give_the_same_tokens(engine, model):
    from PIL import Image

    inputs = [_images(1, 12, seed=3)[0], Image.fromarray(_images(1, 10, seed=4)[0]),
              b"junk", _images(1, seed=5)[0]]
    on_processes = list(engine.encode_iter(inputs, image_size=SIZE, on_error="null"))
    assert engine._load_pool.mode == "processes"
    with Engine(model, batch_size=4, workers=0, num_threads=2) as threaded:
        on_threads = list(threaded.encode_iter(inputs, image_size=SIZE, on_error="null"))
        assert threaded._load_pool.mode == "threads" and threaded._load_pool.pids == []
    for a, b in zip(on_processes, on_threads, strict=True):
        assert a.key == b.key and a.error == b.error
        assert (a.tokens is None and b.tokens is None) or np.array_equal(a.tokens, b.tokens)
    assert on_processes[2].error.startswith("cannot identify image file")


def test_preprocess_mode_and_deprecated_draft(engine, monkeypatch):
    x = list(_images(3))
    with pytest.raises(ValueError, match="preprocess must be one of"):
        engine.encode_iter(x, image_size=SIZE, preprocess="quick")
    monkeypatch.setattr(engine_lib, "_draft_warned", False)
    with pytest.warns(DeprecationWarning, match="draft=.*deprecated.*preprocess='fast'"):
        drafted = list(engine.encode_iter(x, image_size=SIZE, draft=True))
    assert np.array_equal(np.stack([r.tokens for r in drafted]), engine.encode(np.stack(x)))


def _worker_children(pids) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_a_slow_sample_fails_with_its_key_and_the_stream_goes_on(model):
    from test_workers import slow_jpeg

    inputs = [_images(1, seed=1)[0], slow_jpeg(), _images(1, seed=2)[0], _images(1, seed=3)[0]]
    keys = ["a", "slow", "c", "d"]
    with Engine(model, batch_size=2, workers=1, sample_timeout_s=1.0) as local:
        results = list(local.encode_iter(inputs, image_size=SIZE, keys=keys, on_error="null"))
        assert [r.key for r in results] == keys
        assert results[1].tokens is None
        assert results[1].error.startswith("took longer than 1 s to preprocess")
        good = np.stack([inputs[i] for i in (0, 2, 3)])
        assert np.array_equal(np.stack([results[i].tokens for i in (0, 2, 3)]), local.encode(good))
        with pytest.raises(ImageDecodeError, match="'slow'.*took longer than 1 s"):
            list(local.encode_iter(inputs, image_size=SIZE, keys=keys))


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_no_worker_processes_left_after_a_failure_mid_stream_and_close(model):
    import multiprocessing

    local = Engine(model, batch_size=2, workers=2)
    inputs = [*_images(5), b"broken", *_images(6)]
    stream = local.encode_iter(inputs, image_size=SIZE)
    with pytest.raises(ImageDecodeError, match="sample 5"):
        for _ in stream:
            pass
    pids = local._load_pool.pids
    assert len(pids) == 2
    early = local.encode_iter(iter(_images(40)), image_size=SIZE)
    next(early)
    early.close()  # generator close mid-stream: queued batches are cancelled
    local.close()
    assert local._load_pool is None
    assert _worker_children(pids) == [] and multiprocessing.active_children() == []


# -- review: defects reproduced first -----------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_replaced_weights_do_not_break_a_stream_still_reading_the_old_engine(model):
    # get_engine builds a new engine when model.params is replaced; an iterator already running
    # on the old one must finish (its own weights, its own workers), not die or drop samples.
    other = VQModel(CONFIG, params=model.params)
    first = get_engine(other, batch_size=1, prefetch=0, workers=1)
    x = _images(4)
    stream = first.encode_iter(x, image_size=SIZE, on_error="skip")
    head = next(stream)
    other.params = dict(model.params)
    assert get_engine(other, batch_size=1, prefetch=0, workers=1) is not first
    results = [head, *stream]
    assert [r.key for r in results] == [0, 1, 2, 3]
    assert np.array_equal(np.stack([r.tokens for r in results]), first.encode(x))
    pids = first._load_pool.pids
    assert _worker_children(pids) == pids  # still running
    del stream, first
    gc.collect()
    assert _worker_children(pids) == []  # the dropped engine stopped its workers


def test_a_closed_engine_lets_its_pool_go_each_time_it_is_reused(model):
    # close() then reuse starts a new pool each time: the closed ones must not pile up.
    with Engine(model, batch_size=2, workers=0, num_threads=1) as local:
        closed = []
        for _ in range(3):
            assert len(list(local.encode_iter(_images(2), image_size=SIZE))) == 2
            closed.append(weakref.ref(local._load_pool))
            local.close()
        gc.collect()
        assert [ref() for ref in closed] == [None, None, None]


def test_an_image_size_too_large_for_memory_is_refused_before_reading_anything(engine):
    read = []

    def inputs():
        read.append(1)
        yield _images(1)[0]

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"image_size 100000: images of 100000x100000 pixels "
                                         r"need about [\d,.]+ GiB each to encode"):
        engine.encode_iter(inputs(), image_size=100_000)
    assert not read and time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="need about [\\d,.]+ GiB each to decode"):
        engine.decode(np.zeros((1, 50_000**2 // 4), np.int32))  # 50,000 x 50,000 pixels


def test_batches_shrink_to_the_memory_free(model, monkeypatch, caplog):
    from vqgan_datasets.pipeline import engine_settings

    engine = Engine(model, batch_size=8, workers=0)
    reference = engine.encode(_images(8))
    codes = reference[:5]
    decoded = engine.decode(codes)
    # Room for 2 images per call: the same results, in calls of 2.
    free = 2 * engine_settings.image_bytes(CONFIG, SIZE, SIZE, decode=True) + 1
    monkeypatch.setattr(engine_settings, "memory_available", lambda device: free)
    before = engine.stats.batches
    assert np.array_equal(engine.encode(_images(8)), reference)
    assert engine.stats.batches - before == 4
    streamed = list(engine.encode_iter(list(_images(8)), image_size=SIZE))
    assert np.array_equal(np.stack([r.tokens for r in streamed]), reference)
    assert np.array_equal(engine.decode(codes), decoded)
    assert np.array_equal(np.stack([r.image for r in engine.decode_iter(list(codes))]), decoded)
    assert "per device call instead of 8" in caplog.text
