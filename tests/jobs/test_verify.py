"""verify.py: a token shard output checked against the sizes and hashes its stats record."""

from __future__ import annotations

import json

import pytest
from test_wds import BATCH, make_samples, write_tar

from vqgan_datasets.jobs import shards as vqshards
from vqgan_datasets.jobs.verify import output_damage, verify_output


def test_verify_output_names_every_bad_shard(model, tmp_path):
    samples = make_samples()
    urls = [write_tar(tmp_path / f"in-{i}.tar", samples[2 * i:2 * i + 2]) for i in range(4)]
    out = tmp_path / "out"
    vqshards.tokenize_shards(urls[:3], out, model=model, batch_size=BATCH, progress=False)
    result = verify_output(out)
    assert result["complete"] and result["shards_ok"] == result["shards_total"] == 3
    assert result["bytes_checked"] == sum((out / f"in-{i}.tar").stat().st_size for i in range(3))

    (out / "in-0.tar").write_bytes((out / "in-0.tar").read_bytes()[:-512])
    (out / "in-1.tar").unlink()
    (out / "in-2.stats.json").unlink()  # a tar without its marker: not finished
    (out / "stray.tar").write_bytes(b"")
    result = verify_output(str(out))
    bad = {b["output"].rsplit("/", 1)[1]: b["error"] for b in result["bad_shards"]}
    assert not result["complete"] and result["shards_ok"] == 0
    assert set(bad) == {"in-0.tar", "in-1.tar", "in-2.tar", "stray.tar"}
    assert "truncated" in bad["in-0.tar"] and "missing" in bad["in-1.tar"]
    assert "not finished" in bad["in-2.tar"]
    # A failed shard listed in the manifest is bad too.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"].append({"output": str(out / "in-3.tar"), "status": "failed",
                               "error": "unreadable"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert "unreadable" in {b["output"].rsplit("/", 1)[1]: b["error"]
                            for b in verify_output(out)["bad_shards"]}["in-3.tar"]


def test_output_damage_and_what_is_not_an_output(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"abc")
    stats = {"output_bytes": 3, "output_sha256": "0" * 64}
    assert output_damage(str(tmp_path / "x.tar"), stats, check_hash=False) is None
    assert "sha256" in output_damage(str(tmp_path / "x.tar"), stats, check_hash=True)
    assert output_damage(str(tmp_path / "x.tar"), {}, check_hash=True) is None  # nothing recorded
    assert "missing" in output_damage(str(tmp_path / "y.tar"), stats, check_hash=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no token shards"):
        verify_output(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        verify_output(tmp_path / "nowhere")
