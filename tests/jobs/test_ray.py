"""ray.py: shard conversion on a Ray actor pool, exactly once under a killed actor; RayTokenizer.

One local Ray instance for the module (2 CPUs, a 100 MB object store); actors load the tiny
checkpoint from its directory, as workers on a cluster would.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import runpy

import numpy as np
import pytest
from PIL import Image
from test_wds import (
    BATCH,
    check_outputs,
    image_of,
    read_tar,
    snapshot,
)

from vqgan_datasets import wds as vqwds
from vqgan_datasets.jobs import shards as vqshards
from vqgan_datasets.models.modeling import VQModel

ray = pytest.importorskip("ray")
vqray = importlib.import_module("vqgan_datasets.ray")

pytestmark = [
    # ray.init starts its daemons with fork+exec from this process, where JAX already runs
    # threads; JAX warns about any fork. The exec makes it safe.
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                                            "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def contents(path) -> list[dict]:
    """A tar's samples, every field's bytes, without the reader's own __url__."""
    return [{k: v for k, v in s.items() if k != "__url__"} for s in read_tar(path)]


def stats_without_timings(path) -> dict:
    stats = json.loads(path.read_text())
    return {k: v for k, v in stats.items() if k not in ("seconds", "images_per_second")}


# ------------------------------------------------------------------------------ tokenize


def test_tokenize_on_actors_matches_tokenize_shards_and_a_rerun_writes_nothing(
        model, shards, samples, reference, tiny_model_dir, tmp_path):
    root, urls = shards
    local = vqshards.tokenize_shards(urls, tmp_path / "local", model=model, batch_size=BATCH,
                                     progress=False)
    manifest = vqray.tokenize(urls, tmp_path / "ray", model=str(tiny_model_dir),
                              batch_size=BATCH, num_actors=2)
    assert [s.status for s in manifest.shards] == ["written"] * 3
    assert manifest.totals == local.totals
    assert manifest.path == str(tmp_path / "ray" / "manifest.json")
    assert sorted(os.listdir(tmp_path / "ray")) == sorted(os.listdir(tmp_path / "local"))
    for i in range(3):
        name = f"shard-{i:05d}"
        # Same samples, fields and .npy bytes (tar headers carry write times, so not the tars).
        assert contents(tmp_path / "ray" / f"{name}.tar") == contents(
            tmp_path / "local" / f"{name}.tar")
        ray_stats = stats_without_timings(tmp_path / "ray" / f"{name}.stats.json")
        local_stats = stats_without_timings(tmp_path / "local" / f"{name}.stats.json")
        assert ray_stats["vqgan_datasets"]["weights_digest"] == model.weights_digest
        for stats in (ray_stats, local_stats):
            stats["vqgan_datasets"].pop("model_name")  # the path as each caller spelled it
            stats.pop("output")
        assert ray_stats == local_stats
    check_outputs([tmp_path / "ray" / f"shard-{i:05d}.tar" for i in range(3)], samples,
                  reference)

    before = snapshot(tmp_path / "ray")
    again = vqray.tokenize(urls, tmp_path / "ray", model=model, batch_size=BATCH)
    assert [s.status for s in again.shards] == ["finished"] * 3
    assert snapshot(tmp_path / "ray") == before  # no shard, no stats file touched
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                          "ray_tokenize.py"), run_name="example")["main"]
    assert example(["shards", "--model", str(tiny_model_dir), "--input", "::".join(urls),
                    "--output", str(tmp_path / "ray"), "--batch-size", str(BATCH)]) == 0
    assert snapshot(tmp_path / "ray") == before

    # A model with nothing to load it from cannot go to workers; other settings never mix.
    with pytest.raises(ValueError, match="save_pretrained"):
        vqray.tokenize(urls, tmp_path / "x", model=VQModel(model.config, model.params))
    with pytest.raises(ValueError, match="other settings"):
        vqray.tokenize(urls, tmp_path / "ray", model=model, keep_image=True)


def exit_once_after(count: int, path: str):
    """A callback that makes the first worker to write its `count`-th sample of a shard create
    `path` and exit at once, as a killed actor would; the file makes it happen once, not again
    in the actor Ray restarts. A closure, so that Ray pickles it by value."""

    def hook(url: str, written: int) -> None:
        if written >= count:
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)

    return hook


def test_an_actor_killed_mid_shard_is_retried_and_every_sample_is_written_once(
        shards, samples, reference, tiny_model_dir, tmp_path, caplog):
    root, urls = shards
    caplog.set_level("INFO", logger="vqgan_datasets")
    marker = tmp_path / "an-actor-died"
    out = tmp_path / "out"
    # The first worker to write its 2nd sample of a shard dies there (os._exit), leaving a
    # temporary tar; Ray restarts the actor and retries the task.
    manifest = vqray.tokenize(urls, out, model=str(tiny_model_dir), batch_size=BATCH,
                              num_actors=2, on_sample_written=exit_once_after(2, str(marker)))
    assert marker.exists()  # an actor did die mid-shard
    assert [s.status for s in manifest.shards] == ["written"] * 3
    # The dead attempt's temporary tar was left behind, then swept after the run.
    assert ".tar.tmp-" in caplog.text and "left by an interrupted attempt" in caplog.text
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    check_outputs([out / f"shard-{i:05d}.tar" for i in range(3)], samples, reference)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["totals"]["encoded"] == 10 and on_disk["shards_failed"] == 0


# ------------------------------------------------------------------------------ RayTokenizer


