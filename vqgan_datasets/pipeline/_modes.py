"""PIL modes, EXIF orientation and alpha -> RGB, for images.py (rules in its docstring).

Conversions of large images run in bands of rows, so their temporaries stay small whatever the
image size; decisions that depend on the whole image (the value range of modes I and F) are made
once, before the bands.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import ExifTags, Image

WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA")
_PREMULTIPLIED_MODES = ("RGBa", "La")
# Mode conversions run in bands of about this many pixels, so that their temporaries (uint16
# compositing, int32/float arithmetic, about 30 bytes per pixel) stay under 10 MB.
_BAND_PIXELS = 1 << 18
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def to_rgb(image: Image.Image, *, background: Sequence[int] = WHITE) -> Image.Image:
    """Any PIL image -> RGB (upright first frame, alpha over ``background``).

    Mode rules are in ``vqgan_datasets.pipeline.images``. May return ``image`` itself when it is an
    upright RGB first frame; seeks an animated image back to frame 0 and loads it.
    """
    bg = _check_background(background)
    load_first_frame(image)
    rgb = mode_to_rgb(image, bg, keep_gray=False)
    return upright(rgb, orientation_of(image))


def load_first_frame(image: Image.Image) -> None:
    if image.tell() != 0:
        image.seek(0)
    image.load()


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation as ``ImageOps.exif_transpose`` does (pixels only)."""
    if orientation == 1:
        return image
    return image.transpose(_TRANSPOSE[orientation])


def owned_to_rgb(image: Image.Image, orientation: int) -> Image.Image:
    """``to_rgb`` (mode ``L`` kept) for an image images.py opened itself: the source is closed as
    soon as a converted copy exists, so at most two full-size images are alive at any time."""
    load_first_frame(image)
    rgb = mode_to_rgb(image, WHITE, keep_gray=True)
    if rgb is not image:
        image.close()
    turned = upright(rgb, orientation)
    if turned is not rgb:
        rgb.close()
    return turned


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(v) for v in background)
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise ValueError(f"background must be 3 values in [0, 255], got {background!r}")
    return bg


