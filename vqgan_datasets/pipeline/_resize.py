"""Resize and center crop for images.py: the seed's geometry, bounded intermediates, JPEG drafts.

The seed resizes the whole image so that its shortest side is ``S`` and then crops the center
``S x S``. That intermediate grows with the aspect ratio (a 1x100000 image would need a
256 x 25.6M one), so the whole-image resize is used only while it stays within
``FULL_RESIZE_LIMIT * S**2`` pixels; beyond that, and always in fast mode, only the crop region
is resampled (PIL's ``resize(box=...)``), whose intermediate is at most the crop's source rows.
PIL takes the box as float32, so a region resize can differ from the whole-image resize by a
level or two on a few values: the exact mode keeps the whole-image resize wherever it is cheap.

Fast mode's DCT-scaled JPEG decode goes through simplejpeg when it is installed (less work per
image than PIL's file machinery) and through PIL's ``draft`` otherwise: both run libjpeg-turbo
at the same scale, with the same pixels (tested). Only 1/2, 1/4 and 1/8 are used: libjpeg-turbo's
other scales (3/8, 5/8, 3/4, 7/8) lack SIMD code and decode slower than the full size.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ._modes import upright

try:  # optional: without it fast mode drafts through PIL, with the same pixels
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

LANCZOS = Image.Resampling.LANCZOS
# Exact mode resizes the whole image (the seed's pixels) up to this many times S**2 target
# pixels (aspect ratios up to 16:1); longer images resample only the crop region.
FULL_RESIZE_LIMIT = 16
# Fast mode: the filter by how much the crop region is reduced (its source extent / S).
# LANCZOS where little reduction is left (the pixels are nearly final and need the sharpest
# filter), cheaper ones as the reduction grows. Pixels of a 1/4 or 1/8 DCT scale (2x2 and 1x1
# of each block's 8x8 coefficients) are coarser and keep the sharper filters longer. Chosen
# with benchmarks/preprocess_modes.py as the fastest sets keeping photos >= 38.2 dB from exact
# over six corpus seeds; the cheaper filter beyond each bound costs 1-2 dB at the bound.
FAST_FILTERS = (
    (1.1, LANCZOS),
    (1.4, Image.Resampling.BICUBIC),
    (math.inf, Image.Resampling.HAMMING),
)
COARSE_FILTERS = (
    (1.2, LANCZOS),
    (1.5, Image.Resampling.BICUBIC),
    (math.inf, Image.Resampling.HAMMING),
)
# Fast mode drafts a JPEG to the smallest DCT scale whose sides are both at least the resize
# target times the margin. Used almost as is (a reduction left below 1.02x), every scale fell
# to 37.7-37.9 dB against exact on some photo; from 1.02x on, 1/2 stayed above 39 dB.
DRAFT_MARGINS = ((8, 1.05), (4, 1.05), (2, 1.03))

Box = tuple[float, float, float, float]


def _describe_filters(filters: tuple) -> str:
    bounds = ", ".join(f"{f.name} below {b}x" for b, f in filters if b != math.inf)
    return f"{bounds}, {filters[-1][1].name} beyond"


# What fast mode does, for the token metadata and fingerprints: changing a constant above must
# change this text, so tokens made by different fast modes never share a cache entry.
FAST_DESCRIPTION = (
    "JPEG: DCT-scaled decode at the first of "
    + ", ".join(f"1/{s} (sides >= {m}x target)" for s, m in DRAFT_MARGINS)
    + f" that fits; crop region only: {_describe_filters(FAST_FILTERS)} (at 1/4 and 1/8: "
    + f"{_describe_filters(COARSE_FILTERS)}); decoded inputs: that resize; other formats: exact"
)


# The tokenizer families' own preprocessing, by name, and what each does (for token records).
FAMILY_PREPROCESSING: tuple[str, ...] = (
    "lanczos_center_crop", "adm_center_crop", "opencv_linear_center_crop",
    "torchvision_bilinear_center_crop",
)
METHOD_DESCRIPTIONS = {
    "lanczos_center_crop": "full decode; shortest side to image_size, LANCZOS; center crop "
    "(the seed's)",
    "adm_center_crop": "full decode; BOX halving while the shortest side >= 2*image_size, "
    "BICUBIC to image_size, center crop at floor offsets (ADM center_crop_arr)",
    "opencv_linear_center_crop": "full decode; OpenCV INTER_LINEAR to image_size, center crop "
    "at floor offsets (albumentations SmallestMaxSize + CenterCrop)",
    "torchvision_bilinear_center_crop": "full decode; shortest side to image_size, the other "
    "truncated, PIL BILINEAR; center crop (torchvision Resize + CenterCrop)",
}


def resize_by_mode(image: Image.Image, image_size: int, mode: str, *,
                   size: tuple[int, int] | None = None, box: Box | None = None) -> np.ndarray:
    """The resize and crop of preprocessing ``mode`` ("exact" and "fast" are ``resize_crop``'s,
    with its ``size`` and ``box``; a family's own mode reads the image as it is)."""
    if mode == "adm_center_crop":
        return adm_center_crop(image, image_size)
    if mode == "opencv_linear_center_crop":
        return opencv_linear_center_crop(image, image_size)
    if mode == "torchvision_bilinear_center_crop":
        return torchvision_bilinear_center_crop(image, image_size)
    return resize_crop(image, image_size, fast=mode == "fast", size=size, box=box)


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
    coarse = box is not None and size is not None and size[0] >= 3 * (box[2] - box[0])
    filters = COARSE_FILTERS if coarse else FAST_FILTERS  # drafted to 1/4 or 1/8
    resample = next(f for below, f in filters if min(sx, sy) < below)
    return _rgb_array(image.resize((s, s), resample, box=region))


def adm_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (LlamaGen's and TiTok's extraction) -> uint8 ``(S, S, 3)``.

    While the shortest side is at least 2S the image is halved (sides floor-divided) with BOX;
    then BICUBIC to ``round(side * S / shortest)`` (Python's round); then the crop at offsets
    ``(side - S) // 2``. Beyond ``FULL_RESIZE_LIMIT`` the bicubic pass reads the crop region only.
    """
    s = image_size
    while min(image.size) >= 2 * s:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    tw, th = target_size(*image.size, s)
    left, top = (tw - s) // 2, (th - s) // 2
    if tw * th > FULL_RESIZE_LIMIT * s * s:
        sx, sy = image.width / tw, image.height / th
        region = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return _rgb_array(image.resize((s, s), Image.Resampling.BICUBIC, box=region))
    if image.size != (tw, th):
        image = image.resize((tw, th), Image.Resampling.BICUBIC)
    return _rgb_array(image)[top:top + s, left:left + s].copy()


def torchvision_bilinear_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """torchvision's ``Resize(S)`` + ``CenterCrop(S)`` on a PIL image (SEED-Voken's
    Open-MAGVIT2 data code) -> uint8 ``(S, S, 3)``: the shortest side to S and the other to
    ``int(S * long / short)`` (truncated), PIL BILINEAR, crop at ``int(round((side - S) / 2))``.
    Beyond ``FULL_RESIZE_LIMIT`` only the crop region is resampled."""
    s = image_size
    w, h = image.size
    short, long = min(w, h), max(w, h)
    other = int(s * long / short)
    tw, th = (s, other) if w <= h else (other, s)
    left, top = int(round((tw - s) / 2.0)), int(round((th - s) / 2.0))
    bilinear = Image.Resampling.BILINEAR
    if tw * th > FULL_RESIZE_LIMIT * s * s:
        sx, sy = w / tw, h / th
        region = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return _rgb_array(image.resize((s, s), bilinear, box=region))
    if (tw, th) != image.size:
        image = image.resize((tw, th), bilinear)
    return _rgb_array(image)[top:top + s, left:left + s].copy()


def opencv_linear_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """albumentations' ``SmallestMaxSize`` + ``CenterCrop`` (SEED-Voken's IBQ data code) ->
    uint8 ``(S, S, 3)``: OpenCV's INTER_LINEAR resize (no antialiasing) to
    ``round(side * S / shortest)``, then the crop at offsets ``(side - S) // 2``.

    OpenCV's fixed-point resize is only reproduced by OpenCV itself, so this needs
    ``opencv-python-headless``. Beyond ``FULL_RESIZE_LIMIT`` only the crop region is sampled
    (``cv2.remap`` at the same coordinates; its weights are 1/32 steps, a level or two off).
    """
    cv2 = _opencv()
    s = image_size
    tw, th = target_size(*image.size, s)
    left, top = (tw - s) // 2, (th - s) // 2
    if tw * th > FULL_RESIZE_LIMIT * s * s:
        # OpenCV's source coordinate of output pixel d: (d + 0.5) * (W / W') - 0.5, clamped;
        # only the source rectangle those coordinates read is converted and sampled.
        xs = np.clip((np.arange(left, left + s) + 0.5) * (image.width / tw) - 0.5,
                     0, image.width - 1)
        ys = np.clip((np.arange(top, top + s) + 0.5) * (image.height / th) - 0.5,
                     0, image.height - 1)
        x0, y0 = int(xs[0]), int(ys[0])
        x1, y1 = min(image.width, int(xs[-1]) + 2), min(image.height, int(ys[-1]) + 2)
        pixels = _rgb_array(image.crop((x0, y0, x1, y1)))
        map_x = np.broadcast_to((xs - x0).astype(np.float32)[None, :], (s, s))
        map_y = np.broadcast_to((ys - y0).astype(np.float32)[:, None], (s, s))
        return cv2.remap(pixels, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y),
                         cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    pixels = _rgb_array(image)  # three channels first: OpenCV's SIMD lanes depend on them
    if (tw, th) != image.size:
        pixels = cv2.resize(pixels, (tw, th), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(pixels[top:top + s, left:left + s])


def _opencv():
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "preprocess 'opencv_linear_center_crop' (IBQ's own preprocessing) needs OpenCV: "
            "pip install opencv-python-headless, or pass preprocess='lanczos_center_crop' "
            "(other pixels, so other tokens than IBQ's own code makes)"
        ) from None
    return cv2


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


def dct_scale(width: int, height: int, image_size: int) -> int:
    """The DCT scale denominator (8, 4 or 2) fast mode decodes a ``width x height`` JPEG at,
    or 1 (full size) when none keeps both sides at least the resize target times its margin."""
    tw, th = target_size(width, height, image_size)
    return next(
        (s for s, margin in DRAFT_MARGINS if min(width / s / tw, height / s / th) >= margin), 1
    )


def draft_jpeg(image: Image.Image, image_size: int, orientation: int) -> Box | None:
    """Ask libjpeg for a DCT-scaled decode (1/2, 1/4, 1/8) of a JPEG ``image`` not yet loaded
    (the caller checks the format).

    Returns where the full upright image lies in the drafted upright one (``resize_crop``'s
    ``box``), or None when no scale fits. ``orientation`` is the EXIF orientation (1-8).
    """
    if image.tell() != 0:
        return None
    width, height = image.size
    scale = dct_scale(width, height, image_size)
    if scale == 1:
        return None
    # PIL picks the largest of 8, 4, 2 not above min(W // w, H // h): exactly `scale` here.
    drafted = image.draft("RGB", (width // scale, height // scale))
    if drafted is None or image.size == (width, height):
        return None
    return upright_box(drafted[1], image.size, orientation)


def simplejpeg_available() -> bool:
    """Whether fast mode can decode JPEGs through simplejpeg (else PIL's draft does)."""
    return simplejpeg is not None


def jpeg_header(data: bytes | bytearray | memoryview) -> tuple[int, int, bool] | None:
    """``(width, height, gray)`` of a YCbCr or grayscale JPEG that simplejpeg decodes as PIL
    does; None without simplejpeg, for other color spaces (CMYK, YCCK, RGB) or a bad header."""
    if simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    return width, height, colorspace == "Gray"


def fast_jpeg(
    data: bytes | bytearray | memoryview,
    width: int,
    height: int,
    gray: bool,
    orientation: int,
    image_size: int,
) -> np.ndarray | None:
    """Fast mode's pixels of a ``jpeg_header``-accepted JPEG: simplejpeg's decode at
    ``dct_scale`` (PIL's draft pixels), made upright, crop region resized.

    None when libjpeg reports damaged data, even data it could recover from: PIL then decides.
    """
    scale = dct_scale(width, height, image_size)
    size = (-(-width // scale), -(-height // scale))  # libjpeg rounds scaled sizes up
    try:  # the smallest scale giving at least `size`: exactly 1/scale
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="GRAY" if gray else "RGB", min_width=size[0], min_height=size[1]
        )
    except ValueError:
        return None
    if pixels.shape[1::-1] != size:
        return None
    image = Image.fromarray(pixels[..., 0] if gray else pixels)
    del pixels
    box = None
    if scale > 1:
        box = upright_box((0.0, 0.0, width / scale, height / scale), image.size, orientation)
    turned = upright(image, orientation)
    if turned is not image:
        image.close()
    upright_size = (height, width) if orientation >= 5 else (width, height)
    return resize_crop(turned, image_size, fast=True, size=upright_size, box=box)


def upright_box(box: Box, drafted_size: tuple[int, int], orientation: int) -> Box:
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
