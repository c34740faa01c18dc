"""Fixtures shared by the test_hf*.py files, which load them with
`pytest_plugins = ["hf_fixtures"]`: six real photos as an on-disk image dataset, tiny
checkpoints, their reference tokens and images. Every cache in a temp dir."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, photos
from datasets import Dataset, Features, Image, Value, load_from_disk
from hf_helpers import SIZE, N, image_rows

from vqgan_datasets.hf import VQGANDetokenizer, VQGANTokenizer
from vqgan_datasets.models.modeling import VQModel
from vqgan_datasets.pipeline.images import load_image


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    """Six real photos, 96×96 (so preprocessing resizes), alternately PNG and JPEG below."""
    return np.concatenate([photos(96, 4), photos(96, 4)[::-1]])[:N]


@pytest.fixture(scope="module")
def photo_dataset(pictures) -> Dataset:
    return Dataset.from_dict(
        {"image": image_rows(pictures), "label": list(range(N)), "id": [f"k{i}" for i in range(N)]},
        features=Features({"image": Image(), "label": Value("int64"), "id": Value("string")}),
    )


@pytest.fixture(scope="module")
def ds_dir(photo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos_ds")
    photo_dataset.save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def ds(ds_dir) -> Dataset:
    """On disk, so that map caches (from_dict datasets are never cached)."""
    return load_from_disk(str(ds_dir))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> str:
    """Same config, other weights."""
    out = tmp_path_factory.mktemp("tiny_other")
    VQModel(TINY, seed=1).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tok(model_dir) -> VQGANTokenizer:
    return VQGANTokenizer(model_dir)


@pytest.fixture(scope="module")
def expected(tok, photo_dataset) -> np.ndarray:
    """Tokens of the photos computed without datasets: load_image + VQModel.encode_images."""
    images = [load_image(row, SIZE) for row in photo_dataset.cast_column("image", Image(decode=False))["image"]]
    return tok.model.encode_images(np.stack(images)).astype(np.uint8)


@pytest.fixture(scope="module")
def tokenized(tok, ds) -> Dataset:
    return tok.apply(ds)


@pytest.fixture(scope="module")
def detok(tokenized) -> VQGANDetokenizer:
    return VQGANDetokenizer.from_dataset(tokenized)


@pytest.fixture(scope="module")
def expected_images(tok, expected) -> np.ndarray:
    return tok.model.decode_images(expected)


class _Records(logging.Handler):
    """datasets' logger does not propagate to the root: listen on it directly."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def datasets_log():
    handler = _Records()
    logger = logging.getLogger("datasets")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