def orientation_of(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1-8; 1 when absent or unreadable (corrupt EXIF is common)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def jpeg_orientation(data: bytes | bytearray | memoryview) -> int | None:
    """``orientation_of`` for JPEG bytes, cheaply: PIL reads the header only when it holds an
    APP1 segment (where EXIF and XMP live); None when PIL cannot open it."""
    if not _has_app1(data):
        return 1
    try:
        with Image.open(io.BytesIO(data)) as image:
            return orientation_of(image)
    except Exception:
        return None


def _has_app1(data: bytes | bytearray | memoryview) -> bool:
    """Whether a JPEG header has an APP1 segment before its first scan, as PIL reads headers;
    True where the markers cannot be followed (PIL then looks)."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xE1:
            return True
        elif marker in (0xDA, 0xD9):  # start of scan, end of image: the header is over
            return False
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        else:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return True


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def mode_to_rgb(image: Image.Image, bg: tuple[int, int, int], *, keep_gray: bool) -> Image.Image:
    """Mode conversion in bands of rows, so its temporaries stay small whatever the image size.

    ``keep_gray`` returns mode L as is: resizing L then replicating it equals resizing RGB.
    """
    if image.mode == "RGB" or (keep_gray and image.mode == "L"):
        return image
    convert = _band_converter(image, bg)
    width, height = image.size
    if width * height <= _BAND_PIXELS:
        return convert(image)
    out = Image.new("RGB", image.size)
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        out.paste(convert(image.crop((0, top, width, min(height, top + rows)))), (0, top))
    return out


def _band_converter(
    image: Image.Image, bg: tuple[int, int, int]
) -> Callable[[Image.Image], Image.Image]:
    """A function turning any band of ``image`` into RGB; decisions that depend on the whole
    image (the value range of modes I and F) are made here, once."""
    mode = image.mode
    if mode.startswith("I;16"):
        return lambda band: _gray_to_rgb(_uint16_to_uint8(np.asarray(band)))
    if mode == "I":
        low, high = image.getextrema()
        sixteen = low >= 0 and high <= 65535
        return lambda band: _gray_to_rgb(_int32_to_uint8(np.asarray(band), sixteen))
    if mode == "F":
        unit = image.getextrema()[1] <= 1.0 + 1e-6
        return lambda band: _gray_to_rgb(_float_to_uint8(np.asarray(band), unit))
    if mode in _PREMULTIPLIED_MODES:
        return lambda band: Image.fromarray(_composite_premultiplied(np.asarray(band), bg))
    if _has_transparency(image):
        return lambda band: Image.fromarray(_composite(np.asarray(_as_rgba(band)), bg))
    return _convert_rgb


def _as_rgba(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGBA" else image.convert("RGBA")


def _convert_rgb(image: Image.Image) -> Image.Image:
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {image.mode!r}: {e}") from e


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    # The high byte, as PIL decodes 16-bit RGB(A) PNGs: v*257 -> v for every v in 0..255.
    return (a >> 8).astype(np.uint8)


def _int32_to_uint8(a: np.ndarray, sixteen: bool) -> np.ndarray:
    """Mode I: 16-bit data (every value of the image in [0, 65535]) or full-range int32."""
    if sixteen:
        return _uint16_to_uint8(a)
    return (np.clip(a, 0, None) >> 23).astype(np.uint8)


def _float_to_uint8(a: np.ndarray, unit: bool | None = None) -> np.ndarray:
    """Floats in [0, 1] (``unit``; by default: the max is <= 1) or [0, 255], clipped, rounded."""
    if not np.isfinite(a).all():
        raise ValueError("float pixels contain NaN or infinity")
    a = a.astype(np.float32, copy=False)
    if unit is None:
        unit = bool(a.max() <= 1.0 + 1e-6)
    if unit:
        a = a * 255.0
    return np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8)


def _composite(rgba: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """Exact ``round((c*a + bg*(255-a)) / 255)``; fits uint16 since it is a convex combination."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    out = rgba[..., :3].astype(np.uint16)
    out *= a
    out += np.asarray(bg, np.uint16) * (255 - a)
    out += 127
    out //= 255
    return out.astype(np.uint8)


def _composite_premultiplied(pixels: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """RGBa / La (color already multiplied by alpha): ``c + round(bg*(255-a)/255)``."""
    color, a = pixels[..., :-1].astype(np.uint16), pixels[..., -1:].astype(np.uint16)
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    out = color + (np.asarray(bg, np.uint16) * (255 - a) + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def array_to_rgb(a: np.ndarray) -> np.ndarray:
    expected = "expected HxW or HxWxC with C in (1, 3, 4), dtype uint8, uint16, bool or float"
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) or a.size == 0:
        raise ValueError(f"array of shape {a.shape} and dtype {a.dtype}: {expected}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * np.uint8(255)
    elif a.dtype == np.uint16:
        a = _uint16_to_uint8(a)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(
                f"array of shape {a.shape} and dtype {a.dtype} contains NaN or infinity"
            )
        a = _float_to_uint8(a)
    else:
        raise ValueError(f"array of shape {a.shape} and dtype {a.dtype}: {expected}")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        return _composite(a, WHITE)
    return np.ascontiguousarray(a)


def nested_to_array(image: list | tuple) -> np.ndarray:
    """Nested lists read as ``np.asarray`` reads them (floats -> float64, ints -> int64), so
    that the dtype rules and value ranges of array inputs apply unchanged; ValueError otherwise."""
    try:
        array = np.asarray(image)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(
            f"nested lists are not a rectangular HxW or HxWxC array of numbers ({e})"
        ) from None
    if array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"nested lists of integers, read as numpy reads them, give dtype {array.dtype} "
            f"(shape {array.shape}); array inputs take uint8 (0..255), uint16, bool or floats "
            "([0, 1], or [0, 255] when the max is above 1): give floats, a uint8 array, or "
            "store the column as datasets.Array3D(shape, 'uint8')"
        )
    if array.dtype.kind not in "buf":
        raise ValueError(
            f"nested lists of shape {array.shape} hold {array.dtype} values, not numbers"
        )
    return array
