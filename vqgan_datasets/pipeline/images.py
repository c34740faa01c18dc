"""Any image input -> RGB uint8 ``(image_size, image_size, 3)``, with per-sample errors.

This is the only module that knows about image files, PIL modes, EXIF, decompression bombs and
resizing (its private helpers: ``_modes`` for modes and EXIF, ``_resize`` for geometry and
DCT-scaled JPEG decoding, ``_open`` for headers and PNGs with oversized metadata).
``preprocess`` is one of ``PREPROCESS_MODES``:

``"exact"`` (default) is the seed's preprocessing (the taming / dalle-mini notebook): a full
decode, the shortest side resized to ``image_size`` with LANCZOS to ``(round(r*W), round(r*H))``,
``r = image_size/min(W, H)`` (Python's round, as the seed), then a center crop at torchvision's
offsets ``int(round((W' - S) / 2.0))``. Smaller images are upscaled the same way; an image that
is already ``S x S`` is not resampled. Bytes, paths and URLs, ``{"bytes", "path"}`` dicts, PIL
images and arrays of the same image give the same pixels. Past a 16:1 aspect ratio the seed's
whole-image intermediate is not built: only the crop region is resampled, with the same passes
(PIL takes the region as float32, so a few values may move by a level or two).
``PREPROCESS_DESCRIPTIONS`` names each mode's parameters; the families' own are in ``_resize``.

``"fast"``: a JPEG file is decoded by libjpeg-turbo's DCT scaling (1/2, 1/4, 1/8) to the
smallest scale whose sides both reach the resize target times a margin (1.03x for 1/2, 1.05x
for 1/4 and 1/8: every scale used as is fell to 37.7-37.9 dB on some photo), then only the crop
region is resampled: LANCZOS while the reduction left is below 1.1x, BICUBIC below 1.4x,
HAMMING beyond (1.2x and 1.5x after the coarser 1/4 and 1/8). YCbCr and grayscale JPEGs are
decoded by simplejpeg when it is installed (less work per image: 2-8% more images/s) and by PIL's
``draft`` otherwise or where simplejpeg declines (CMYK/YCCK/RGB JPEGs, damaged data, sizes PIL
warns about): both run libjpeg-turbo at the same scale, with the same pixels, and the errors
are PIL's. Images handed in decoded (PIL, arrays) get that resize alone. Other formats (PNG,
WebP, GIF, ...) take the exact path: their decoding, not the resize, dominates. A caller's PIL
image is never drafted (a draft shrinks the object). ``benchmarks/preprocess_modes.py``
(image_size 256, JPEG q=90 cut from scikit-image photos, images per CPU-second of one thread on
a shared 2-core CPU; PSNR of fast against exact, mean / 5th percentile / min):

    JPEGs                      exact img/s  fast img/s  fast/exact  PSNR dB
    96, sides 400-1100 px      121.8        370.9       3.05x       45.0 / 39.3 / 38.4
      seeds 1 and 2                                     3.20x 3.17x min 38.6, 38.9
      same, decoded PIL        144.4        436.1       3.02x       45.4 / 40.5 / 39.4
    32, sides 1250-3000 px     21.5         155.0       7.20x       45.2 / 40.1 / 39.0
    64, sides 375-500 px       277.1        537.4       1.94x       44.1 / 40.1 / 39.7

Seed 0 with PIL's draft instead of simplejpeg: 3.00x. Below 527 px on the short side no DCT
scale fits a 256 target, so only the resize is faster. Over six corpus seeds of the 400-1100 px
mix the minimum is 38.25 dB (a star field). Fine textures (scikit-image brick, grass, gravel)
lose more to the cheaper filters: 41.8 / 35.2 / 34.5 dB.

Conversions (``to_rgb``): EXIF orientation applied; first frame of animations; alpha (RGBA,
LA, PA, palette or color-key transparency) composited over white, exactly
``round((c*a + 255*(255-a)) / 255)``; 16-bit data keeps its high byte (``v >> 8``), as PIL
itself decodes 16-bit RGB/RGBA PNGs, so ``v*257`` gives ``v``; mode ``I`` is read as 16-bit
when all values lie in [0, 65535] (16-bit grayscale files often decode to ``I``), else as
full-range int32 with negatives clipped; mode ``F`` and float arrays are taken as [0, 1] when
their max is <= 1, else as [0, 255], clipped and rounded.

Decompression bombs: the declared size is read from the header (``Image.open`` is lazy) and a
file above ``max_pixels``, or with a side over ``max_pixels / 16``, is refused before any pixel
is decoded (the same limits apply to PIL images, not to arrays already in memory). PIL's own
``DecompressionBombWarning``/``Error`` become per-sample errors; nothing global is changed.

Memory per in-flight sample, whatever the header says: decoding holds at most two full-size
images (the decoded source and its RGB copy, 4 bytes per pixel each plus PIL's 8-byte pointer
per row; the source is released before an EXIF transpose) and under 10 MB of band temporaries:
at most 8 bytes per declared pixel + 16 per row + 10 MB, so 815 MB at the default
``max_pixels`` (89.5 M, PIL's own limit; no side may exceed ``max_pixels / 16``, so rows add at
most one byte per pixel). Progressive JPEGs add libjpeg's coefficient buffer (2 bytes per pixel
and component): up to 12 bytes per pixel, 1.1 GB at the limit, for a progressive CMYK JPEG.
The resize intermediate never exceeds ``16 * image_size**2`` pixels (4 MB at 256), whatever the
aspect ratio. Add the encoded input itself (URLs, and JPEG files in fast mode, are read whole).
Measured peak growth, bytes per pixel of 9 MP images: baseline RGB JPEG 4.6 (fast: 0.2), RGBA
PNG with EXIF rotation 8.9, progressive RGB JPEG 10.3, progressive CMYK JPEG 12.3; 1x100000,
2x20000 and 100000x1 PNGs (whose seed resize would need 14 GB) under 4 MB and 0.02 s; a JPEG
too narrow for any DCT scale, fast mode decoding it in full (simplejpeg's array, then PIL's
copy) and turning it: 8.4. The figures scale with ``max_pixels``: lower it for a tighter bound.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal, TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._modes import (
    WHITE,
    array_to_rgb,
    jpeg_orientation,
    load_first_frame,
    mode_to_rgb,
    nested_to_array,
    orientation_of,
    owned_to_rgb,
    to_rgb,
    upright,
)
from ._open import declared_size, describe_bytes, refused_for_metadata, without_metadata
from ._resize import (
    FAMILY_PREPROCESSING,
    FAST_DESCRIPTION,
    METHOD_DESCRIPTIONS,
    draft_jpeg,
    fast_jpeg,
    jpeg_header,
    resize_by_mode,
    simplejpeg_available,
)

if TYPE_CHECKING:
    import concurrent.futures

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PREPROCESS_DESCRIPTIONS",
    "PREPROCESS_MODES",
    "ImageDecodeError",
    "ImageInput",
    "OnError",
    "Preprocess",
    "PreprocessedBatch",
    "load_image",
    "preprocess_batch",
    "to_rgb",
]

ImageInput: TypeAlias = (
    Image.Image | bytes | bytearray | memoryview | str | os.PathLike | dict | np.ndarray | list
)
OnError = Literal["raise", "skip", "null"]
Preprocess = str  # one of PREPROCESS_MODES
PREPROCESS_MODES: tuple[str, ...] = ("exact", "fast", *FAMILY_PREPROCESSING)
# One line per mode for token metadata; the fast line names every parameter of the mode.
PREPROCESS_DESCRIPTIONS = {
    "exact": METHOD_DESCRIPTIONS["lanczos_center_crop"],
    "fast": FAST_DESCRIPTION,
    **METHOD_DESCRIPTIONS,
}

# PIL's default Image.MAX_IMAGE_PIXELS, fixed here so that a caller changing PIL's global
# does not silently change our limit.
DEFAULT_MAX_PIXELS = 89_478_485
_SIDE_FRACTION = 16  # no side longer than max_pixels / 16 (5.6 M at the default)

# warnings.catch_warnings is process-global state; serialize our (short, header-only) uses.
_WARNINGS_LOCK = threading.Lock()
_DRAFT_WARNED = False  # the deprecated draft= keyword warns once per process
_JPEG_FORMATS = ("JPEG", "MPO")
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Fast mode reads a JPEG file whole for simplejpeg up to this size; larger ones stream via PIL.
_WHOLE_FILE_LIMIT = 64 << 20


class ImageDecodeError(ValueError):
    """One sample could not be turned into an image; ``.key`` names the sample, ``.reason`` why."""

    def __init__(self, reason: str, key: object = None):
        self.reason = reason
        self.key = key
        super().__init__(_describe_failure(reason, key))

    def __reduce__(self):
        return type(self), (self.reason, self.key)


def _describe_failure(reason: str, key: object) -> str:
    if key is None:
        return reason
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return f"sample {int(key)} (index): {reason}"
    return f"sample {key!r} (key): {reason}"


@dataclass
class PreprocessedBatch:
    """Result of ``preprocess_batch``: good rows stacked, plus which inputs failed and why."""

    pixels: np.ndarray  # uint8 [n_ok, S, S, 3], input order, good samples only
    ok: np.ndarray  # bool [n], which inputs produced pixels
    errors: list[str | None]  # per input: None or str(ImageDecodeError)


# ---------------------------------------------------------------------------- decoding


def _open_image(fp: IO[bytes], max_pixels: int | None) -> Image.Image:
    """Image.open with PIL's bomb warning/error turned into our error, and our own size check."""
    image, bomb = None, None
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as e:
            bomb = e
    for w in caught:  # re-emit what was not ours to swallow
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if image is not None:
        _check_pixels(image.size, max_pixels)
        return image
    size = declared_size(fp)
    if size is None:
        raise ImageDecodeError(f"refused by PIL as a decompression bomb: {bomb}")
    _check_pixels(size, max_pixels)
    raise ImageDecodeError(
        f"declared size {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels exceeds PIL's limit "
        f"2*Image.MAX_IMAGE_PIXELS={2 * (Image.MAX_IMAGE_PIXELS or 0):,}"
    )


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse more than ``max_pixels`` pixels, or a side over ``max_pixels / 16``: PIL keeps an
    8-byte pointer per row, which would cost more than the pixels of a 1-pixel-wide image."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has zero size {width}x{height}")
    if max_pixels is None:
        return
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"declared size {width}x{height} = {width * height:,} pixels exceeds "
            f"max_pixels={max_pixels:,}"
        )
    if max(width, height) > max_pixels // _SIDE_FRACTION:
        raise ImageDecodeError(
            f"declared size {width}x{height}: a side of {max(width, height):,} pixels exceeds "
            f"max_pixels/{_SIDE_FRACTION} = {max_pixels // _SIDE_FRACTION:,}"
        )


