"""Any image input -> RGB uint8 ``(image_size, image_size, 3)``, with per-sample errors.

This is the only module that knows about image files, PIL modes, EXIF, decompression bombs and
resizing. Preprocessing is the seed's (the taming / dalle-mini notebook): resize the shortest
side to ``image_size`` with LANCZOS to ``(round(r*W), round(r*H))``, ``r = image_size/min(W, H)``
(Python's round, as the seed), then center crop with torchvision's offsets
``int(round((W' - S) / 2.0))``. Smaller images are upscaled the same way; an image that is
already ``S x S`` is not resampled.

Conversions (``to_rgb``): EXIF orientation applied; first frame of animations; alpha (RGBA,
LA, PA, palette or color-key transparency) composited over white, exactly
``round((c*a + 255*(255-a)) / 255)``; 16-bit data keeps its high byte (``v >> 8``), as PIL
itself decodes 16-bit RGB/RGBA PNGs, so ``v*257`` gives ``v``; mode ``I`` is read as 16-bit
when all values lie in [0, 65535] (16-bit grayscale files often decode to ``I``), else as
full-range int32 with negatives clipped; mode ``F`` and float arrays are taken as [0, 1] when
their max is <= 1, else as [0, 255], clipped and rounded.

JPEG draft mode (``draft=True``, the default): a JPEG whose shortest side is at least 4x
``image_size`` is decoded by libjpeg's DCT scaling at 1/2, 1/4 or 1/8 size, never below twice
the resize target, so LANCZOS still does the last >= 2x reduction; the draft's exact source box
keeps the geometry of the full decode. Only inputs this module opens are drafted, never a
caller's PIL image (a draft shrinks the object). Measured by ``benchmarks/preprocess_draft.py``
(image_size 256, JPEG q=90, whole preprocessing, one thread of a busy 2-core CPU; images/s
full -> draft, then mean / max abs difference and PSNR vs the full decode):

    photos up to 1023 px (not drafted)  identical
    astronaut, camera 2048x2048         7.5-10.5 -> 35-51   0.34-0.40 / 6-7   50.8-51.7 dB
    coffee 3000x2000                    5.3 -> 17.3         0.16 / 3          56.2 dB
    chelsea 2047x1361 (odd size)        14.1 -> 34.9        0.21 / 2          54.8 dB

Drafting straight to the target size was 4-9x faster but only 39-42 dB from the full decode
(max differences up to 44 levels), so we keep the 2x margin; ``draft=False`` gives the seed's
pixels exactly.

Decompression bombs: the declared size is read from the header (``Image.open`` is lazy) and a
file above ``max_pixels`` is refused before any pixel is decoded. PIL's own
``DecompressionBombWarning``/``Error`` become per-sample errors; nothing global is changed.
"""

from __future__ import annotations

import functools
import io
import numbers
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal, TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import concurrent.futures

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageInput",
    "OnError",
    "PreprocessedBatch",
    "load_image",
    "preprocess_batch",
    "to_rgb",
]

ImageInput: TypeAlias = (
    Image.Image | bytes | bytearray | memoryview | str | os.PathLike | dict | np.ndarray
)
OnError = Literal["raise", "skip", "null"]

# PIL's default Image.MAX_IMAGE_PIXELS, fixed here so that a caller changing PIL's global
# does not silently change our limit.
DEFAULT_MAX_PIXELS = 89_478_485

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA")
_PREMULTIPLIED_MODES = ("RGBa", "La")
# warnings.catch_warnings is process-global state; serialize our (short, header-only) uses.
_WARNINGS_LOCK = threading.Lock()


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


# --------------------------------------------------------------------------- modes -> RGB


def to_rgb(image: Image.Image, *, background: Sequence[int] = _WHITE) -> Image.Image:
    """Any PIL image -> RGB (upright first frame, alpha over ``background``).

    Mode rules are in the module docstring. May return ``image`` itself when it is already an
    upright RGB first frame; seeks an animated image back to frame 0 and loads it.
    """
    bg = _check_background(background)
    if image.tell() != 0:
        image.seek(0)
    image.load()
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return _mode_to_rgb(image, bg)


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(v) for v in background)
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise ValueError(f"background must be 3 values in [0, 255], got {background!r}")
    return bg


