"""CPU throughput of the tokenizing path, stage by stage, and how well the stages overlap.

Corpus: JPEGs (q=90, held in memory as bytes) cut from scikit-image's photos, each side drawn
from 400-1100 px. It measures, in images/s (median of interleaved runs):

- preprocessing per core, exact and fast (`load_image` in a loop, one thread);
- preprocessing scaling: the worker pool with 1 and 2 processes, and with 1 and 2 threads;
- the engine alone on pre-decoded uint8 arrays (a small random f16 VQGAN at image_size²);
- the whole path, bytes → tokens through `Engine.encode_iter`, with worker processes and with
  threads, and whole / min(preprocessing, engine): 1.0 means the slower stage alone sets the
  pace. On a CPU both stages share the cores, so 1 / (1/preprocess + 1/engine), the bound
  with no overlap at all, is printed too;
- how pixels travel back from a worker (`--transport`): pickled through its socket, or written
  into shared memory (the memfd arena the pool uses), parent CPU per 256×256×3 sample.

    python benchmarks/cpu_pipeline.py [--files 96] [--repeats 3] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs (q=90), each side 400-1100 px: photos resized to cover, cropped."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(data, name)()[..., :3]) for name in PHOTOS]
    out = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(400, 1101, 2))
        base = bases[i % len(bases)]
        scale = max(width / base.width, height / base.height) * 1.1
        base = base.resize((round(base.width * scale), round(base.height * scale)),
                           Image.Resampling.BICUBIC)
        left = int(rng.integers(0, base.width - width + 1))
        top = int(rng.integers(0, base.height - height + 1))
        buffer = io.BytesIO()
        base.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def measure(stages: dict, count: int, repeats: int) -> dict[str, dict]:
    """Median images/s of each stage over `repeats` runs, after one warm-up run each.

    Runs are interleaved (A B A B ...) so that load from other processes on a shared machine
    falls on every stage alike rather than on whichever ran during a burst.
    """
    for fn in stages.values():
        fn()  # compiles, worker start-up, allocator warm-up
    rates: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            start = time.perf_counter()
            fn()
            rates[name].append(count / (time.perf_counter() - start))
    out = {}
    for name, runs in rates.items():
        out[name] = {"images_per_s": statistics.median(runs), "runs": runs}
        print(f"  {name:<52} {out[name]['images_per_s']:9.1f} images/s", file=sys.stderr)
    return out


_CHILD = r"""
import mmap, os, pickle, sys
import numpy as np
from multiprocessing.connection import Connection
conn, arena = Connection(int(sys.argv[1])), mmap.mmap(int(sys.argv[2]), 256 * 256 * 3)
pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
while True:
    try:
        mode = conn.recv_bytes()
    except EOFError:
        break
    if mode == b"pickle":
        conn.send_bytes(pickle.dumps((0, -1, pixels, None), protocol=5))
    else:
        np.ndarray(pixels.shape, np.uint8, buffer=arena)[...] = pixels
        conn.send_bytes(pickle.dumps((0, 0, None, None), protocol=5))
