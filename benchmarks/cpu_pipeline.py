"""CPU throughput of the tokenizing path, stage by stage, and how well the stages overlap.

On ~200 JPEGs of 500×375 (scikit-image photos, q=90, held in memory as bytes) it measures, in
images/s: preprocessing to image_size² (full decode and draft mode, 1 and N threads), the engine
alone on pre-decoded uint8 arrays (a small random f16 VQGAN at 256², 16×16 tokens), and the
whole path (bytes → tokens through `Engine.encode_iter`). Overlap efficiency is
whole / min(preprocess, engine): 1.0 means the slower stage alone sets the pace. On a CPU both
stages share the same cores, so the harmonic bound 1 / (1/preprocess + 1/engine) (no overlap
at all, or perfect sharing of saturated cores) is printed too.

Draft mode engages only for JPEGs whose short side is at least twice image_size: at 256² the
375-pixel short side is decoded in full either way (draft rows measure the same work); pass
`--image-size 128` to see libjpeg's DCT scaling at work.

    python benchmarks/cpu_pipeline.py [--files 200] [--repeats 3] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")
WIDTH, HEIGHT = 500, 375


def make_jpegs(count: int) -> list[bytes]:
    """`count` distinct 500×375 JPEGs (q=90): photos covered-resized, shifted crops, flips."""
    from PIL import Image
    from skimage import data

    bases = []
    for name in PHOTOS:
        array = getattr(data, name)()[..., :3]
        image = Image.fromarray(array)
        scale = max(WIDTH / image.width, HEIGHT / image.height) * 1.15  # room to shift the crop
        bases.append(image.resize((round(image.width * scale), round(image.height * scale)),
                                  Image.Resampling.LANCZOS))
    out = []
    for i in range(count):
        base = bases[i % len(bases)]
        variant = i // len(bases)
        dx = (variant * 7) % (base.width - WIDTH + 1)
        dy = (variant * 5) % (base.height - HEIGHT + 1)
        crop = base.crop((dx, dy, dx + WIDTH, dy + HEIGHT))
        if variant % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def measure(stages: dict, count: int, repeats: int) -> dict[str, dict]:
    """Median images/s of each stage over `repeats` runs, after one warm-up run each.

    Runs are interleaved (A B A B ...) so that load from other processes on a shared machine
    falls on every stage alike rather than on whichever ran during a burst.
    """
    for fn in stages.values():
        fn()  # compiles, thread start, allocator warm-up
    rates: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            start = time.perf_counter()
            fn()
            rates[name].append(count / (time.perf_counter() - start))
    out = {}
    for name, runs in rates.items():
        out[name] = {"images_per_s": statistics.median(runs), "runs": runs}
        print(f"  {name:<44} {out[name]['images_per_s']:9.1f} images/s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    import jax

    from vqgan_datasets.config import VQGANConfig
    from vqgan_datasets.engine import Engine
    from vqgan_datasets.images import preprocess_batch
    from vqgan_datasets.modeling import VQModel

    files = make_jpegs(args.files)
    n, size, repeats = len(files), args.image_size, args.repeats
    print(f"{n} JPEGs {WIDTH}x{HEIGHT} q=90 → {size}², {repeats} repeats", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        stages = {}
        for draft in (False, True):
            for threads, executor in ((1, None), (args.threads, pool)):
                name = f"preprocess {'draft' if draft else 'full decode'}, {threads} thread(s)"
                stages[name] = functools.partial(
                    preprocess_batch, files, size, executor=executor, draft=draft
                )
        rows = measure(stages, n, repeats)
    preprocess_rate = rows[f"preprocess draft, {args.threads} thread(s)"]["images_per_s"]

    config = VQGANConfig(
        ch=32, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
        resolution=size, z_channels=32, embed_dim=16, n_embed=1024,
    )
    model = VQModel(config, seed=0)
    pixels = preprocess_batch(files, size, draft=True).pixels
    with Engine(model, batch_size=args.batch_size, num_threads=args.threads) as engine:
        engine_name = "engine alone (pre-decoded uint8)"
        whole_name = "whole path (bytes → tokens, encode_iter)"
        rows.update(measure({
            engine_name: lambda: engine.encode(pixels),
            whole_name: lambda: sum(1 for _ in engine.encode_iter(files, image_size=size)),
        }, n, repeats))
        stats = dataclasses.asdict(engine.stats)
        devices = f"{engine.num_devices} x {engine.devices[0].device_kind}"
    engine_rate = rows[engine_name]["images_per_s"]
    whole_rate = rows[whole_name]["images_per_s"]

    bound = min(preprocess_rate, engine_rate)
    harmonic = 1.0 / (1.0 / preprocess_rate + 1.0 / engine_rate)
    result = {
        "files": n,
        "image_size": size,
        "repeats": repeats,
        "threads": args.threads,
        "batch_size_per_device": args.batch_size,
        "cpu_count": os.cpu_count(),
        "devices": devices,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "model": {"ch": config.ch, "ch_mult": list(config.ch_mult),
                  "tokens": list(config.grid_shape(size))},
        "rates": rows,
        "overlap_efficiency": whole_rate / bound,
        "harmonic_bound_images_per_s": harmonic,
        "whole_over_harmonic": whole_rate / harmonic,
        "engine_stats": stats,
    }

    print(f"\n{'stage':<46}{'images/s':>10}")
    for name, row in rows.items():
        print(f"{name:<46}{row['images_per_s']:>10.1f}")
    print(f"{'harmonic bound 1/(1/preprocess+1/engine)':<46}{harmonic:>10.1f}")
    print(f"{'overlap efficiency whole / min(stages)':<46}{result['overlap_efficiency']:>10.2f}")
    print(f"{'whole / harmonic bound':<46}{result['whole_over_harmonic']:>10.2f}")
    print(f"({devices}, {os.cpu_count()} CPUs, {args.threads} threads, jax {jax.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