def _decode_file(
    fp: IO[bytes], source: str, image_size: int, mode: str, max_pixels: int | None
) -> np.ndarray:
    try:
        return _decode_whole(fp, source, image_size, mode, max_pixels)
    except ImageDecodeError as e:  # a PNG whose text or ICC chunks exceed PIL's limits: see _open
        if not refused_for_metadata(e.__cause__) or (stripped := without_metadata(fp)) is None:
            raise
        return _decode_whole(stripped, source, image_size, mode, max_pixels)


def _decode_whole(
    fp: IO[bytes], source: str, image_size: int, mode: str, max_pixels: int | None
) -> np.ndarray:
    named = f" {source}" if source else ""
    try:
        image = _open_image(fp, max_pixels)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot identify image file{named} ({describe_bytes(fp)})"
        ) from None
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"cannot open image{named}: {type(e).__name__}: {e}") from e
    with image:
        width, height = image.size  # the declared size: a draft shrinks image.size
        kind = image.format or "image"
        fast = mode == "fast" and kind in _JPEG_FORMATS  # other formats: decoding dominates
        try:
            orientation = orientation_of(image)
            size = (height, width) if orientation >= 5 else (width, height)  # upright
            box = draft_jpeg(image, image_size, orientation) if fast else None
            rgb = owned_to_rgb(image, orientation)
            return resize_by_mode(rgb, image_size, mode if fast or mode != "fast" else "exact",
                                  size=size, box=box)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(
                f"cannot decode {kind} {width}x{height}{named}: {type(e).__name__}: {e}"
            ) from e


