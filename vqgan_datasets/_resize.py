"""Resize and center crop for images.py: the seed's geometry, bounded intermediates, JPEG drafts.

The seed resizes the whole image so that its shortest side is ``S`` and then crops the center
``S x S``. That intermediate grows with the aspect ratio (a 1x100000 image would need a
256 x 25.6M one), so the whole-image resize is used only while it stays within
``FULL_RESIZE_LIMIT * S**2`` pixels; beyond that, and always in fast mode, only the crop region
is resampled (PIL's ``resize(box=...)``), whose intermediate is at most the crop's source rows.
PIL takes the box as float32, so a region resize can differ from the whole-image resize by a
level or two on a few values: the exact mode keeps the whole-image resize wherever it is cheap.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

LANCZOS = Image.Resampling.LANCZOS
# Exact mode resizes the whole image (the seed's pixels) up to this many times S**2 target
# pixels (aspect ratios up to 16:1); longer images resample only the crop region.
FULL_RESIZE_LIMIT = 16
# Fast mode: the filter by how much the crop region is reduced (its source extent / S).
# LANCZOS where little reduction is left after a draft (the DCT-scaled pixels are nearly final
# and need the sharpest filter), cheaper ones as the reduction grows; chosen with
# benchmarks/preprocess_modes.py as the fastest set keeping photos >= 38.5 dB from exact.
FAST_FILTERS = (
    (1.2, LANCZOS),
    (1.5, Image.Resampling.BICUBIC),
    (math.inf, Image.Resampling.HAMMING),
)
# Fast mode drafts a JPEG to the smallest DCT scale whose sides are both at least the resize
# target times the margin: 1/4 and 1/8 (2x2 and 1x1 of each block's 8x8 coefficients) used
# almost as is measured 37.7 dB against exact, 1/2 stayed above 43 dB.
DRAFT_MARGINS = ((8, 1.05), (4, 1.05), (2, 1.0))

Box = tuple[float, float, float, float]
# What fast mode does, for the token metadata and fingerprints: changing a constant above must
# change this text, so tokens made by different fast modes never share a cache entry.
FAST_DESCRIPTION = (
    "JPEG: DCT-scaled decode at the first of "
    + ", ".join(f"1/{s} (sides >= {m}x target)" for s, m in DRAFT_MARGINS)
    + " that fits; crop region only: "
    + ", ".join(f"{f.name} below {b}x" for b, f in FAST_FILTERS if b != math.inf)
    + f", {FAST_FILTERS[-1][1].name} beyond; decoded inputs: that resize; other formats: exact"
)


def target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The seed's resize target; Python's round (half to even) on purpose, as the seed."""
    r = image_size / min(width, height)
    return round(r * width), round(r * height)


def resize_crop(
    image: Image.Image,
    image_size: int,
    *,
    fast: bool = False,
    size: tuple[int, int] | None = None,
    box: Box | None = None,
) -> np.ndarray:
    """Upright RGB or L ``image`` -> uint8 ``(S, S, 3)``: shortest side to S, center crop.

    ``size`` is the geometry the seed would see (the undrafted upright size) and ``box`` where
    that full image lies in ``image`` (a JPEG draft's exact source box); both default to
    ``image`` itself.
    """
    s = image_size
    tw, th = target_size(*(size or image.size), s)
    left, top = int(round((tw - s) / 2.0)), int(round((th - s) / 2.0))
    if not fast and box is None and tw * th <= FULL_RESIZE_LIMIT * s * s:
        if image.size != (tw, th):
            image = image.resize((tw, th), LANCZOS)
        if (tw, th) != (s, s):
            image = image.crop((left, top, left + s, top + s))
        return _rgb_array(image)
    x0, y0, x1, y1 = box or (0.0, 0.0, *image.size)
    sx, sy = (x1 - x0) / tw, (y1 - y0) / th
    region = (x0 + left * sx, y0 + top * sy, x0 + (left + s) * sx, y0 + (top + s) * sy)
    if not fast:
        return _rgb_array(_lanczos_region(image, s, region))
    resample = next(f for below, f in FAST_FILTERS if min(sx, sy) < below)
    return _rgb_array(image.resize((s, s), resample, box=region))


def _lanczos_region(image: Image.Image, s: int, region: Box) -> Image.Image:
    """The seed's LANCZOS passes (horizontal, then vertical) for the crop region alone.

    PIL may run a box resize vertical-first (rounding differently), so the passes are two
    calls: the horizontal one over just the source rows the vertical one reads.
    """
    x0, y0, x1, y1 = region
    margin = 3.0 * max((y1 - y0) / s, 1.0) + 2  # LANCZOS reads 3 scaled pixels each side
    top = max(0, math.floor(y0 - margin))
    bottom = min(image.height, math.ceil(y1 + margin))
    rows = image.crop((0, top, image.width, bottom))
    rows = rows.resize((s, bottom - top), LANCZOS, box=(x0, 0, x1, bottom - top))
    return rows.resize((s, s), LANCZOS, box=(0, y0 - top, s, y1 - top))


def _rgb_array(image: Image.Image) -> np.ndarray:
    """A writable uint8 HxWx3 copy; L is replicated (resampling L then replicating is RGB's
    result exactly, at a third of the work)."""
    pixels = np.array(image, dtype=np.uint8)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def draft_jpeg(image: Image.Image, image_size: int, orientation: int) -> Box | None:
    """Ask libjpeg for a DCT-scaled decode (1/2, 1/4, 1/8) of a JPEG ``image`` not yet loaded
    (the caller checks the format).

    Returns where the full upright image lies in the drafted upright one (``resize_crop``'s
    ``box``), or None when no scale fits. ``orientation`` is the EXIF orientation (1-8).
    """
    if image.tell() != 0:
        return None
    width, height = image.size
    tw, th = target_size(width, height, image_size)  # in stored orientation
    scale = next(
        (s for s, margin in DRAFT_MARGINS if min(width / s / tw, height / s / th) >= margin), 1
    )
    if scale == 1:
        return None
    # PIL picks the largest of 8, 4, 2 not above min(W // w, H // h): exactly `scale` here.
    drafted = image.draft("RGB", (width // scale, height // scale))
    if drafted is None or image.size == (width, height):
        return None
    return _draft_box_upright(drafted[1], image.size, orientation)


def _draft_box_upright(box: Box, drafted_size: tuple[int, int], orientation: int) -> Box:
    """Where the draft's exact source box (0, 0, W/s, H/s) lies after the EXIF transpose.

    libjpeg rounds the scaled size up, so the last row/column is partial; a transpose moves
    that partial edge to another side.
    """
    bw, bh = box[2], box[3]
    w, h = drafted_size
    ex, ey = w - bw, h - bh
    return {
        1: (0, 0, bw, bh),
        2: (ex, 0, w, bh),
        3: (ex, ey, w, h),
        4: (0, ey, bw, h),
        5: (0, 0, bh, bw),
        6: (ey, 0, h, bw),
        7: (ey, ex, h, w),
        8: (0, ex, bh, w),
    }[orientation]