def _orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation 1-8; 1 when absent or unreadable (corrupt EXIF is common)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if value in range(1, 9) else 1


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _mode_to_rgb(image: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(_uint16_to_uint8(np.asarray(image)))
    if mode == "I":
        return _gray_to_rgb(_int32_to_uint8(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(image)))
    if mode in _PREMULTIPLIED_MODES:
        return Image.fromarray(_composite_premultiplied(np.asarray(image), bg))
    if _has_transparency(image):
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        return Image.fromarray(_composite(np.asarray(rgba), bg))
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"unsupported image mode {mode!r}: {e}") from e


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    # The high byte, as PIL decodes 16-bit RGB(A) PNGs: v*257 -> v for every v in 0..255.
    return (a >> 8).astype(np.uint8)


def _int32_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.size and a.min() >= 0 and a.max() <= 65535:
        return _uint16_to_uint8(a)
    return (np.clip(a.astype(np.int64), 0, None) >> 23).astype(np.uint8)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all():
        raise ValueError("float pixels contain NaN or infinity")
    a = a.astype(np.float32, copy=False)
    if a.max() <= 1.0 + 1e-6:
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


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    expected = "expected HxW or HxWxC with C in (1, 3, 4), dtype uint8, uint16, bool or float"
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) or a.size == 0:
        raise ImageDecodeError(f"array of shape {a.shape} and dtype {a.dtype}: {expected}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * np.uint8(255)
    elif a.dtype == np.uint16:
        a = _uint16_to_uint8(a)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageDecodeError(
                f"array of shape {a.shape} and dtype {a.dtype} contains NaN or infinity"
            )
        a = _float_to_uint8(a)
    else:
        raise ImageDecodeError(f"array of shape {a.shape} and dtype {a.dtype}: {expected}")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        return _composite(a, _WHITE)
    return np.ascontiguousarray(a)


# ------------------------------------------------------------------------ resize and crop


def _target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The seed's resize target; Python's round (half to even) on purpose, as the seed."""
    r = image_size / min(width, height)
    return round(r * width), round(r * height)


def _resize_crop(
    image: Image.Image,
    image_size: int,
    target: tuple[int, int] | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    if target is None:
        target = _target_size(*image.size, image_size)
    if image.size != target or box is not None:
        image = image.resize(target, Image.Resampling.LANCZOS, box=box)
    width, height = target
    if target != (image_size, image_size):
        left = int(round((width - image_size) / 2.0))
        top = int(round((height - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.array(image, dtype=np.uint8)


def _draft_box_upright(box, drafted_size: tuple[int, int], orientation: int):
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
    size = _declared_size(fp)
    if size is None:
        raise ImageDecodeError(f"refused by PIL as a decompression bomb: {bomb}")
    _check_pixels(size, max_pixels)
    raise ImageDecodeError(
        f"declared size {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels exceeds PIL's limit "
        f"2*Image.MAX_IMAGE_PIXELS={2 * (Image.MAX_IMAGE_PIXELS or 0):,}"
    )


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has zero size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"declared size {width}x{height} = {width * height:,} pixels exceeds "
            f"max_pixels={max_pixels:,}"
        )


def _declared_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """Header size of a file PIL refused to open, for the error message only.

    Runs the format plugins' header parsers as Image.open does, minus its bomb check;
    nothing is decoded.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, "").size
            except Exception:
                continue
    except Exception:
        return None
    return None


def _describe_bytes(fp: IO[bytes]) -> str:
    try:
        size = fp.seek(0, os.SEEK_END)
        fp.seek(0)
        return f"{size} bytes, starts with {fp.read(16)!r}"
    except Exception:
        return "unreadable"


def _decode_file(
    fp: IO[bytes], source: str, image_size: int, draft: bool, max_pixels: int | None
) -> np.ndarray:
    named = f" {source}" if source else ""
    try:
        image = _open_image(fp, max_pixels)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot identify image file{named} ({_describe_bytes(fp)})"
        ) from None
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError(f"cannot open image{named}: {type(e).__name__}: {e}") from e
    with image:
        width, height = image.size  # the declared size: a draft shrinks image.size
        try:
            return _pil_to_pixels(image, image_size, draft=draft)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(
                f"cannot decode {image.format or 'image'} {width}x{height}{named}: "
                f"{type(e).__name__}: {e}"
            ) from e


# A JPEG is drafted only when DCT scaling can skip at least one halving.
_DRAFT_FACTOR = 4