def _fast_jpeg(
    data: bytes | bytearray | memoryview, source: str, image_size: int, max_pixels: int | None
) -> np.ndarray | None:
    """Fast mode for JPEG bytes through simplejpeg (the pixels of ``_decode_file``'s draft).

    None where ``_decode_file`` must run instead: no simplejpeg, not a YCbCr or grayscale JPEG,
    a size PIL would warn about (its bomb rules stay in one place), damaged data (PIL's errors).
    """
    if data[:3] != _JPEG_SIGNATURE or (header := jpeg_header(data)) is None:
        return None
    width, height, gray = header
    if width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return None
    _check_pixels((width, height), max_pixels)  # before any pixel is decoded
    if (orientation := jpeg_orientation(data)) is None:
        return None
    try:
        return fast_jpeg(data, width, height, gray, orientation, image_size)
    except Exception as e:
        named = f" {source}" if source else ""
        raise ImageDecodeError(
            f"cannot decode JPEG {width}x{height}{named}: {type(e).__name__}: {e}"
        ) from e


def _read_jpeg(fp: IO[bytes]) -> bytes | None:
    """The whole file when it is a JPEG of at most ``_WHOLE_FILE_LIMIT`` bytes; rewinds ``fp``."""
    try:
        is_jpeg = fp.read(3) == _JPEG_SIGNATURE
        size = fp.seek(0, os.SEEK_END)
        fp.seek(0)
        return fp.read() if is_jpeg and size <= _WHOLE_FILE_LIMIT else None
    except OSError:
        return None
    finally:
        fp.seek(0)


