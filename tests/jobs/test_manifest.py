"""manifest.py: output names, reports and the manifest merged from stats files."""

from __future__ import annotations

import json

import pytest

from vqgan_datasets import storage
from vqgan_datasets.jobs import manifest as mf
from vqgan_datasets.metadata import METADATA_KEY, TokenizerSpec


def test_output_names():
    urls = ["in/a.tar", "in/b.tar.gz", "pipe:curl -s http://h/c.tgz", "pipe:cat x"]
    assert mf.output_paths(urls, "out") == ["out/a.tar", "out/b.tar", "out/c.tar",
                                            "out/00003.tar"]
    assert mf.output_paths(urls[:1], "file://o/{shard}-{index:03d}.tar") == ["o/a-000.tar"]
    assert mf.stats_path("o/a.tar") == "o/a.stats.json"
    assert mf.output_dir("o/p/{shard}.tar") == "o/p" and mf.output_dir("o") == "o"
    with pytest.raises(ValueError, match="several input shards"):
        mf.output_paths(["x/a.tar", "y/a.tar"], "out")


def test_write_manifest_from_stats_files(tmp_path):
    out = str(tmp_path)
    (tmp_path / "a.tar").write_bytes(b"")
    storage.write_json(str(tmp_path / "a.stats.json"), {
        "samples_in": 3, "encoded": 2, "skipped": 1, "failed": 0,
        "vqgan_datasets": {"weights_digest": "sha256:x"}})
    manifest = mf.write_manifest(["in/a.tar", "in/b.tar"], out)
    assert [s.status for s in manifest.shards] == ["finished", "failed"]
    assert "no stats file" in manifest.shards[1].error
    assert manifest.totals == {"samples_in": 3, "encoded": 2, "skipped": 1, "failed": 0}
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    again = mf.Manifest.from_dict(on_disk, path=manifest.path)
    assert again.shards == manifest.shards and again.spec == {"weights_digest": "sha256:x"}


def _spec(config, digest: str) -> TokenizerSpec:
    return TokenizerSpec.describe(config, digest, model_name="org/tiny", image_size=64)


def test_token_shards_carry_their_tokenizer_record(tiny_config, tmp_path):
    """Issue 16.2: decode said "shards carry no model reference" although every stats file and
    manifest held it. read_token_spec finds it from a folder, a pattern, a list or one shard;
    from a shard's stats file, else its folder's manifest."""
    spec = _spec(tiny_config, "sha256:" + "a" * 64)
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("s-0", "s-1"):
        (tok / f"{name}.tar").write_bytes(b"")
        storage.write_json(str(tok / f"{name}.stats.json"), {METADATA_KEY: spec.to_dict()})
    (tok / ".s-2.tar.tmp-host-1-abc").write_bytes(b"")  # never a shard
    (tok / "s-2.tar").write_bytes(b"")  # not finished: no stats file
    for source in (str(tok), tok, str(tok / "s-{0..1}.tar"), [str(tok / "s-1.tar")],
                   "file://" + str(tok / "s-0.tar")):
        assert mf.read_token_spec(source) == spec, source
    assert mf.token_shard_urls(str(tok)) == [str(tok / "s-0.tar"), str(tok / "s-1.tar")]
    assert mf.token_shard_urls(str(tok / "s-{0..1}.tar")) == [str(tok / "s-0.tar"),
                                                              str(tok / "s-1.tar")]

    # No stats file: the manifest of the folder; nothing at all: a message naming the files.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "x.tar").write_bytes(b"")
    with pytest.raises(mf.TokenSpecNotFound, match=r"x\.stats\.json.*manifest\.json.*--model"):
        mf.read_token_spec(str(bare / "x.tar"))
    assert mf.token_shard_urls(str(bare)) == [str(bare / "x.tar")]
    storage.write_json(str(bare / "manifest.json"), {METADATA_KEY: spec.to_dict(), "shards": []})
    assert mf.read_token_spec(str(bare)) == spec
    assert mf.read_token_spec(str(bare / "x.tar")) == spec
    with pytest.raises(mf.TokenSpecNotFound, match="pipe"):
        mf.read_token_spec("pipe:cat x.tar")

    # Two folders made by other weights are never decoded as one.
    other = _spec(tiny_config, "sha256:" + "b" * 64)
    storage.write_json(str(bare / "manifest.json"), {METADATA_KEY: other.to_dict()})
    with pytest.raises(ValueError, match="different tokenizers .weights differ"):
        mf.read_token_spec([str(tok / "s-0.tar"), str(bare / "x.tar")])


def test_manifest_counts_tar_members_that_were_not_samples(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    storage.write_json(str(tmp_path / "a.stats.json"), {
        "samples_in": 2, "encoded": 2, "members_skipped": {"no extension": 1, "duplicate key": 2}})
    manifest = mf.write_manifest(["in/a.tar"], str(tmp_path))
    assert manifest.members_skipped == {"duplicate key": 2, "no extension": 1}
    assert manifest.totals == {"samples_in": 2, "encoded": 2, "skipped": 0, "failed": 0}
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["members_skipped"] == {"duplicate key": 2, "no extension": 1}


def test_output_dir_of_patterns_and_of_folders_with_braces():
    from vqgan_datasets.jobs.manifest import output_dir, output_paths

    assert output_dir("out/{shard}.tar") == "out"
    assert output_dir("out/x-{index:05d}/{shard}.tar") == "out"
    assert output_dir("data{1}") == "data{1}"  # a folder whose name holds braces
    assert output_paths(["a/x.tar"], "data{1}") == ["data{1}/x.tar"]