"""


def transport(samples: int = 2000) -> dict[str, float]:
    """Parent CPU µs per 256×256×3 sample: pickled through a socket vs a shared-memory slot."""
    import pickle
    import socket
    from multiprocessing.connection import Connection

    parent, child = socket.socketpair()
    arena_fd = os.memfd_create("bench")
    os.ftruncate(arena_fd, 256 * 256 * 3)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(child.fileno()), str(arena_fd)],
                            pass_fds=[child.fileno(), arena_fd])
    child.close()
    import mmap

    arena = mmap.mmap(arena_fd, 256 * 256 * 3)
    os.close(arena_fd)
    conn = Connection(parent.detach())
    out = np.empty((8, 256, 256, 3), np.uint8)
    result = {}
    for mode in (b"pickle", b"shared", b"pickle", b"shared"):
        cpu = time.process_time()
        for i in range(samples):
            conn.send_bytes(mode)
            _, slot, pixels, _ = pickle.loads(conn.recv_bytes())
            out[i % 8] = pixels if slot < 0 else np.ndarray((256, 256, 3), np.uint8, buffer=arena)
        result[mode.decode()] = (time.process_time() - cpu) / samples * 1e6  # the second run
    conn.close()
    proc.wait()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--transport", action="store_true", help="also measure pixel transport")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    import jax

    from vqgan_datasets.models.config import VQGANConfig
    from vqgan_datasets.pipeline.engine import Engine
    from vqgan_datasets.pipeline.images import load_image
    from vqgan_datasets.pipeline.workers import WorkerPool

    files = make_jpegs(args.files)
    n, size, repeats, workers = len(files), args.image_size, args.repeats, args.workers
    print(f"{n} JPEGs, sides 400-1100 px, q=90, mean {np.mean([len(f) for f in files]) / 1e3:.0f}"
          f" KB → {size}², {repeats} repeats", file=sys.stderr)

    def serial(mode):
        return lambda: [load_image(f, size, preprocess=mode) for f in files]

    pools = {f"{k} process(es)": WorkerPool(k, threads=1, sample_timeout_s=None)
             for k in sorted({1, workers})}
    pools.update({f"{k} thread(s)": WorkerPool(0, threads=k, sample_timeout_s=None)
                  for k in sorted({1, workers})})
    stages = {f"preprocess {mode}, per core (one thread, in-process)": serial(mode)
              for mode in ("exact", "fast")}
    for label, pool in pools.items():
        for mode in ("exact", "fast"):
            stages[f"preprocess {mode}, pool of {label}"] = (
                lambda pool=pool, mode=mode: pool.submit(files, list(range(n)), image_size=size,
                                                         preprocess=mode).result())
    rows = measure(stages, n, repeats)
    for pool in pools.values():
        pool.close()

    config = VQGANConfig(
        ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
        resolution=size, z_channels=32, embed_dim=16, n_embed=1024,
    )
    from vqgan_datasets.models.modeling import VQModel

    model = VQModel(config, seed=0)
    pixels = np.stack([load_image(f, size) for f in files])
    engines = {
        "processes": Engine(model, batch_size=args.batch_size, workers=workers),
        "threads": Engine(model, batch_size=args.batch_size, workers=0, num_threads=workers),
    }
    engine_name = "engine alone (pre-decoded uint8)"
    whole = {}
    stages = {engine_name: lambda: engines["processes"].encode(pixels)}
    for kind, engine in engines.items():
        for mode in ("exact", "fast"):
            name = whole[kind, mode] = f"whole path {mode}, {workers} {kind} (encode_iter)"
            stages[name] = (lambda engine=engine, mode=mode: sum(
                1 for _ in engine.encode_iter(files, image_size=size, preprocess=mode)))
    rows.update(measure(stages, n, repeats))
    devices = f"{engines['processes'].num_devices} x {engines['processes'].devices[0].device_kind}"
    for engine in engines.values():
        engine.close()

    engine_rate = rows[engine_name]["images_per_s"]
    overlap = {}
    for (kind, mode), name in whole.items():
        pool_label = f"{workers} process(es)" if kind == "processes" else f"{workers} thread(s)"
        pre = rows[f"preprocess {mode}, pool of {pool_label}"]["images_per_s"]
        rate = rows[name]["images_per_s"]
        overlap[name] = {
            "whole_over_min": rate / min(pre, engine_rate),
            "harmonic_bound": 1.0 / (1.0 / pre + 1.0 / engine_rate),
        }
    per_core = {mode: rows[f"preprocess {mode}, per core (one thread, in-process)"]["images_per_s"]
                for mode in ("exact", "fast")}
    result = {
        "files": n, "image_size": size, "repeats": repeats, "workers": workers,
        "batch_size_per_device": args.batch_size, "cpu_count": os.cpu_count(),
        "devices": devices, "jax": jax.__version__, "python": platform.python_version(),
        "model": {"ch": config.ch, "ch_mult": list(config.ch_mult),
                  "tokens": list(config.grid_shape(size))},
        "rates": rows, "fast_over_exact_per_core": per_core["fast"] / per_core["exact"],
        "overlap": overlap,
    }
    if args.transport:
        result["transport_parent_cpu_us"] = transport()

    print(f"\n{'stage':<60}{'images/s':>10}")
    for name, row in rows.items():
        print(f"{name:<60}{row['images_per_s']:>10.1f}")
    print(f"{'fast / exact per core':<60}{result['fast_over_exact_per_core']:>10.2f}")
    for name, row in overlap.items():
        print(f"{name[len('whole path '):] + ': whole / min(stages)':<60}"
              f"{row['whole_over_min']:>10.2f}   (no-overlap bound "
              f"{row['harmonic_bound']:.1f} images/s)")
    if args.transport:
        t = result["transport_parent_cpu_us"]
        print(f"pixels back, parent CPU per 256x256x3 sample: pickled {t['pickle']:.0f} µs, "
              f"shared memory {t['shared']:.0f} µs")
    print(f"({devices}, {os.cpu_count()} CPUs, jax {jax.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