def _open_path(path: str | os.PathLike) -> tuple[IO[bytes], str]:
    """A binary file for a local path or an fsspec URL, and how to name it in errors."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if "://" in name:
        import fsspec  # lazy: only URLs need it

        try:
            with fsspec.open(name, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ImageDecodeError(f"file not found: {name!r}") from None
        except Exception as e:
            raise ImageDecodeError(f"cannot read {name!r}: {type(e).__name__}: {e}") from e
        if not data:
            raise ImageDecodeError(f"empty file: {name!r}")
        return io.BytesIO(data), repr(name)
    try:
        return open(name, "rb"), repr(name)
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {name!r}") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot open {name!r}: {e.strerror or e}") from e


def _load(image: ImageInput, image_size: int, mode: str, max_pixels: int | None) -> np.ndarray:
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        try:
            load_first_frame(image)
            rgb = mode_to_rgb(image, WHITE, keep_gray=True)
            return resize_by_mode(upright(rgb, orientation_of(image)), image_size, mode)
        except Exception as e:
            raise ImageDecodeError(
                f"cannot decode {image.format or 'PIL'} image of mode {image.mode!r} "
                f"and size {image.size[0]}x{image.size[1]}: {type(e).__name__}: {e}"
            ) from e
    if isinstance(image, np.ndarray):
        try:
            rgb = array_to_rgb(image)
        except ValueError as e:
            raise ImageDecodeError(str(e)) from None
        if rgb.shape[:2] == (image_size, image_size):
            return rgb.copy() if rgb is image else rgb
        return resize_by_mode(Image.fromarray(rgb), image_size, mode)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageDecodeError("empty bytes")
        plain = not isinstance(image, memoryview) or (image.format == "B" and image.ndim == 1)
        fast = mode == "fast" and plain
        if fast and (out := _fast_jpeg(image, "", image_size, max_pixels)) is not None:
            return out
        return _decode_file(io.BytesIO(image), "", image_size, mode, max_pixels)
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            return _load(data, image_size, mode, max_pixels)
        if path is not None:
            return _load(path, image_size, mode, max_pixels)
        raise ImageDecodeError(
            f"dict with keys {sorted(map(str, image))} has neither 'bytes' nor 'path'"
        )
    if isinstance(image, (list, tuple)):
        try:
            array = nested_to_array(image)
        except ValueError as e:
            raise ImageDecodeError(str(e)) from None
        return _load(array, image_size, mode, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        fp, source = _open_path(image)
        with fp:
            data = _read_jpeg(fp) if mode == "fast" and simplejpeg_available() else None
            out = None if data is None else _fast_jpeg(data, source, image_size, max_pixels)
            return _decode_file(fp, source, image_size, mode, max_pixels) if out is None else out
    raise ImageDecodeError(
        f"unsupported input type {type(image).__module__}.{type(image).__qualname__}; expected "
        "a PIL image, encoded bytes, a path or URL, a {'bytes', 'path'} dict, a numpy array or "
        "nested lists of numbers"
    )


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")


def _check_preprocess(preprocess: str, draft: object) -> None:
    """Validate the mode. ``draft`` (deprecated) only warns, once."""
    global _DRAFT_WARNED
    if draft is not None and not _DRAFT_WARNED:
        _DRAFT_WARNED = True
        warnings.warn(
            "draft= is deprecated and ignored: JPEG drafting moved to preprocess='fast'; the "
            "default preprocess='exact' gives the reference pixels for every input form",
            DeprecationWarning,
            stacklevel=3,
        )
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")


def load_image(
    image: ImageInput,
    image_size: int,
    *,
    key: object = None,
    preprocess: Preprocess = "exact",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool | None = None,
) -> np.ndarray:
    """Any input -> uint8 ``(image_size, image_size, 3)``, by ``preprocess`` (module docstring).

    Raises ``ImageDecodeError`` naming ``key`` on any bad input. ``max_pixels`` (None: no
    limit of ours) applies to every file and PIL image, not to arrays already in memory.
    ``draft`` is deprecated and ignored.
    """
    _check_image_size(image_size)
    _check_preprocess(preprocess, draft)
    try:
        return _load(image, int(image_size), preprocess, max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(e.reason, key) from e.__cause__
    except Exception as e:  # a decoder's own exception we did not anticipate
        raise ImageDecodeError(f"{type(e).__name__}: {e}", key) from e


def _load_one(
    image: ImageInput, key: object, *, image_size: int, preprocess: str, max_pixels: int | None
) -> tuple[np.ndarray | None, ImageDecodeError | None]:
    try:
        pixels = load_image(
            image, image_size, key=key, preprocess=preprocess, max_pixels=max_pixels
        )
        return pixels, None
    except ImageDecodeError as e:
        return None, e


def preprocess_batch(
    images: Sequence[ImageInput],
    image_size: int,
    *,
    keys: Sequence | None = None,
    on_error: OnError = "raise",
    executor: concurrent.futures.Executor | None = None,
    preprocess: Preprocess = "exact",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool | None = None,
) -> PreprocessedBatch:
    """Decode and resize a batch, on ``executor`` if given (PIL releases the GIL).

    ``on_error="raise"`` re-raises the first failure in input order; ``"skip"`` and ``"null"``
    both return the ok mask and reasons (what to do with failed rows is the caller's policy).
    Keys default to the input indices. ``draft`` is deprecated and ignored.
    """
    if on_error not in ("raise", "skip", "null"):
        raise ValueError(f"on_error must be 'raise', 'skip' or 'null', got {on_error!r}")
    _check_image_size(image_size)
    _check_preprocess(preprocess, draft)
    images = list(images)
    keys = list(range(len(images))) if keys is None else list(keys)
    if len(keys) != len(images):
        raise ValueError(f"got {len(keys)} keys for {len(images)} images")
    work = functools.partial(
        _load_one, image_size=int(image_size), preprocess=preprocess, max_pixels=max_pixels
    )
    results = executor.map(work, images, keys) if executor is not None else map(work, images, keys)
    pixels, errors = [], []
    try:
        for pixel, error in results:  # in input order
            if error is not None and on_error == "raise":
                raise error
            if pixel is not None:
                pixels.append(pixel)
            errors.append(None if error is None else str(error))
    finally:
        if hasattr(results, "close"):
            results.close()  # cancels work not yet started after a raise
    ok = np.array([e is None for e in errors], dtype=bool)
    stacked = np.stack(pixels) if pixels else np.empty((0, image_size, image_size, 3), np.uint8)
    return PreprocessedBatch(pixels=stacked, ok=ok, errors=errors)
