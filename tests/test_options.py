"""options.py: one validated EncodeOptions, its aliases and builder; the error policy and stats."""

from __future__ import annotations

import pickle
import warnings

import pytest

from vqgan_datasets import options as opts
from vqgan_datasets.options import (
    DROP,
    KEEP,
    STOP,
    EncodeOptions,
    ErrorPolicy,
    SampleError,
    StageStats,
    encode_options,
)


def test_defaults_are_one_set_for_every_adapter():
    o = EncodeOptions()
    assert (o.on_error, o.preprocess, o.image_size, o.batch_size, o.keep_image) == (
        "raise", "exact", None, None, False)
    assert o.engine_kwargs() == {}  # the engine chooses the batch size and workers
    assert EncodeOptions(batch_size=4, workers=0).engine_kwargs() == {"batch_size": 4,
                                                                      "workers": 0}
    assert pickle.loads(pickle.dumps(o)) == o and hash(o) == hash(EncodeOptions())


def test_aliases_name_one_field():
    assert EncodeOptions(image_key="jpg;png").image_fields(()) == ("jpg", "png")
    assert EncodeOptions(image_column="img").image_field == "img"
    assert EncodeOptions(output_key="t.npy", error_column="why").fields()["error_field"] == "why"
    assert EncodeOptions(image_field=["a", "b"]).image_field == ("a", "b")
    assert EncodeOptions().image_fields(("jpg",)) == ("jpg",)  # the adapter's default
    with pytest.raises(ValueError, match="name the same field"):
        EncodeOptions(image_field="a", image_key="b")


@pytest.mark.parametrize("kwargs, match", [
    ({"on_error": "ignore"}, "on_error"),
    ({"preprocess": "draft"}, "preprocess"),
    ({"image_size": 0}, "image_size must be a positive int"),
    ({"batch_size": True}, "batch_size must be a positive int"),
    ({"workers": -1}, "workers"),
    ({"image_key": ";"}, "image_key names no field"),
    ({"output_field": ""}, "output_field"),
    ({"image_field": "x", "output_field": "x"}, "differ"),
    ({"token_dtype": "float32"}, "integer dtype"),
    # A string is not a boolean: "false" must not silently keep the images.
    ({"keep_image": "false"}, "keep_image must be True or False"),
    ({"keep_image": 0}, "keep_image must be True or False"),
    # Tokens and their error reason in one field: one would overwrite the other.
    ({"output_field": "x", "error_field": "x"}, "error_field 'x' must differ"),
    ({"image_column": "img", "error_column": "img"}, "error_field 'img' must differ"),
    ({"image_field": 5}, "image_field must be a field name"),
    ({"image_key": ["jpg", 3]}, "image_key must be a field name"),
])
def test_bad_values_are_refused_once_with_the_name_used(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EncodeOptions(**kwargs)


def test_encode_options_builds_from_shortcuts():
    assert encode_options() == EncodeOptions()
    stage = encode_options(defaults={"keep_image": True}, on_error=None, batch_size=2)
    assert stage.keep_image and stage.batch_size == 2 and stage.on_error == "raise"
    base = EncodeOptions(image_size=32, on_error="skip")
    assert encode_options(base) is base
    assert encode_options(base, on_error="null", image_key="png") == EncodeOptions(
        image_size=32, on_error="null", image_field="png")
    assert base.replace(output_column="codes").output_field == "codes"
    with pytest.raises(TypeError, match="unknown encode options"):
        encode_options(colour="red")
    with pytest.raises(TypeError, match="EncodeOptions"):
        encode_options({"on_error": "skip"})


def test_draft_is_deprecated_and_ignored(monkeypatch):
    monkeypatch.setattr(opts, "_DRAFT_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert encode_options(draft=False) == EncodeOptions()
        EncodeOptions(draft=True)
    assert len(caught) == 1 and "preprocess='fast'" in str(caught[0].message)


def test_error_policy_counts_and_decides():
    error = SampleError("truncated", key="k", url="a.tar")
    assert str(error) == "sample 'k' of shard a.tar: truncated"
    assert pickle.loads(pickle.dumps(error)).key == "k"
    stats = StageStats()
    assert ErrorPolicy("skip").apply(error, stats) == DROP
    assert ErrorPolicy("null").apply(error, stats) == KEEP
    assert ErrorPolicy(handler=lambda e: False).apply(error, stats) == STOP
    with pytest.raises(SampleError):
        ErrorPolicy().apply(error, stats)
    assert (stats.skipped, stats.failed, len(stats.errors)) == (1, 3, 4)
    assert stats.errors[0] == {"key": "k", "reason": "truncated"}
    with pytest.raises(ValueError, match="on_error"):
        ErrorPolicy("ignore")
    with pytest.raises(TypeError, match="callable"):
        ErrorPolicy(handler=3)
