"""JPEG draft mode vs full decode: speed and pixel difference after the whole preprocessing.

Corpus: scikit-image's bundled photos saved as JPEG, plus larger synthetic JPEGs (photos
upscaled with LANCZOS, one of odd size so libjpeg's partial last block matters). Speed is the
median over several runs of decoding + converting + resizing + cropping from the encoded bytes,
on one thread. Differences compare ``load_image(..., draft=True)`` with ``draft=False``.

    python benchmarks/preprocess_draft.py [--image-size 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image
from skimage import data

from vqgan_datasets.images import _DRAFT_FACTOR, load_image


def _jpeg(pixels: np.ndarray, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    image = Image.fromarray(pixels)
    if size is not None:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def corpus() -> list[tuple[str, bytes]]:
    photos = {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "camera (gray)": data.camera(),
        "rocket": data.rocket(),
        "immunohistochemistry": data.immunohistochemistry(),
    }
    items = []
    for name, pixels in photos.items():
        items.append((f"{name} {pixels.shape[1]}x{pixels.shape[0]}", _jpeg(pixels)))
    for name, size in [
        ("astronaut", (2048, 2048)),
        ("coffee", (3000, 2000)),
        ("chelsea", (2047, 1361)),
        ("camera (gray)", (2048, 2048)),
    ]:
        items.append((f"{name} {size[0]}x{size[1]}", _jpeg(photos[name], size)))
    return items


def images_per_second(encoded: bytes, image_size: int, draft: bool, repeats: int) -> float:
    load_image(encoded, image_size, draft=draft)  # warm up
    per_run = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < 0.2:
            load_image(encoded, image_size, draft=draft)
            n += 1
        per_run.append(n / (time.perf_counter() - start))
    return statistics.median(per_run)


def difference(encoded: bytes, image_size: int) -> tuple[float, int, float]:
    full = load_image(encoded, image_size, draft=False).astype(np.float64)
    drafted = load_image(encoded, image_size, draft=True).astype(np.float64)
    diff = np.abs(full - drafted)
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return float(diff.mean()), int(diff.max()), psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    size = args.image_size

    print(f"image_size={size}, JPEG q=90, median of {args.repeats} runs, one thread")
    header = (
        f"| {'image':<30} | drafted | full img/s | draft img/s | speedup "
        "| mean abs diff | max abs diff | PSNR dB |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, encoded in corpus():
        width, height = Image.open(io.BytesIO(encoded)).size
        drafted = min(width, height) >= _DRAFT_FACTOR * size
        full = images_per_second(encoded, size, False, args.repeats)
        fast = images_per_second(encoded, size, True, args.repeats) if drafted else full
        mean_d, max_d, psnr = difference(encoded, size)
        print(
            f"| {name:<30} | {'yes' if drafted else 'no':<7} | {full:10.1f} | {fast:11.1f} "
            f"| {fast / full:6.1f}x | {mean_d:13.2f} | {max_d:12d} | {psnr:7.1f} |"
        )


if __name__ == "__main__":
    main()
