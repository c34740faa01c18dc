"""push: a token dataset or token shards → a Hub dataset repo; the dry run's files read back
offline, and an interrupted upload resumes (against an in-memory stand-in for the Hub API)."""

from __future__ import annotations

import hashlib
import shutil

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import SAMPLES

from vqgan_datasets.hf import VQGANDetokenizer, read_metadata
from vqgan_datasets.jobs import commands as jobs
from vqgan_datasets.jobs import push as push_module
from vqgan_datasets.jobs.overlap import OutputIsInputError
from vqgan_datasets.jobs.push import push
from vqgan_datasets.metadata import METADATA_KEY

NAMES = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def token_dataset(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    (root / "photos").mkdir()
    for name in NAMES:
        shutil.copy(SAMPLES / f"{name}.jpg", root / "photos")
    jobs.encode(root / "photos", root / "tokens", model=str(tiny_model_dir), progress=False,
                workers=0)
    return root / "tokens"


@pytest.fixture(scope="module")
def token_shards(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("push_shards")
    (root / "in").mkdir()
    for shard, names in enumerate((NAMES[:2], NAMES[2:])):
        with open(root / "in" / f"part-{shard}.tar", "wb") as f, wds.TarWriter(f) as writer:
            for name in names:
                writer.write({"__key__": name, "jpg": (SAMPLES / f"{name}.jpg").read_bytes()})
    jobs.encode(str(root / "in" / "part-{0..1}.tar"), root / "out", model=str(tiny_model_dir),
                progress=False, workers=0)
    return root / "out"


def test_dry_run_of_a_token_dataset_reads_back(token_dataset, tmp_path):
    summary = push(token_dataset, "org/name", dry_run=tmp_path / "hub")
    files = sorted(p.relative_to(tmp_path / "hub").as_posix()
                   for p in (tmp_path / "hub").rglob("*") if p.is_file())
    assert files == ["README.md", "data/train-00000-of-00001.parquet"] and summary["files"] == 2
    parquet = tmp_path / "hub" / files[1]
    assert METADATA_KEY.encode() in pq.read_schema(parquet).metadata  # the record in the file
    loaded = datasets.load_dataset(str(tmp_path / "hub"), split="train")
    source = datasets.load_from_disk(str(token_dataset))
    assert read_metadata(loaded) == read_metadata(source)  # and in the card
    np.testing.assert_array_equal(np.asarray(loaded["vqgan_tokens"]),
                                  np.asarray(source["vqgan_tokens"]))
    assert VQGANDetokenizer.from_dataset(str(tmp_path / "hub")).token_column == "vqgan_tokens"
    # The same input gives the same bytes: what lets a rerun find its files already uploaded.
    push(token_dataset, "org/name", dry_run=tmp_path / "again")
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "hub" / name).read_bytes()


def test_a_dry_run_into_its_own_source_is_refused(token_shards):
    before = sorted(p.name for p in token_shards.iterdir())
    for target in (token_shards, token_shards.parent, token_shards / ".." / token_shards.name):
        with pytest.raises(OutputIsInputError, match="output folder"):
            push(token_shards, "org/name", dry_run=target)
    assert sorted(p.name for p in token_shards.iterdir()) == before


def test_dry_run_of_token_shards_reads_back(token_shards, tmp_path):
    out = tmp_path / "hub"
    push(token_shards, "org/name", dry_run=out)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["part-0.tar", "part-1.tar"]
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["part-0.stats.json",
                                                                  "part-1.stats.json"]
    assert (out / "data" / "part-0.tar").read_bytes() == (token_shards / "part-0.tar").read_bytes()
    loaded = datasets.load_dataset(str(out), split="train")
    assert loaded["__key__"] == list(NAMES)
    detok = VQGANDetokenizer.from_dataset(str(out))
    assert detok.token_column == "vqgan.npy" and read_metadata(loaded).grid == (16, 16)
    images = detok.apply(loaded)
    assert np.asarray(images[0]["image"]).shape == (64, 64, 3)


def test_unfinished_shards_are_refused(token_shards, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(token_shards, folder)
    (folder / "part-1.stats.json").unlink()
    with pytest.raises(ValueError, match="1 shards have no stats file.*part-1.tar"):
        push(folder, "org/name", dry_run=tmp_path / "hub")


class FakeHub:
    """The HfApi calls push makes, on files kept in memory; `fail_after` commits, it raises."""

    def __init__(self):
        self.files: dict[str, bytes] = {"data/old-00000-of-00001.parquet": b"old",
                                        "notes.txt": b"theirs"}
        self.commits: list[list[str]] = []
        self.fail_after: int | None = None

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        return f"https://huggingface.co/datasets/{repo_id}"

    def list_repo_tree(self, repo_id, repo_type, recursive):
        from huggingface_hub.hf_api import RepoFile

        for path, data in self.files.items():
            lfs = ({"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 1}
                   if path.endswith((".parquet", ".tar")) else None)
            oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=oid, lfs=lfs)

    def create_commit(self, repo_id, repo_type, operations, commit_message):
        if self.fail_after is not None and len(self.commits) >= self.fail_after:
            raise ConnectionError("the network went away")
        for op in operations:
            if hasattr(op, "path_or_fileobj"):
                with open(op.path_or_fileobj, "rb") as f:
                    self.files[op.path_in_repo] = f.read()
            else:
                del self.files[op.path_in_repo]
        self.commits.append(sorted(op.path_in_repo for op in operations))


def test_an_interrupted_push_resumes_and_the_card_goes_last(token_shards, monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    monkeypatch.setattr(push_module, "COMMIT_FILES", 2)
    hub.fail_after = 1
    with pytest.raises(ConnectionError):
        push(token_shards, "org/name")
    assert hub.commits == [["data/part-0.tar", "stats/part-0.stats.json"]]
    assert "README.md" not in hub.files  # no card naming files that are not there yet
    hub.fail_after = None
    summary = push(token_shards, "org/name")
    assert hub.commits[1:] == [["data/part-1.tar", "stats/part-1.stats.json"],
                               ["README.md", "data/old-00000-of-00001.parquet"]]
    assert summary["uploaded"] == 3 and summary["already_there"] == 2
    assert summary["removed"] == ["data/old-00000-of-00001.parquet"]
    assert hub.files["notes.txt"] == b"theirs"  # files outside data/ and stats/ stay
    assert hub.files["data/part-1.tar"] == (token_shards / "part-1.tar").read_bytes()
    again = push(token_shards, "org/name")
    assert again["uploaded"] == 0 and again["commits"] == 0 and len(hub.commits) == 3


def test_the_cli_push_dry_run(token_dataset, tmp_path, capsys):
    import json

    from vqgan_datasets import cli

    assert cli.main(["push", str(token_dataset), "org/name", "--dry-run", str(tmp_path / "hub"),
                     "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 2
    assert (tmp_path / "hub" / "README.md").is_file()