def test_ray_tokenizer_in_process_inputs_and_policies(model, samples, reference):
    keys = [s["__key__"] for s in samples[:4]]
    raw = [image_of(s) for s in samples[:4]]
    want = np.stack([reference[k] for k in keys])
    tok = vqray.RayTokenizer(model, image_column="jpg", batch_size=BATCH, on_error="null")

    bad = np.empty(5, dtype=object)
    bad[:] = raw[:2] + [b"not an image"] + raw[2:]
    batch = {"__key__": np.array(keys[:2] + ["broken"] + keys[2:]), "jpg": bad,
             "txt": np.array(["a", "b", "c", "d", "e"])}
    out = tok(batch)
    assert sorted(out) == ["__key__", "txt", "vqgan_tokens", "vqgan_tokens_error"]
    assert out["vqgan_tokens"].dtype == np.uint16 and out["vqgan_tokens"].shape == (5, 256)
    np.testing.assert_array_equal(np.delete(out["vqgan_tokens"], 2, axis=0), want)
    assert not out["vqgan_tokens"][2].any() and out["vqgan_tokens_error"][2]
    assert [e is None for e in out["vqgan_tokens_error"]] == [True, True, False, True, True]

    skip = vqray.RayTokenizer(model, image_column="jpg", on_error="skip", keep_image=True,
                              batch_size=BATCH)(batch)
    assert list(skip["__key__"]) == keys and list(skip["txt"]) == ["a", "b", "d", "e"]
    assert len(skip["jpg"]) == 4 and "vqgan_tokens_error" not in skip
    np.testing.assert_array_equal(skip["vqgan_tokens"], want)
    with pytest.raises(vqwds.SampleError, match="'broken'"):
        vqray.RayTokenizer(model, image_column="jpg", on_error="raise")(batch)

    # Arrays (stacked or one per row), Hugging Face structs, pandas batches.
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(r)).convert("RGB").resize((64, 64)))
                       for r in raw])
    direct = model.encode_images(pixels)
    np.testing.assert_array_equal(tok({"jpg": pixels})["vqgan_tokens"], direct)
    structs = [{"bytes": r, "path": None} for r in raw]
    np.testing.assert_array_equal(tok({"jpg": structs})["vqgan_tokens"], want)
    import pandas as pd

    frame = pd.DataFrame({"jpg": raw, "n": range(4)})
    out = tok(frame)
    np.testing.assert_array_equal(out["vqgan_tokens"], want)
    assert list(out["n"]) == [0, 1, 2, 3]

    with pytest.raises(KeyError, match="no column 'image'"):
        vqray.RayTokenizer(model)({"jpg": bad})
    with pytest.raises(ValueError, match="on_error"):
        vqray.RayTokenizer(model, on_error="ignore")


def test_ray_tokenizer_in_map_batches_over_ray_datasets(samples, reference, tiny_model_dir,
                                                        tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    keys = [s["__key__"] for s in samples[:4]]
    for key, sample in zip(keys, samples[:4], strict=True):
        (folder / f"{key}.{'jpg' if 'jpg' in sample else 'png'}").write_bytes(image_of(sample))
    common = dict(fn_constructor_kwargs={"model": str(tiny_model_dir), "batch_size": BATCH,
                                         "on_error": "null"},
                  batch_size=3, batch_format="numpy",
                  compute=ray.data.ActorPoolStrategy(size=1), num_gpus=0)

    # Encoded bytes in any column, with a bad row kept as a null.
    rows = [{"key": k, "jpg": image_of(s)} for k, s in zip(keys, samples, strict=False)]
    rows.append({"key": "broken", "jpg": b"not an image"})
    items = ray.data.from_items(rows, override_num_blocks=2)
    fn = dict(common, fn_constructor_kwargs={**common["fn_constructor_kwargs"],
                                             "image_column": "jpg"})
    out = {r["key"]: r for r in items.map_batches(vqray.RayTokenizer, **fn).take_all()}
    for key in keys:
        np.testing.assert_array_equal(out[key]["vqgan_tokens"], reference[key])
        assert out[key]["vqgan_tokens_error"] is None
    assert out["broken"]["vqgan_tokens_error"] and "jpg" not in out["broken"]

    # read_binary_files' "bytes", through the example script, to Parquet and back.
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                          "ray_tokenize.py"), run_name="example")["main"]
    parquet = tmp_path / "parquet"
    assert example(["images", "--model", str(tiny_model_dir), "--input", str(folder),
                    "--output", str(parquet), "--actors", "1", "--batch-size", str(BATCH)]) == 0
    rows = ray.data.read_parquet(str(parquet)).take_all()
    out = {os.path.basename(r["path"]).split(".")[0]: r["vqgan_tokens"] for r in rows}
    assert sorted(out) == keys and all(r["vqgan_tokens_error"] is None for r in rows)
    for key in keys:
        np.testing.assert_array_equal(out[key], reference[key])

    # read_images' decoded arrays.
    images = ray.data.read_images(str(folder), include_paths=True)
    out = {os.path.basename(r["path"]).split(".")[0]: r["vqgan_tokens"]
           for r in images.map_batches(vqray.RayTokenizer, **common).take_all()}
    for key in keys:
        np.testing.assert_array_equal(out[key], reference[key])


def test_without_ray_the_import_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    modules = __import__("sys").modules
    monkeypatch.delitem(modules, "vqgan_datasets.ray")
    monkeypatch.delitem(modules, "vqgan_datasets.jobs.ray")  # the shim's module, imported again
    with pytest.raises(ImportError, match=r'pip install "vqgan-datasets\[ray\]"'):
        importlib.import_module("vqgan_datasets.ray")
