"""preprocess="exact" vs "fast": images/s on one thread and PSNR of fast against exact.

Corpus: JPEGs (q=90) cut from scikit-image's photos, each side drawn from 400-1100 px
(``--sides``): the photo is LANCZOS-scaled to cover the cut (with 0-40% to spare), cut at a
random offset and flipped half the time. Everything is deterministic (``--seed``). Speed is the
median over ``--repeats`` interleaved passes (exact, fast, exact, fast, ...) of the whole
``load_image`` call from the encoded bytes on this one thread, in images per second of this
process's CPU time (what one core delivers; less sensitive to other processes than wall time,
which is shown too). PSNR compares each fast output with the exact one. The same is then done
for the images handed in already decoded (PIL), where fast mode is the fast resize alone.
Fast mode decodes JPEGs with simplejpeg when it is installed; ``--pil-draft`` measures the
fallback without it (PIL's draft, the same pixels).

    python benchmarks/preprocess_modes.py [--files 96] [--repeats 5] [--image-size 256]
        [--sides 400,1100] [--seed 0] [--photos astronaut,chelsea,...] [--pil-draft]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time

import numpy as np
from PIL import Image
from skimage import data

from vqgan_datasets.pipeline import _resize
from vqgan_datasets.pipeline.images import load_image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "camera")


def make_jpegs(count: int, seed: int, photos: tuple[str, ...], low: int = 400,
               high: int = 1100) -> list[bytes]:
    """`count` distinct JPEGs (q=90), both sides in [low, high], cut from the named photos."""
    rng = random.Random(seed)
    bases = []
    for name in photos:
        pixels = getattr(data, name)()
        bases.append(Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels))
    out = []
    for i in range(count):
        base = bases[i % len(bases)]
        width, height = rng.randint(low, high), rng.randint(low, high)
        scale = max(width / base.width, height / base.height) * rng.uniform(1.0, 1.4)
        big = base.resize((round(base.width * scale), round(base.height * scale)),
                          Image.Resampling.LANCZOS)
        x, y = rng.randint(0, big.width - width), rng.randint(0, big.height - height)
        cut = big.crop((x, y, x + width, y + height))
        if rng.random() < 0.5:
            cut = cut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        cut.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rates(inputs: list, image_size: int, repeats: int) -> dict[str, float]:
    """Median images/s per mode over interleaved passes, after one warm-up pass each: per
    second of this process's CPU time (what one core delivers, whatever else runs) and of wall
    time."""
    runs: dict[str, list[tuple[float, float]]] = {"exact": [], "fast": []}
    for mode in runs:
        for item in inputs[:8]:
            load_image(item, image_size, preprocess=mode)
    for _ in range(repeats):
        for mode, passes in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            for item in inputs:
                load_image(item, image_size, preprocess=mode)
            passes.append((time.process_time() - cpu, time.perf_counter() - wall))
    out = {}
    for mode, passes in runs.items():
        out[mode] = len(inputs) / statistics.median(cpu for cpu, _ in passes)
        out[f"{mode}_wall"] = len(inputs) / statistics.median(wall for _, wall in passes)
    return out


def quality(inputs: list, image_size: int) -> dict[str, float]:
    values = [
        psnr(load_image(item, image_size), load_image(item, image_size, preprocess="fast"))
        for item in inputs
    ]
    finite = [min(v, 99.0) for v in values]  # identical outputs count as 99 dB in the mean
    return {"psnr_mean": float(np.mean(finite)), "psnr_min": float(np.min(values)),
            "psnr_p5": float(np.percentile(values, 5)),
            "identical": int(sum(v == float("inf") for v in values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="400,1100", help="smallest,largest side in px")
    parser.add_argument("--photos", default=",".join(PHOTOS),
                        help="scikit-image data names (textures: brick,grass,gravel)")
    parser.add_argument("--pil-draft", action="store_true",
                        help="fast mode without simplejpeg: PIL's draft (the same pixels)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.pil_draft:
        _resize.simplejpeg = None
    decoder = "simplejpeg" if _resize.simplejpeg is not None else "PIL draft"
    size, photos = args.image_size, tuple(args.photos.split(","))
    low, high = (int(v) for v in args.sides.split(","))

    jpegs = make_jpegs(args.files, args.seed, photos, low, high)
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    mean_kb = statistics.mean(len(b) for b in jpegs) / 1000
    print(f"{len(jpegs)} JPEGs q=90, sides {low}-{high} px, mean {mean_kb:.0f} KB, from "
          f"{', '.join(photos)}; image_size={size}; fast JPEG decoder: {decoder}; one thread, "
          f"median of {args.repeats} interleaved passes")
    print("| input | exact img/s | fast img/s | fast / exact | (wall time) | PSNR mean | PSNR p5 "
          "| PSNR min |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for name, inputs in (("JPEG bytes", jpegs), ("decoded PIL", decoded)):
        speed, psnrs = rates(inputs, size, args.repeats), quality(inputs, size)
        ratio, wall_ratio = speed["fast"] / speed["exact"], speed["fast_wall"] / speed["exact_wall"]
        results[name] = {**speed, **psnrs, "ratio": ratio, "wall_ratio": wall_ratio}
        print(f"| {name} | {speed['exact']:.1f} | {speed['fast']:.1f} | {ratio:.2f}x | "
              f"{wall_ratio:.2f}x | {psnrs['psnr_mean']:.1f} dB | {psnrs['psnr_p5']:.1f} dB | "
              f"{psnrs['psnr_min']:.1f} dB |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "decoder": decoder, "mean_kb": mean_kb,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
