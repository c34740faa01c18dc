"""streams.py: the sample-level pieces shared by the stages and the shard conversion."""

from __future__ import annotations

import io

import numpy as np
import pytest

from vqgan_datasets import streams


def test_fields_are_found_case_insensitively_and_named_in_messages():
    sample = {"__key__": "k", "JPG": b"x", "txt": b"t", "png": None}
    assert streams.find_field(sample, ("png", "jpg")) == "JPG"
    assert streams.find_field(sample, ("webp",)) is None
    assert streams.field_names(sample) == "JPG, png, txt"


def test_read_tokens_says_what_is_wrong():
    ok, why = streams.read_tokens({"t": np.arange(4, dtype=np.uint8)}, "t", 4, 8)
    assert why is None and ok.dtype == np.int32
    buffer = io.BytesIO()
    np.save(buffer, np.arange(4, dtype=np.uint16))
    assert streams.read_tokens({"t": buffer.getvalue()}, "t", None, 8)[1] is None
    cases = [({}, "no token field .t"), ({"t": b"junk"}, "cannot read .t"),
             ({"t": np.zeros(4, np.float32)}, "not integer token ids"),
             ({"t": np.arange(3)}, "expected 4"), ({"t": np.array([0, 1, 2, 9])}, "token id 9")]
    for sample, reason in cases:
        assert reason in streams.read_tokens(sample, "t", 4, 8)[1]


def test_decode_options_and_image_formats():
    image = np.zeros((4, 4, 3), np.uint8)
    assert streams.convert_image(image, "numpy") is image
    assert streams.convert_image(image, "png")[:4] == b"\x89PNG"
    assert streams.DecodeOptions(grid=[2, 3]).grid == (2, 3)
    with pytest.raises(ValueError, match="output_format"):
        streams.DecodeOptions(output_format="gif")
