"""Summaries name the first inputs a job could not use and say where all of them are listed."""

from __future__ import annotations

import json
import shutil

import datasets
from conftest import SAMPLES

from vqgan_datasets.jobs import commands as jobs
from vqgan_datasets.jobs import summaries
from vqgan_datasets.jobs.manifest import Manifest, ShardReport


def _folder_with_broken_files(root, broken: int):
    root.mkdir()
    for name in ("astronaut", "coffee"):
        shutil.copy(SAMPLES / f"{name}.jpg", root / f"{name}.jpg")
    for i in range(broken):
        (root / f"broken{i:02d}.jpg").write_bytes(b"not an image")
    return root


def test_encode_names_skipped_and_null_rows(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(summaries, "LISTED", 3)
    source = _folder_with_broken_files(tmp_path / "photos", broken=5)
    out = tmp_path / "skip"
    summary = jobs.encode(source, out, model=str(tiny_model_dir), on_error="skip",
                          progress=False, workers=0)
    assert summary["skipped"] == 5 and summary["rows_out"] == 2
    assert summary["skipped_inputs"] == ["broken00.jpg", "broken01.jpg", "broken02.jpg"]
    listed = json.loads((out / summaries.SKIPPED_FILE).read_text())["skipped_inputs"]
    assert summary["skipped_list"] == str(out / summaries.SKIPPED_FILE)
    assert listed == [f"broken{i:02d}.jpg" for i in range(5)]
    assert len(datasets.load_from_disk(str(out))) == 2  # the list does not disturb the dataset

    summary = jobs.encode(source, tmp_path / "null", model=str(tiny_model_dir), on_error="null",
                          progress=False, workers=0)
    assert summary["nulls"] == 5 and "skipped_inputs" not in summary
    assert [row["name"] for row in summary["null_inputs"]] == [f"broken{i:02d}.jpg"
                                                               for i in range(3)]
    assert all(row["error"] for row in summary["null_inputs"])
    assert "vqgan_tokens" in summary["null_list"] and "vqgan_tokens_error" in summary["null_list"]


def test_a_clean_rerun_removes_an_old_skipped_list(tmp_path, tiny_model_dir):
    source = _folder_with_broken_files(tmp_path / "photos", broken=1)
    out = tmp_path / "tokens"
    jobs.encode(source, out, model=str(tiny_model_dir), on_error="skip", progress=False, workers=0)
    assert (out / summaries.SKIPPED_FILE).exists()
    (source / "broken00.jpg").unlink()
    summary = jobs.encode(source, out, model=str(tiny_model_dir), on_error="skip", progress=False,
                          workers=0)
    assert summary["skipped"] == 0 and "skipped_list" not in summary
    assert not (out / summaries.SKIPPED_FILE).exists()


def test_shard_summary_names_first_sample_errors_and_their_stats_files(monkeypatch):
    monkeypatch.setattr(summaries, "LISTED", 2)

    def shard(i: int, status: str = "written", bad: int = 0) -> ShardReport:
        return ShardReport(url=f"in/{i}.tar", output=f"out/{i}.tar", stats_path=f"out/{i}.json",
                           status=status, samples_in=4, encoded=4 - bad, skipped=bad,
                           errors=[{"key": f"s{i}-{k}", "reason": "broken"} for k in range(bad)])

    manifest = Manifest(output="out", spec={}, shards=[shard(0), shard(1, bad=1), shard(2, bad=3),
                                                       shard(3, "finished", bad=1)])
    listed = summaries.sample_errors(manifest)
    assert listed["sample_errors"] == [{"shard": "in/1.tar", "key": "s1-0", "reason": "broken"},
                                       {"shard": "in/2.tar", "key": "s2-0", "reason": "broken"}]
    assert listed["sample_errors_listed_in"][:2] == ["out/1.json", "out/2.json"]
    assert "1 more stats files" in listed["sample_errors_listed_in"][2]
    assert summaries.sample_errors(Manifest(output="out", spec={}, shards=[shard(0)])) == {}
    summary = jobs.manifest_summary(manifest)
    assert summary["sample_errors"] == listed["sample_errors"]


def test_rows_without_a_name_column_are_named_by_index(tmp_path):
    tokens = datasets.Dataset.from_dict({"vqgan_tokens": [[1], None, [2], None],
                                         "vqgan_tokens_error": [None, "bad", None, "worse"]})
    listed = summaries.row_failures(tokens, tokens, "vqgan_tokens", "vqgan_tokens_error", tmp_path)
    assert listed["null_inputs"] == [{"name": "1", "error": "bad"}, {"name": "3", "error": "worse"}]
    source = datasets.Dataset.from_dict({"image": ["a", "b", "c"]})
    kept = datasets.Dataset.from_dict({"vqgan_tokens": [[1], [2]]})
    listed = summaries.row_failures(source, kept, "vqgan_tokens", None, tmp_path)
    assert "skipped_inputs" not in listed and "--on-error null" in listed["skipped_list"]
