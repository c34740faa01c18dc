"""images.py: every input kind and PIL mode against a clean RGB reference; errors and policies."""

from __future__ import annotations

import concurrent.futures
import io
import json
import pathlib
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features
from skimage import data

from vqgan_datasets.pipeline import _resize
from vqgan_datasets.pipeline.images import (
    DEFAULT_MAX_PIXELS,
    PREPROCESS_DESCRIPTIONS,
    PREPROCESS_MODES,
    ImageDecodeError,
    PreprocessedBatch,
    load_image,
    preprocess_batch,
    to_rgb,
)

S = 64
LANCZOS = Image.Resampling.LANCZOS


# ------------------------------------------------------------------------------ helpers


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def reference(image: Image.Image, size: int = S) -> np.ndarray:
    """The seed's preprocessing written out: round() sizes, LANCZOS, torchvision crop offsets."""
    w, h = image.size
    r = size / min(w, h)
    new = (round(r * w), round(r * h))
    if new != image.size:
        image = image.resize(new, LANCZOS)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing by hand, in floats."""
    a = rgba[..., 3:].astype(np.float64) / 255.0
    return np.round(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: openable lazily only."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "camera": data.camera(),  # grayscale HxW
    }


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    """A non-square RGB photo, small enough to keep every test quick."""
    return np.asarray(Image.fromarray(data.chelsea()).resize((150, 100), LANCZOS))


# ------------------------------------------------------------------- resize and crop


def test_resize_and_crop_by_hand():
    src = Image.fromarray(data.coffee()).resize((300, 200), LANCZOS)
    # r = 64/200: 300x200 -> 96x64, left offset (96 - 64) / 2 = 16
    expected = np.asarray(src.resize((96, 64), LANCZOS))[:, 16:80]
    out = load_image(src, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "size, resized, offset",
    [
        ((193, 128), (96, 64), (16, 0)),  # 96.5 rounds to 96, as Python's round in the seed
        ((303, 200), (97, 64), (16, 0)),  # left = round(16.5) = 16, as torchvision
        ((200, 303), (64, 97), (0, 16)),
        ((64, 64), (64, 64), (0, 0)),
    ],
)
def test_sizes_and_offsets_follow_the_seed(size, resized, offset):
    src = Image.fromarray(data.astronaut()).resize(size, LANCZOS)
    step = src if resized == size else src.resize(resized, LANCZOS)
    left, top = offset
    expected = np.asarray(step)[top : top + 64, left : left + 64]
    np.testing.assert_array_equal(load_image(src, 64), expected)


def test_exact_size_is_not_resampled(photos):
    pixels = np.ascontiguousarray(photos["astronaut"][:S, 100 : 100 + S])
    out = load_image(pixels, S)
    np.testing.assert_array_equal(out, pixels)
    assert out is not pixels and out.flags.writeable
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(pixels), "PNG"), S), pixels)


def test_one_pixel_image_is_upscaled():
    out = load_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), S)
    assert out.shape == (S, S, 3)
    assert np.all(out == np.array([10, 20, 30], np.uint8))


# ------------------------------------------------------------------------ input kinds


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_every_input_kind_gives_the_same_pixels(photos, name, tmp_path):
    pixels = photos[name]
    image = Image.fromarray(pixels)
    expected = reference(image.convert("RGB"))
    png = encode(image, "PNG")
    path = tmp_path / f"{name}.png"
    path.write_bytes(png)
    inputs = {
        "pil": image,
        "lazy pil": Image.open(io.BytesIO(png)),
        "bytes": png,
        "bytearray": bytearray(png),
        "memoryview": memoryview(png),
        "str path": str(path),
        "pathlib": path,
        "file url": path.as_uri(),
        "dict bytes": {"bytes": png, "path": None},
        "dict bytes first": {"bytes": png, "path": str(tmp_path / "missing.png")},
        "dict path": {"bytes": None, "path": str(path)},
        "array": pixels,
    }
    if pixels.ndim == 2:
        inputs["array HxWx1"] = pixels[..., None]
        inputs["array HxWx3"] = np.repeat(pixels[..., None], 3, axis=2)
    for kind, value in inputs.items():
        out = load_image(value, S)
        assert out.shape == (S, S, 3) and out.dtype == np.uint8, kind
        np.testing.assert_array_equal(out, expected, err_msg=kind)


def test_fsspec_memory_url(small):
    import fsspec

    png = encode(Image.fromarray(small), "PNG")
    with fsspec.open("memory://vqgan-datasets-test/cat.png", "wb") as f:
        f.write(png)
    out = load_image("memory://vqgan-datasets-test/cat.png", S)
    np.testing.assert_array_equal(out, reference(Image.fromarray(small)))
    with pytest.raises(ImageDecodeError, match="file not found: 'memory://nowhere/x.png'"):
        load_image("memory://nowhere/x.png", S)


def test_jpeg_from_disk_matches_decoded_pixels(photos, tmp_path):
    path = tmp_path / "coffee.jpg"
    path.write_bytes(encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90))
    expected = reference(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(load_image(path, S), expected)  # exact: never drafted
    fast = load_image(path, S, preprocess="fast")  # 600x400 >= 2*64: drafted
    assert not np.array_equal(fast, expected) and psnr(fast, expected) > 35


# ----------------------------------------------------------------------------- modes


def test_grayscale_png_equals_replicated_rgb(photos):
    gray = photos["camera"]
    out = load_image(encode(Image.fromarray(gray), "PNG"), S)
    rgb = Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(out, reference(rgb))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_sixteen_bit_data_scales_to_eight_bit(photos):
    gray = photos["camera"]
    expected = load_image(gray, S)
    wide = gray.astype(np.uint16) * 257
    png16 = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    np.testing.assert_array_equal(load_image(png16, S), expected)
    np.testing.assert_array_equal(load_image(wide, S), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(wide.astype(np.int32)), S), expected)
    big_endian = Image.fromarray(wide).convert("I").convert("I;16B")
    np.testing.assert_array_equal(load_image(big_endian, S), expected)


def test_rgba_png_and_array_composite_over_white(photos):
    rgb = photos["astronaut"]
    h, w = rgb.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    alpha[:, : w // 4] = 0  # a fully transparent band must come out white
    rgba = np.dstack([rgb, alpha])
    expected = reference(Image.fromarray(over_white(rgba)))
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(rgba), "PNG"), S), expected)
    np.testing.assert_array_equal(load_image(rgba, S), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba), S), expected)


def test_palette_with_transparency_equals_hand_composite(photos):
    palette_image = Image.fromarray(photos["chelsea"]).quantize(64)
    indices = np.asarray(palette_image)
    transparent = int(np.bincount(indices.ravel()).argmax())  # the most used color
    png = encode(palette_image, "PNG", transparency=transparent)
    reopened = Image.open(io.BytesIO(png))
    assert reopened.mode == "P" and reopened.info["transparency"] == transparent
    rgba = np.asarray(reopened.convert("RGBA"))
    assert (rgba[..., 3] == 0).mean() > 0.01
    expected = reference(Image.fromarray(over_white(rgba)))
    np.testing.assert_array_equal(load_image(png, S), expected)


def test_la_and_pa_composite_over_white(small):
    gray = np.asarray(Image.fromarray(small).convert("L"))
    alpha = np.tile(np.linspace(0, 255, gray.shape[1]).astype(np.uint8), (gray.shape[0], 1))
    la = Image.fromarray(np.dstack([gray, alpha]))
    assert la.mode == "LA"
    expected = reference(Image.fromarray(over_white(np.asarray(la.convert("RGBA")))))
    np.testing.assert_array_equal(load_image(encode(la, "PNG"), S), expected)
    pa = Image.fromarray(small).quantize(32)
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA"
    expected = reference(Image.fromarray(over_white(np.asarray(pa.convert("RGBA")))))
    np.testing.assert_array_equal(load_image(pa, S), expected)


def test_cmyk_jpeg(photos):
    jpeg = encode(Image.fromarray(photos["coffee"]).convert("CMYK"), "JPEG", quality=90)
    decoded = Image.open(io.BytesIO(jpeg))
    assert decoded.mode == "CMYK"
    out = load_image(jpeg, S)
    np.testing.assert_array_equal(out, reference(decoded.convert("RGB")))
    assert psnr(out, load_image(photos["coffee"], S)) > 25  # colors survive the round trip
    assert psnr(load_image(jpeg, S, preprocess="fast"), out) > 35  # drafted CMYK


ORIENTED = {  # EXIF orientation -> how the stored pixels must be turned to stand upright
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif)


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(small, orientation):
    jpeg = jpeg_with_orientation(Image.fromarray(small), orientation)
    stored = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # PIL does not rotate
    upright = np.ascontiguousarray(ORIENTED[orientation](stored))
    out = load_image(jpeg, S)
    np.testing.assert_array_equal(out, reference(Image.fromarray(upright)))
    if orientation == 6:
        assert upright.shape[:2] == (150, 100)
        assert not np.array_equal(out, reference(Image.fromarray(stored)))


def test_animated_gif_uses_first_frame(small):
    frames = [Image.fromarray(small), Image.fromarray(small[::-1, ::-1])]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    opened = Image.open(io.BytesIO(gif))
    assert opened.n_frames == 2
    first = reference(opened.convert("RGB"))
    opened.seek(1)
    second = reference(opened.convert("RGB"))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(load_image(gif, S), first)
    np.testing.assert_array_equal(load_image(opened, S), first)  # seeked to frame 1 by a caller


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_use_first_frame(small, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    frames = [Image.fromarray(small), Image.fromarray(255 - small)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    encoded = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
    assert Image.open(io.BytesIO(encoded)).n_frames == 2
    np.testing.assert_array_equal(load_image(encoded, S), reference(frames[0]))


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"]
)
def test_to_rgb_handles_every_8bit_mode(small, mode):
    image = Image.fromarray(small).convert(mode) if mode != "PA" else None
    if mode == "PA":
        image = Image.fromarray(small).quantize(16)
        image.putalpha(128)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size


def test_to_rgb_wide_modes():
    values = np.array([[0, 1, 128, 255]], np.uint8)
    expected = np.repeat(values[..., None], 3, axis=2)
    wide = values.astype(np.uint16) * 257
    for image in [
        Image.fromarray(wide),  # I;16
        Image.fromarray(wide.astype(np.int32)),  # I holding 16-bit data
        Image.fromarray(values.astype(np.float32) / 255.0),  # F in [0, 1]
        Image.fromarray(values.astype(np.float32)),  # F in [0, 255]
    ]:
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected, err_msg=image.mode)
    full_range = Image.fromarray(np.array([[-5, 0, 2**30, 2**31 - 1]], np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(full_range))[0, :, 0], [0, 0, 128, 255])
    clipped = Image.fromarray(np.array([[-3.0, 300.0]], np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(clipped))[0, :, 0], [0, 255])


def test_to_rgb_premultiplied_and_background(small):
    rgba = np.dstack([small, np.full(small.shape[:2], 128, np.uint8)])
    image = Image.fromarray(rgba)
    straight = np.asarray(to_rgb(image))
    premultiplied = np.asarray(to_rgb(image.convert("RGBa")))
    assert np.abs(straight.astype(int) - premultiplied.astype(int)).max() <= 1
    clear = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    assert np.all(np.asarray(to_rgb(clear)) == 255)
    assert np.all(np.asarray(to_rgb(clear, background=(0, 0, 0))) == 0)
    with pytest.raises(ValueError, match="background"):
        to_rgb(clear, background=(0, 0))


def test_float_and_bool_arrays(photos):
    rgb = photos["astronaut"]
    expected = load_image(rgb, S)
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255.0, S), expected)
    np.testing.assert_array_equal(load_image(rgb.astype(np.float64), S), expected)
    mask = photos["camera"] > 128
    np.testing.assert_array_equal(
        load_image(mask, S), load_image(mask.astype(np.uint8) * np.uint8(255), S)
    )


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((2, 8, 8, 3), np.uint8),
        np.zeros((8,), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
        np.zeros((8, 8, 3), np.int64),
        np.full((8, 8), np.nan, np.float32),
    ],
)
def test_bad_arrays_name_shape_and_dtype(array):
    with pytest.raises(ImageDecodeError) as info:
        load_image(array, S, key=7)
    message = str(info.value)
    assert message.startswith("sample 7 (index): array of shape")
    assert str(array.shape) in message and str(array.dtype) in message


# ---------------------------------------------------------------------------- errors


def test_error_message_format_and_pickling():
    err = ImageDecodeError("cannot identify image file (12 bytes, starts with b'hello')", "abc")
    assert str(err) == (
        "sample 'abc' (key): cannot identify image file (12 bytes, starts with b'hello')"
    )
    assert isinstance(err, ValueError) and err.key == "abc"
    assert str(ImageDecodeError("why", 3)) == "sample 3 (index): why"
    assert str(ImageDecodeError("why")) == "why"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.key, copy.reason, str(copy)) == (err.key, err.reason, str(err))


def test_bad_inputs_name_the_key_and_reason(photos, tmp_path):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"just some text\n")
    cases = [
        (b"", "empty bytes"),
        (b"hello world!", "cannot identify image file (12 bytes, starts with b'hello world!')"),
        (jpeg[: len(jpeg) // 2], "cannot decode JPEG 600x400: OSError: image file is truncated"),
        (str(tmp_path / "missing.png"), f"file not found: {str(tmp_path / 'missing.png')!r}"),
        (text, f"cannot identify image file {str(text)!r} (15 bytes"),
        ({"bytes": None, "path": None}, "has neither 'bytes' nor 'path'"),
        ({"bytes": b"", "path": None}, "empty bytes"),
        (3.5, "unsupported input type builtins.float"),
        ([1, 2, 3], "give dtype int64 (shape (3,))"),
        ({1, 2}, "unsupported input type builtins.set"),
    ]
    for value, reason in cases:
        with pytest.raises(ImageDecodeError) as info:
            load_image(value, S, key="k1")
        assert info.value.key == "k1"
        assert str(info.value).startswith("sample 'k1' (key): ")
        assert reason in str(info.value), str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_lazy_pil_image_with_truncated_data_is_an_error(photos):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)
    lazy = Image.open(io.BytesIO(jpeg[: len(jpeg) // 2]))
    with pytest.raises(ImageDecodeError, match=r"sample 4 \(index\): cannot decode JPEG .*trunc"):
        load_image(lazy, S, key=4)


def test_invalid_arguments_are_not_sample_errors(small):
    with pytest.raises(ValueError, match="image_size"):
        load_image(small, 0)
    with pytest.raises(TypeError, match="image_size"):
        load_image(small, 64.0)
    with pytest.raises(ValueError, match="on_error"):
        preprocess_batch([small], S, on_error="ignore")
    with pytest.raises(ValueError, match="2 keys for 1 images"):
        preprocess_batch([small], S, keys=["a", "b"])


# ---------------------------------------------------------------- decompression bombs


def test_bomb_header_is_refused_before_decoding(tmp_path):
    bomb = png_header(30000, 30000)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    message = "declared size 30000x30000 = 900,000,000 pixels exceeds max_pixels=89,478,485"
    for value in (bomb, path):
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError) as info:
            load_image(value, S, key="huge")
        assert time.perf_counter() - start < 1.0
        assert str(info.value) == f"sample 'huge' (key): {message}"
    assert DEFAULT_MAX_PIXELS == 89_478_485
    # without our limit, PIL's own error is still a per-sample error
    with pytest.raises(ImageDecodeError, match=r"30000x30000 = 900,000,000 pixels exceeds PIL"):
        load_image(bomb, S, max_pixels=None)
    assert limit == Image.MAX_IMAGE_PIXELS


def test_pil_bomb_warning_does_not_escape():
    bomb = png_header(10000, 10000)  # above PIL's warning limit, below its error limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match="10000x10000 = 100,000,000 pixels exceeds"):
            load_image(bomb, S)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_side_longer_than_max_pixels_over_16_is_refused():
    # 6 M pixels, but PIL would keep 48 MB of row pointers per copy of a 1-pixel-wide image.
    for size in [(1, 6_000_000), (6_000_000, 1)]:
        with pytest.raises(ImageDecodeError) as info:
            load_image(png_header(*size), S, key="tall")
        assert str(info.value) == (
            f"sample 'tall' (key): declared size {size[0]}x{size[1]}: a side of 6,000,000 "
            "pixels exceeds max_pixels/16 = 5,592,405"
        )


def test_max_pixels_is_per_call(small):
    png = encode(Image.fromarray(small), "PNG")
    message = "declared size 150x100 = 15,000 pixels exceeds max_pixels=1,000"
    with pytest.raises(ImageDecodeError, match=message):
        load_image(png, S, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match=message):
        load_image(Image.fromarray(small), S, max_pixels=1000)
    assert load_image(png, S, max_pixels=15_000).shape == (S, S, 3)


# ------------------------------------------------------------ exact and fast preprocessing


@pytest.fixture(scope="module")
def large_jpegs(photos) -> dict[str, bytes]:
    """Real photos upscaled past 1,249 px on the short side, as JPEG q=90."""
    sizes = {"astronaut": (1300, 1300), "chelsea": (1879, 1250), "coffee": (1950, 1300)}
    return {
        name: encode(Image.fromarray(photos[name]).resize(size, LANCZOS), "JPEG", quality=90)
        for name, size in sizes.items()
    }


def test_preprocess_modes_are_validated(small):
    assert PREPROCESS_MODES[:2] == ("exact", "fast")  # then the families' own, by name
    assert "adm_center_crop" in PREPROCESS_MODES
    assert set(PREPROCESS_DESCRIPTIONS) == set(PREPROCESS_MODES)
    assert "1/4 (sides >= 1.05x target)" in PREPROCESS_DESCRIPTIONS["fast"]  # its parameters
    with pytest.raises(ValueError, match=r"preprocess must be one of \('exact', 'fast', "):
        load_image(small, S, preprocess="draft")
    with pytest.raises(ValueError, match="preprocess must be one of"):
        preprocess_batch([small], S, preprocess="quick")


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_exact_gives_the_same_pixels_for_every_form_of_a_large_jpeg(large_jpegs, name, tmp_path):
    jpeg = large_jpegs[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(jpeg)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    expected = reference(decoded, 256)
    inputs = {
        "bytes": jpeg,
        "path": path,
        "dict bytes": {"bytes": jpeg, "path": None},
        "dict path": {"bytes": None, "path": str(path)},
        "lazy pil": Image.open(io.BytesIO(jpeg)),
        "decoded pil": decoded,
        "array": np.asarray(decoded),
    }
    for kind, value in inputs.items():
        np.testing.assert_array_equal(load_image(value, 256), expected, err_msg=kind)
    batch = preprocess_batch(list(inputs.values()), 256, preprocess="exact")
    np.testing.assert_array_equal(batch.pixels, np.stack([expected] * len(inputs)))


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_fast_is_close_to_exact_on_real_photos(large_jpegs, name, tmp_path):
    jpeg = large_jpegs[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(jpeg)
    exact = load_image(jpeg, 256)
    fast = load_image(jpeg, 256, preprocess="fast")
    assert fast.shape == (256, 256, 3) and fast.dtype == np.uint8 and fast.flags.writeable
    assert not np.array_equal(fast, exact), "the JPEG was not drafted"
    assert psnr(fast, exact) >= 38.0
    for value in (path, {"bytes": jpeg, "path": None}, {"bytes": None, "path": str(path)}):
        np.testing.assert_array_equal(load_image(value, 256, preprocess="fast"), fast)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")  # decoded inputs: the fast resize
    fast_decoded = load_image(decoded, 256, preprocess="fast")
    np.testing.assert_array_equal(load_image(np.asarray(decoded), 256, preprocess="fast"),
                                  fast_decoded)
    assert psnr(fast_decoded, exact) >= 38.0


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_fast_equals_exact_for_other_formats(photos, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    image = Image.fromarray(photos["coffee"]).resize((900, 600), LANCZOS)
    encoded = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    exact = load_image(encoded, 256)
    np.testing.assert_array_equal(load_image(encoded, 256, preprocess="fast"), exact)
    batch = preprocess_batch([encoded], 256, preprocess="fast")
    np.testing.assert_array_equal(batch.pixels[0], exact)


def test_fast_draft_keeps_the_geometry_for_every_orientation(photos):
    # An odd size, so libjpeg's partial last block lands on a different side per orientation.
    base = Image.fromarray(photos["chelsea"]).resize((1021, 679), LANCZOS)
    for orientation in sorted(ORIENTED):
        jpeg = jpeg_with_orientation(base, orientation)
        exact = load_image(jpeg, S)
        fast = load_image(jpeg, S, preprocess="fast")
        assert not np.array_equal(exact, fast), "draft was not applied"
        assert psnr(exact, fast) > 38, orientation  # a misplaced box would be far below


def test_callers_pil_image_is_not_drafted(photos):
    jpeg = encode(Image.fromarray(photos["astronaut"]), "JPEG", quality=90)
    lazy = Image.open(io.BytesIO(jpeg))
    fast = load_image(lazy, S, preprocess="fast")
    assert lazy.size == (512, 512)  # a draft would have shrunk the caller's object
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    np.testing.assert_array_equal(fast, load_image(decoded, S, preprocess="fast"))
    np.testing.assert_array_equal(load_image(Image.open(io.BytesIO(jpeg)), S), load_image(jpeg, S))


def test_draft_skipped_below_twice_the_size(photos):
    # 127x100 at S=64: the 1/2 scale would fall below the 81x64 target, so the JPEG is decoded
    # in full and only resized fast, exactly as the same image handed in decoded.
    jpeg = encode(Image.fromarray(photos["chelsea"]).resize((127, 100)), "JPEG", quality=90)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")
    np.testing.assert_array_equal(
        load_image(jpeg, S, preprocess="fast"), load_image(decoded, S, preprocess="fast")
    )


# ---------------------------------------------- fast JPEG decoding: simplejpeg or PIL's draft

XMP_ORIENTATION_6 = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
    b'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


@pytest.fixture
def simplejpeg_decodes(monkeypatch) -> list:
    """Records every simplejpeg decode (fast mode's JPEG path when simplejpeg is installed)."""
    simplejpeg = pytest.importorskip("simplejpeg")
    assert _resize.simplejpeg is simplejpeg
    calls, decode = [], simplejpeg.decode_jpeg

    def recording(data, **kwargs):
        calls.append((kwargs["min_width"], kwargs["min_height"]))
        return decode(data, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", recording)
    return calls


def fast_through_pil(monkeypatch, value, size: int = S, **kwargs) -> np.ndarray:
    """Fast mode as it runs where simplejpeg is not installed: PIL's draft."""
    with monkeypatch.context() as patch:
        patch.setattr(_resize, "simplejpeg", None)
        return load_image(value, size, preprocess="fast", **kwargs)


def test_fast_jpeg_pixels_do_not_depend_on_simplejpeg(photos, simplejpeg_decodes, monkeypatch,
                                                      tmp_path):
    # Both run libjpeg-turbo at the same DCT scale: the same pixels at every scale, for
    # grayscale, progressive, 4:4:4, 4:2:2 and MPO files, EXIF and XMP orientations, bytes,
    # bytearrays, memoryviews and paths.
    chelsea, camera = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["camera"])
    cases = {  # at S=64: full size, 1/2, 1/4, 1/8
        "full": encode(chelsea.resize((110, 90)), "JPEG", quality=90),
        "1/2": encode(chelsea.resize((301, 199)), "JPEG", quality=90),
        "1/4": encode(chelsea.resize((603, 401)), "JPEG", quality=90),
        "1/8 gray": encode(camera.resize((1021, 679)), "JPEG", quality=90),
        "1/2 progressive": encode(chelsea.resize((301, 199)), "JPEG", progressive=True),
        "1/4 4:4:4": encode(chelsea.resize((603, 401)), "JPEG", subsampling=0),
        "1/2 4:2:2": encode(chelsea.resize((301, 199)), "JPEG", subsampling=1),
        "1/4 mpo": encode(chelsea.resize((603, 401)), "MPO", save_all=True,
                          append_images=[camera.resize((603, 401))]),
        "1/8 exif 6": jpeg_with_orientation(chelsea.resize((1021, 679)), 6),
        "1/2 exif 7": jpeg_with_orientation(chelsea.resize((301, 199)), 7),
        "full exif 3": jpeg_with_orientation(chelsea.resize((110, 90)), 3),
        "1/4 xmp 6": encode(chelsea.resize((603, 401)), "JPEG", xmp=XMP_ORIENTATION_6),
    }
    scales = {"full": 1, "1/2": 2, "1/4": 4, "1/8": 8}
    for name, jpeg in cases.items():
        width, height = Image.open(io.BytesIO(jpeg)).size
        scale = scales[name.split()[0]]
        through_pil = fast_through_pil(monkeypatch, jpeg)
        path = tmp_path / "image.jpg"
        path.write_bytes(jpeg)
        for value in (jpeg, bytearray(jpeg), memoryview(jpeg), path):
            simplejpeg_decodes.clear()
            np.testing.assert_array_equal(load_image(value, S, preprocess="fast"), through_pil,
                                          err_msg=name)
            assert simplejpeg_decodes == [(-(-width // scale), -(-height // scale))], name
    upright = np.rot90(np.asarray(chelsea.resize((603, 401))), -1)  # XMP orientation applied
    assert psnr(fast_through_pil(monkeypatch, cases["1/4 xmp 6"]), reference(
        Image.fromarray(np.ascontiguousarray(upright)))) > 35


def test_fast_mode_leaves_other_and_damaged_jpegs_to_pil(photos, simplejpeg_decodes,
                                                          monkeypatch):
    coffee = Image.fromarray(photos["coffee"])
    jpeg = encode(coffee, "JPEG", quality=90)
    cmyk = encode(coffee.convert("CMYK"), "JPEG", quality=90)  # simplejpeg: not as PIL does
    np.testing.assert_array_equal(load_image(cmyk, S, preprocess="fast"),
                                  fast_through_pil(monkeypatch, cmyk))
    assert simplejpeg_decodes == []
    # libjpeg recovers from stray bytes before a marker and warns: PIL's pixels, as without it
    marker = jpeg.index(b"\xff\xc4")
    stray = jpeg[:marker] + b"\x00\x00" + jpeg[marker:]
    np.testing.assert_array_equal(load_image(stray, S, preprocess="fast"),
                                  fast_through_pil(monkeypatch, stray))
    # Truncated data and a bare signature fail with PIL's reasons, as in exact mode.
    damaged = {
        jpeg[: len(jpeg) // 2]: "cannot decode JPEG 600x400: OSError: image file is truncated",
        jpeg[:500]: "cannot open image: OSError: Truncated File Read",
        b"\xff\xd8\xff" + b"x" * 40: "cannot identify image file (43 bytes",
    }
    for value, reason in damaged.items():
        with pytest.raises(ImageDecodeError) as exact:
            load_image(value, S, key="k")
        with pytest.raises(ImageDecodeError) as fast:
            load_image(value, S, key="k", preprocess="fast")
        assert str(fast.value) == str(exact.value) and reason in str(fast.value)


def test_fast_mode_checks_sizes_before_decoding(photos, simplejpeg_decodes, monkeypatch):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)  # 600x400
    for max_pixels in (1000, 600 * 16 + 15 * 600):  # too many pixels; a side over max/16
        with pytest.raises(ImageDecodeError) as exact:
            load_image(jpeg, S, max_pixels=max_pixels)
        with pytest.raises(ImageDecodeError) as fast:
            load_image(jpeg, S, max_pixels=max_pixels, preprocess="fast")
        assert str(fast.value) == str(exact.value) and "max_pixels" in str(fast.value)
    # PIL's own bomb limits (a process-wide setting of the caller) apply as in exact mode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ImageDecodeError, match="exceeds PIL's limit"):
        load_image(jpeg, S, max_pixels=None, preprocess="fast")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # warns only: decoded, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(jpeg, S, max_pixels=None, preprocess="fast")
    assert simplejpeg_decodes == []
    monkeypatch.undo()
    np.testing.assert_array_equal(out, load_image(jpeg, S, preprocess="fast"))


def test_draft_keyword_is_deprecated_ignored_and_warns_once(photos, tmp_path):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exact = load_image(jpeg, S)
        np.testing.assert_array_equal(load_image(jpeg, S, draft=True), exact)
        np.testing.assert_array_equal(load_image(jpeg, S, draft=False), exact)
        batch = preprocess_batch([jpeg], S, draft=True)
        np.testing.assert_array_equal(batch.pixels[0], exact)
    path = tmp_path / "coffee.jpg"
    path.write_bytes(jpeg)
    code = (
        "import warnings\n"
        "from vqgan_datasets.pipeline.images import load_image, preprocess_batch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    load_image({str(path)!r}, 64, draft=True)\n"
        f"    load_image({str(path)!r}, 64, draft=False)\n"
        f"    preprocess_batch([{str(path)!r}], 64, draft=True)\n"
        "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "assert len(messages) == 1, messages\n"
        "assert \"preprocess='fast'\" in messages[0], messages\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_beyond_the_full_resize_limit_only_the_crop_region_is_resampled(photos):
    # Past FULL_RESIZE_LIMIT * S**2 target pixels (16:1) only the crop region is resampled, with
    # the seed's passes; PIL's float32 box moves a few values by a level or two.
    for size in [(40, 800), (300, 5000), (5000, 301)]:
        strip = Image.fromarray(photos["astronaut"]).resize(size, LANCZOS)
        diff = np.abs(load_image(strip, S).astype(int) - reference(strip).astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.15, size
    within = Image.fromarray(photos["astronaut"]).resize((40, 600), LANCZOS)  # 15:1: the seed's
    np.testing.assert_array_equal(load_image(within, S), reference(within))


def test_mode_conversion_in_bands_equals_whole_image():
    rng = np.random.default_rng(0)
    h, w = 1100, 1000  # over _BAND_PIXELS: converted band by band
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    expected = reference(Image.fromarray(over_white(rgba)))
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(rgba), "PNG"), S), expected)
    # Whole-image decisions: one large value in the last rows makes all of mode I full-range,
    # and of mode F [0, 255]-valued.
    values = rng.integers(0, 256, (h, w)).astype(np.int32) * 257
    values[-1, -1] = 2**31 - 1
    full_range = (np.clip(values, 0, None) >> 23).astype(np.uint8)
    np.testing.assert_array_equal(
        load_image(Image.fromarray(values), S), reference(Image.fromarray(full_range).convert("RGB"))
    )
    unit = rng.random((h, w)).astype(np.float32)
    unit[-1, -1] = 2.0
    scaled = np.rint(np.clip(unit, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(
        load_image(Image.fromarray(unit), S), reference(Image.fromarray(scaled).convert("RGB"))
    )
    unit[0, 0] = np.nan
    with pytest.raises(ImageDecodeError, match="NaN or infinity"):
        load_image(Image.fromarray(unit), S)


# --------------------------------------------------------------- memory per sample

# Runs one load in a fresh interpreter whose address space is capped (so a regression fails
# with MemoryError instead of exhausting the machine) and reports peak RSS growth and time.
_PROBE = """
import json, re, resource, sys, time
from vqgan_datasets.pipeline.images import load_image
def status_bytes(field):
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\\s+(\\d+)", text).group(1)) * 1024
data = open(sys.argv[1], "rb").read()
load_image(__import__("numpy").zeros((4, 4, 3), "uint8"), 8)  # imports done before measuring
resource.setrlimit(resource.RLIMIT_AS, (status_bytes("VmSize") + (int(sys.argv[3]) << 20),) * 2)
before = status_bytes("VmRSS")
start = time.perf_counter()
out = load_image(data, 256, preprocess=sys.argv[2])
seconds = time.perf_counter() - start
peak = status_bytes("VmHWM")
print(json.dumps({"shape": list(out.shape), "seconds": seconds,
                  "peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}))
"""


def probe(path: pathlib.Path, preprocess: str, cap_mb: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), preprocess, str(cap_mb)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("size", [(1, 100_000), (2, 20_000), (100_000, 1)])
def test_extreme_aspect_ratios_have_a_bounded_intermediate(size, tmp_path):
    # The seed's resize target of a 1x100000 image is 256 x 25.6M pixels (over 14 GB).
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    assert path.stat().st_size < 2000
    for preprocess in PREPROCESS_MODES:
        report = probe(path, preprocess, cap_mb=1024)
        assert report["shape"] == [256, 256, 3]
        assert report["peak_mb"] < 400 and report["seconds"] < 3, report


def test_decode_memory_is_bounded_per_pixel(tmp_path):
    # RGBA with an EXIF rotation: the worst common path (decode, composite, transpose) holds
    # at most two full-size images of 4 bytes per pixel plus 10 MB of band temporaries; it
    # used to peak near 24 bytes per pixel.
    side = 3000
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgba = np.empty((side, side, 4), np.uint8)
    rgba[..., 0] = ramp[None, :]
    rgba[..., 1] = ramp[:, None]
    rgba[..., 2] = 90
    rgba[..., 3] = ramp[::-1][None, :]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path, compress_level=1, exif=exif)
    del rgba
    report = probe(path, "exact", cap_mb=1024)
    assert report["growth_mb"] * 2**20 < 8 * side**2 + 16 * 2**20, report


def test_fast_jpeg_decode_memory_is_bounded_per_pixel(tmp_path):
    # Too narrow for any DCT scale, so fast mode decodes it in full (simplejpeg's 3-byte array,
    # then PIL's 4-byte copy, then the EXIF transpose): within the same 8 bytes per pixel.
    width, height = 400, 12_000
    path = tmp_path / "tall.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(data.astronaut()).resize((width, height)).save(path, quality=90, exif=exif)
    report = probe(path, "fast", cap_mb=1024)
    assert report["growth_mb"] * 2**20 < 8 * width * height + 16 * 2**20, report


# ------------------------------------------------------------------- preprocess_batch


@pytest.fixture(scope="module")
def mixed_batch(photos, small):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)
    return [
        photos["astronaut"],
        b"hello world!",
        encode(Image.fromarray(small), "PNG"),
        jpeg,
        b"",
        {"bytes": encode(Image.fromarray(photos["camera"]), "PNG"), "path": None},
        Image.fromarray(small).convert("P"),
        jpeg[:500],
    ]


@pytest.mark.parametrize("on_error", ["skip", "null"])
def test_batch_reports_failed_rows(mixed_batch, on_error):
    keys = [f"k{i}" for i in range(len(mixed_batch))]
    batch = preprocess_batch(mixed_batch, S, keys=keys, on_error=on_error)
    assert isinstance(batch, PreprocessedBatch)
    good = [0, 2, 3, 5, 6]
    np.testing.assert_array_equal(batch.ok, [i in good for i in range(len(mixed_batch))])
    assert batch.pixels.shape == (len(good), S, S, 3) and batch.pixels.dtype == np.uint8
    for row, i in enumerate(good):
        np.testing.assert_array_equal(batch.pixels[row], load_image(mixed_batch[i], S))
        assert batch.errors[i] is None
    assert batch.errors[1].startswith("sample 'k1' (key): cannot identify image file")
    assert batch.errors[4] == "sample 'k4' (key): empty bytes"
    assert batch.errors[7].startswith("sample 'k7' (key): ")


def test_batch_raise_names_the_first_bad_sample(mixed_batch):
    with pytest.raises(ImageDecodeError) as info:
        preprocess_batch(mixed_batch, S)
    assert info.value.key == 1
    assert str(info.value).startswith("sample 1 (index): cannot identify image file")
    with concurrent.futures.ThreadPoolExecutor(4) as pool, pytest.raises(ImageDecodeError) as info:
        preprocess_batch(mixed_batch[2:], S, keys=list("abcdef"), executor=pool)
    assert info.value.key == "c"  # b"" at input 2 of this batch, before the truncated JPEG


def test_batch_on_a_thread_pool_equals_serial(mixed_batch):
    serial = preprocess_batch(mixed_batch, S, on_error="skip")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = preprocess_batch(mixed_batch * 2, S, on_error="skip", executor=pool)
    n = len(mixed_batch)
    np.testing.assert_array_equal(threaded.ok, np.concatenate([serial.ok, serial.ok]))
    np.testing.assert_array_equal(threaded.pixels, np.concatenate([serial.pixels] * 2))
    assert threaded.errors[:n] == serial.errors
    assert threaded.errors[n:] == [
        None if e is None else e.replace(f"sample {i} ", f"sample {i + n} ")
        for i, e in enumerate(serial.errors)
    ]


def test_batch_of_only_failures_and_empty_batch():
    batch = preprocess_batch([b"", b"x"], S, on_error="null")
    assert batch.pixels.shape == (0, S, S, 3) and not batch.ok.any()
    assert batch.errors == ["sample 0 (index): empty bytes", batch.errors[1]]
    empty = preprocess_batch([], S)
    assert empty.pixels.shape == (0, S, S, 3) and empty.ok.shape == (0,) and empty.errors == []


# ------------------------------------------------------------------------------ import


def test_module_import_is_cheap():
    path = pathlib.Path(__file__).parents[2] / "vqgan_datasets" / "pipeline" / "images.py"
    code = (
        "import importlib.util, sys, types\n"
        # the package without its __init__, so that only images.py and what it imports run
        "package = types.ModuleType('vqgan_datasets')\n"
        f"package.__path__ = [{str(path.parent)!r}]\n"
        "sys.modules['vqgan_datasets'] = package\n"
        f"spec = importlib.util.spec_from_file_location('vqgan_datasets.pipeline.images', {str(path)!r})\n"
        "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "heavy = [m for m in ('jax', 'datasets', 'torch', 'fsspec') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ nested lists, PNG metadata


def test_nested_lists_are_read_as_numpy_reads_them(small):
    floats = small.astype(np.float64) / 255
    expected = load_image(small, S)
    np.testing.assert_array_equal(load_image(floats.tolist(), S), expected)  # [0, 1]
    np.testing.assert_array_equal(load_image((floats * 255).tolist(), S), expected)  # [0, 255]
    np.testing.assert_array_equal(load_image(tuple(floats.tolist()), S), expected)
    np.testing.assert_array_equal(load_image((small > 128).tolist(), S),
                                  load_image(small > 128, S))  # bool
    ragged = floats.tolist()
    ragged[3] = ragged[3][:-1]
    bad = {
        "ragged": (ragged, "nested lists are not a rectangular HxW or HxWxC array"),
        "integers": (small.astype(int).tolist(), "give dtype int64"),
        "out of int64": ([[2**70, 0]], "hold object values, not numbers"),
        "strings": ([["a", "b"]], "hold <U1 values, not numbers"),
        "None inside": ([[0.5, None]], "hold object values, not numbers"),
        "too deep": ([[[[0.5]]]], "array of shape (1, 1, 1, 1)"),
    }
    for name, (value, text) in bad.items():
        with pytest.raises(ImageDecodeError, match=r"^sample 'k' \(key\): ") as info:
            load_image(value, S, key="k")
        assert text in str(info.value), name
    batch = preprocess_batch([floats.tolist(), ragged, [[2**70]]], S, on_error="null")
    assert batch.ok.tolist() == [True, False, False]
    np.testing.assert_array_equal(batch.pixels[0], expected)


def _with_chunk(png: bytes, kind: bytes, body: bytes, *, after_idat: bool = False) -> bytes:
    """`png` with one more chunk, after IHDR (or just before IEND)."""
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    at = len(png) - 12 if after_idat else 33  # IEND is 12 bytes; signature + IHDR are 33
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("kind,body,after_idat", [
    (b"iCCP", b"profile\0\0", False),
    (b"zTXt", b"Comment\0\0", False),
    (b"iTXt", b"Comment\0\1\0\0\0", False),
    (b"zTXt", b"Comment\0\0", True),
])
def test_a_png_with_oversized_metadata_gives_its_pixels(small, kind, body, after_idat):
    from PIL import PngImagePlugin

    limit = PngImagePlugin.MAX_TEXT_CHUNK
    png = encode(Image.fromarray(small), "PNG")
    big = _with_chunk(png, kind, body + zlib.compress(b"\0" * (limit + 1)), after_idat=after_idat)
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"):  # what PIL does with it
        Image.open(io.BytesIO(big)).load()
    np.testing.assert_array_equal(load_image(big, S), load_image(png, S))
    assert limit == PngImagePlugin.MAX_TEXT_CHUNK  # PIL's limit left as it was


def test_a_png_whose_text_in_all_exceeds_pils_limit_gives_its_pixels(small, tmp_path):
    from PIL import PngImagePlugin

    png = encode(Image.fromarray(small), "PNG")
    text = b"Comment\0\0" + zlib.compress(b"x" * (PngImagePlugin.MAX_TEXT_CHUNK - 100))
    many = png
    for _ in range(PngImagePlugin.MAX_TEXT_MEMORY // PngImagePlugin.MAX_TEXT_CHUNK + 1):
        many = _with_chunk(many, b"zTXt", text)
    (tmp_path / "many.png").write_bytes(many)
    with pytest.raises(ValueError, match="Too much memory used in text chunks"):
        Image.open(io.BytesIO(many)).load()
    np.testing.assert_array_equal(load_image(str(tmp_path / "many.png"), S), load_image(png, S))
    broken = _with_chunk(png, b"zTXt", b"Comment\0\0" + b"not zlib")[:-30]  # truncated IDAT
    with pytest.raises(ImageDecodeError):
        load_image(broken, S)
