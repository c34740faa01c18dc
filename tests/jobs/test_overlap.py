"""overlap.py: no output is an input, however either is spelled; checked before any reading."""

from __future__ import annotations

import os

import pytest

from vqgan_datasets.jobs.overlap import OutputIsInputError, check_outputs, check_shard_outputs


@pytest.fixture()
def shard_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ip").mkdir()
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "ip" / name).write_bytes(b"input bytes")
    os.symlink(tmp_path / "ip", tmp_path / "link")
    return tmp_path


@pytest.mark.parametrize("inputs,output", [
    ("ip/00000.tar", "ip"),  # the output folder is the input's folder
    ("{root}/ip/00000.tar", "ip"),  # absolute input, relative output
    ("ip/00000.tar", "{root}/ip/"),
    ("ip/../ip/00000.tar", "./ip"),
    ("link/00000.tar", "ip"),  # a symlinked folder, either side
    ("ip/00000.tar", "link"),
    ("file://{root}/ip/00000.tar", "ip"),
    ("ip/{00000..00001}.tar", "file://{root}/link"),
    ("ip/00001.tar", "ip/{shard}.tar"),  # a pattern naming the input
])
def test_shard_outputs_that_are_inputs_are_refused(shard_dir, inputs, output):
    inputs, output = inputs.replace("{root}", str(shard_dir)), output.replace("{root}",
                                                                              str(shard_dir))
    with pytest.raises(OutputIsInputError, match="is the input") as info:
        check_shard_outputs(inputs, output)
    message = str(info.value)
    assert "ip/0000" in message and "choose another output" in message


def test_outputs_beside_their_inputs_are_fine(shard_dir):
    check_shard_outputs("ip/00000.tar", "out")
    check_shard_outputs("ip/{00000..00001}.tar", "ip/{shard}.tokens.tar")  # same folder
    check_shard_outputs("pipe:cat ip/00000.tar", "ip")  # a command is no path
    check_outputs(["ip/00000.tar"], files=["ip/00000.png"], folders=["ip/decoded"])


def test_hard_links_and_the_manifest_are_checked(shard_dir):
    os.link(shard_dir / "ip" / "00000.tar", shard_dir / "hard.tar")
    with pytest.raises(OutputIsInputError, match="hard.tar"):
        check_outputs(["hard.tar"], files=["ip/00000.tar"])
    (shard_dir / "other").mkdir()
    (shard_dir / "other" / "manifest.json").write_text("{}")
    with pytest.raises(OutputIsInputError, match="manifest.json"):
        check_shard_outputs(["ip/00000.tar", "other/manifest.json"], "other")


def test_an_output_folder_may_not_be_or_hold_an_input(shard_dir):
    with pytest.raises(OutputIsInputError, match="output folder ip .*holds the input"):
        check_outputs(["ip/00000.tar"], folders=["ip"])
    with pytest.raises(OutputIsInputError, match="holds the input"):
        check_outputs(["ip/00000.tar"], folders=[str(shard_dir)])  # a folder above it
    with pytest.raises(OutputIsInputError, match="is the input"):
        check_outputs(["ip/00000.tar"], folders=["link/00000.tar"])
    with pytest.raises(OutputIsInputError):
        check_outputs(["s3://bucket/a/x.parquet"], folders=["s3://bucket/a/"])
    check_outputs(["s3://bucket/a/x.parquet"], folders=["s3://bucket/ab"])
