"""metadata.py: the TokenizerSpec records the preprocessing mode and reads older records."""

from __future__ import annotations

import pytest

from vqgan_datasets import metadata
from vqgan_datasets.metadata import TokenizerSpec


def test_preprocess_modes_are_recorded_and_read_back(tiny_model):
    exact = TokenizerSpec.from_model(tiny_model)
    fast = TokenizerSpec.from_model(tiny_model, preprocess="fast")
    assert (exact.preprocess, fast.preprocess) == ("lanczos_center_crop", "fast")
    assert exact.fingerprint() != fast.fingerprint()
    assert exact.preprocessing.startswith("lanczos_center_crop: ")
    assert TokenizerSpec.from_model(tiny_model, preprocess="lanczos_center_crop") == exact
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
    # Earlier draft=False records are the exact mode's pixels; earlier fast records fast's.
    no_draft = f"{metadata.PREPROCESSING}; full JPEG decode (no draft)"
    earlier = TokenizerSpec.from_dict({**record, "preprocessing": no_draft})
    assert earlier.preprocess == "lanczos_center_crop"
    fast = f"{metadata.PREPROCESSING}; fast: DCT-scaled JPEG decode, antialiased resize"
    assert TokenizerSpec.from_dict({**record, "preprocessing": fast}).preprocess == "fast"
    # Records made before tokenizer families are taming's.
    config = {k: v for k, v in record["config"].items() if k not in ("family", "weights")}
    assert TokenizerSpec.from_dict({**record, "config": config}).family == "taming"


def test_each_family_records_its_own_preprocessing_and_config(tiny_config):
    specs = {}
    for family in ("taming", "llamagen", "ibq", "maskgit"):
        config = tiny_config.replace(family=family)
        specs[family] = TokenizerSpec.describe(config, "sha256:0")
        assert specs[family].family == family and specs[family].config["family"] == family
        assert specs[family].preprocess == config.preprocess
        assert specs[family].preprocessing.startswith(config.preprocess + ": ")
        # Asked for by name, the family's own is the same record as "exact".
        named = TokenizerSpec.describe(config, "sha256:0", preprocess=config.preprocess)
        assert named == specs[family]
    assert specs["llamagen"].preprocess == "adm_center_crop"
    assert specs["ibq"].preprocess == "opencv_linear_center_crop"
    assert len({s.fingerprint() for s in specs.values()}) == 4
    # Another preprocessing than the family's own is recorded as such, with its own fingerprint.
    other = TokenizerSpec.describe(tiny_config.replace(family="ibq"), "sha256:0",
                                   preprocess="lanczos_center_crop")
    assert other.preprocess == "lanczos_center_crop"
    assert other.fingerprint() != specs["ibq"].fingerprint()
    assert "tokenizer family ibq vs taming" in specs["ibq"].mismatch(specs["taming"])
