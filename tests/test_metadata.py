"""metadata.py: the TokenizerSpec records the preprocessing mode and reads older records."""

from __future__ import annotations

import pytest

from vqgan_datasets import metadata
from vqgan_datasets.metadata import TokenizerSpec


def test_preprocess_modes_are_recorded_and_read_back(tiny_model):
    exact = TokenizerSpec.from_model(tiny_model)
    fast = TokenizerSpec.from_model(tiny_model, preprocess="fast")
    assert (exact.preprocess, fast.preprocess) == ("exact", "fast")
    assert exact.fingerprint() != fast.fingerprint()
    assert TokenizerSpec.from_dict(fast.to_dict()) == fast
    # draft= is ignored (drafting is preprocess="fast"), also in its old positional place.
    assert TokenizerSpec.from_model(tiny_model, draft=True) == exact
    assert metadata.preprocessing(True) == metadata.preprocessing("exact")
    with pytest.raises(ValueError, match="preprocess"):
        metadata.preprocessing("draft")


def test_older_records_still_read(tiny_model):
    record = TokenizerSpec.from_model(tiny_model).to_dict()
    # Records of the earlier drafted default: readable, matching neither mode.
    old = TokenizerSpec.from_dict({**record, "preprocessing": metadata.PREPROCESSING})
    assert old.preprocess is None
    assert old.fingerprint() != TokenizerSpec.from_model(tiny_model).fingerprint()
    # Earlier draft=False records are the exact mode's pixels and keep their fingerprint.
    no_draft = f"{metadata.PREPROCESSING}; full JPEG decode (no draft)"
    assert TokenizerSpec.from_dict({**record, "preprocessing": no_draft}).preprocess == "exact"
