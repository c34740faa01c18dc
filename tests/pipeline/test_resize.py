"""The families' own preprocessing (pipeline/_resize.py) against their reference code's pixels.

The oracles below are the reference functions' library calls on the decoded RGB image: ADM's
``center_crop_arr`` (LlamaGen, TiTok) is PIL calls; albumentations 1.4.4's ``SmallestMaxSize``
+ ``CenterCrop`` (SEED-Voken's IBQ data) is ``cv2.resize`` at ``round(side * S / shortest)``
and a crop at ``(side - S) // 2``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vqgan_datasets.pipeline import _resize
from vqgan_datasets.pipeline.images import PREPROCESS_DESCRIPTIONS, PREPROCESS_MODES, load_image


def _adm_oracle(image: Image.Image, size: int) -> np.ndarray:
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def _albumentations_oracle(image: Image.Image, size: int) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    arr = np.array(image)
    h, w = arr.shape[:2]
    scale = size / float(min(w, h))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        if (nh, nw) != (h, w):
            arr = cv2.resize(arr, dsize=(nw, nh), interpolation=cv2.INTER_LINEAR)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def _torchvision_oracle(image: Image.Image, size: int) -> np.ndarray:
    try:
        from torchvision import transforms
    except ImportError:  # its PIL calls: int() of the long side, BILINEAR, round() offsets
        w, h = image.size
        long = int(size * max(w, h) / min(w, h))
        target = (size, long) if w <= h else (long, size)
        if target != image.size:
            image = image.resize(target, Image.BILINEAR)
        top, left = int(round((image.height - size) / 2.0)), int(round((image.width - size) / 2.0))
        return np.array(image.crop((left, top, left + size, top + size)))
    return np.array(transforms.CenterCrop(size)(transforms.Resize(size)(image)))


ORACLES = {"adm_center_crop": _adm_oracle, "opencv_linear_center_crop": _albumentations_oracle,
           "torchvision_bilinear_center_crop": _torchvision_oracle}


def _photos() -> list[Image.Image]:
    """Real photos at odd sizes, a grayscale one, and one smaller than the target."""
    from skimage import data

    out = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()[3:, 1:])]
    out.append(Image.fromarray(data.rocket()[:, 7:518]))  # 511x427
    out.append(Image.fromarray(data.astronaut()[100:363, :511]))  # 511x263
    out.append(Image.fromarray(data.camera()[:301, :455]))  # grayscale 455x301
    out.append(Image.fromarray(data.hubble_deep_field()[:873, :997]))
    out.append(Image.fromarray(data.coffee()[200:237, 300:353]))  # 53x37: upscaled
    return out


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", sorted(ORACLES))
@pytest.mark.parametrize("size", [64, 128, 256])
def test_family_preprocessing_equals_the_reference_pixels(mode, size):
    for photo in _photos():
        data = _jpeg(photo)
        expected = ORACLES[mode](Image.open(io.BytesIO(data)).convert("RGB"), size)
        got = load_image(data, size, preprocess=mode)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected, err_msg=f"{mode} {photo.size} -> {size}")
        # A decoded image and an array give the same pixels as the file.
        decoded = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(load_image(decoded, size, preprocess=mode), expected)


def test_modes_differ_and_are_described():
    photo = _jpeg(_photos()[0])
    pixels = {mode: load_image(photo, 64, preprocess=mode) for mode in _resize.FAMILY_PREPROCESSING}
    assert not np.array_equal(pixels["adm_center_crop"], pixels["lanczos_center_crop"])
    assert not np.array_equal(pixels["opencv_linear_center_crop"], pixels["adm_center_crop"])
    np.testing.assert_array_equal(pixels["lanczos_center_crop"], load_image(photo, 64))
    assert set(PREPROCESS_MODES) == set(PREPROCESS_DESCRIPTIONS)
    with pytest.raises(ValueError, match="preprocess must be one of"):
        load_image(photo, 64, preprocess="bilinear")


@pytest.mark.parametrize("mode", sorted(ORACLES))
def test_long_images_sample_the_crop_region_close_to_the_reference(mode):
    # Past 16:1 only the crop region is resampled; the pixels stay within a few levels.
    from skimage import data

    strip = Image.fromarray(np.tile(data.coffee()[:40], (1, 3, 1))[:, :1800])  # 1800x40
    expected = ORACLES[mode](strip, 32).astype(int)
    got = load_image(np.array(strip), 32, preprocess=mode).astype(int)
    assert np.abs(got - expected).max() <= 3