def _pil_to_pixels(image: Image.Image, image_size: int, *, draft: bool) -> np.ndarray:
    """Decode an image we opened ourselves, drafting large JPEGs."""
    width, height = image.size
    if (
        draft
        and image.format in ("JPEG", "MPO")
        and image.tell() == 0
        and min(width, height) >= _DRAFT_FACTOR * image_size
    ):
        orientation = _orientation(image)
        tw, th = _target_size(width, height, image_size)
        # Ask libjpeg for at least twice the target, so LANCZOS still does the last >= 2x
        # reduction (a draft straight to the target size left 39-42 dB against a full decode).
        drafted = image.draft("RGB", (2 * tw, 2 * th))
        if drafted is not None and image.size != (width, height):
            box = _draft_box_upright(drafted[1], image.size, orientation)
            target = (th, tw) if orientation >= 5 else (tw, th)
            return _resize_crop(to_rgb(image), image_size, target, box)
    return _resize_crop(to_rgb(image), image_size)


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


def _load(image: ImageInput, image_size: int, draft: bool, max_pixels: int | None) -> np.ndarray:
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        try:
            return _resize_crop(to_rgb(image), image_size)
        except Exception as e:
            raise ImageDecodeError(
                f"cannot decode {image.format or 'PIL'} image of mode {image.mode!r} "
                f"and size {image.size[0]}x{image.size[1]}: {type(e).__name__}: {e}"
            ) from e
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
        if rgb.shape[:2] == (image_size, image_size):
            return rgb.copy() if rgb is image else rgb
        return _resize_crop(Image.fromarray(rgb), image_size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageDecodeError("empty bytes")
        return _decode_file(io.BytesIO(image), "", image_size, draft, max_pixels)
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            return _load(data, image_size, draft, max_pixels)
        if path is not None:
            return _load(path, image_size, draft, max_pixels)
        raise ImageDecodeError(
            f"dict with keys {sorted(map(str, image))} has neither 'bytes' nor 'path'"
        )
    if isinstance(image, (str, os.PathLike)):
        fp, source = _open_path(image)
        with fp:
            return _decode_file(fp, source, image_size, draft, max_pixels)
    raise ImageDecodeError(
        f"unsupported input type {type(image).__module__}.{type(image).__qualname__}; expected "
        "a PIL image, encoded bytes, a path or URL, a {'bytes', 'path'} dict or a numpy array"
    )


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")


def load_image(
    image: ImageInput,
    image_size: int,
    *,
    key: object = None,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Any input -> uint8 ``(image_size, image_size, 3)``.

    Raises ``ImageDecodeError`` naming ``key`` on any bad input. ``max_pixels`` (None: no
    limit of ours) applies to every file and PIL image, not to arrays already in memory.
    """
    _check_image_size(image_size)
    try:
        return _load(image, int(image_size), draft, max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(e.reason, key) from e.__cause__
    except Exception as e:  # a decoder's own exception we did not anticipate
        raise ImageDecodeError(f"{type(e).__name__}: {e}", key) from e


def _load_one(
    image: ImageInput, key: object, *, image_size: int, draft: bool, max_pixels: int | None
) -> tuple[np.ndarray | None, ImageDecodeError | None]:
    try:
        return load_image(image, image_size, key=key, draft=draft, max_pixels=max_pixels), None
    except ImageDecodeError as e:
        return None, e


def preprocess_batch(
    images: Sequence[ImageInput],
    image_size: int,
    *,
    keys: Sequence | None = None,
    on_error: OnError = "raise",
    executor: concurrent.futures.Executor | None = None,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> PreprocessedBatch:
    """Decode and resize a batch, on ``executor`` if given (PIL releases the GIL).

    ``on_error="raise"`` re-raises the first failure in input order; ``"skip"`` and ``"null"``
    both return the ok mask and reasons (what to do with failed rows is the caller's policy).
    Keys default to the input indices.
    """
    if on_error not in ("raise", "skip", "null"):
        raise ValueError(f"on_error must be 'raise', 'skip' or 'null', got {on_error!r}")
    _check_image_size(image_size)
    images = list(images)
    keys = list(range(len(images))) if keys is None else list(keys)
    if len(keys) != len(images):
        raise ValueError(f"got {len(keys)} keys for {len(images)} images")
    work = functools.partial(
        _load_one, image_size=int(image_size), draft=draft, max_pixels=max_pixels
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
