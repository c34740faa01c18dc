"""The `vqgan-datasets` command: help everywhere, one-line errors, each command once."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vqgan_datasets import cli

COMMANDS = ("demo", "encode", "decode", "preview", "report", "convert", "info", "push", "verify")
SAMPLES = Path(__file__).resolve().parents[1] / "vqgan_datasets" / "_demo" / "images"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert command in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert cli.main(["encode", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqgan-datasets encode: error:") and "nowhere" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "encode", str(tmp_path / "nowhere"), str(tmp_path / "out")])


def test_bad_value_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["encode", "a", "b", "--value-range", "1,0"])
    assert info.value.code == 2
    assert "LOW < HIGH" in capsys.readouterr().err


def test_encode_decode_info_through_the_cli(tmp_path, tiny_model_dir, capsys):
    assert cli.main(["--quiet", "encode", str(SAMPLES), str(tmp_path / "t"),
                     "--model", str(tiny_model_dir), "--value-range", "0,1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_out"] == len(list(SAMPLES.glob("*.jpg")))
    assert cli.main(["decode", str(tmp_path / "t"), str(tmp_path / "d"), "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    assert cli.main(["info", "--model", str(tiny_model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["token_dtype"], info["family"], info["preprocess"]) == (
        "uint16", "taming", "lanczos_center_crop")


def test_convert_through_the_cli(tmp_path, tiny_model, capsys):
    torch = pytest.importorskip("torch")
    from test_taming import taming_state_dict

    torch.save({"state_dict": taming_state_dict(tiny_model)}, tmp_path / "last.ckpt")
    assert cli.main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vqgan_datasets.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "encode" in out.stdout


# ------------------------------------------------------------------------------ shards: exit status


def _png(seed: int, size=(80, 64)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with open(path, "wb") as f, wds.TarWriter(f) as writer:
        for sample in samples:
            writer.write(sample)


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory, tiny_model_dir):
    """`encode` over four input shards: two good ones (one with a member that is no sample),
    one that is not a tar, one holding an image that cannot be decoded (on_error="raise": that
    shard fails). Returns (exit status, summary printed, output dir)."""
    root = tmp_path_factory.mktemp("cli_shards")
    (root / "in").mkdir()
    _tar(root / "in" / "shard-00000.tar",
         [{"__key__": "s0", "png": _png(0)}, {"__key__": "s1", "png": _png(1)}])
    _tar(root / "in" / "shard-00001.tar", [{"__key__": "s2", "png": _png(2)}])
    with tarfile.open(root / "in" / "shard-00001.tar", "a") as tar:  # not a sample: counted
        info = tarfile.TarInfo("notes")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (root / "in" / "shard-00002.tar").write_bytes(b"this is not a tar file" * 40)
    _tar(root / "in" / "shard-00003.tar",
         [{"__key__": "s3", "png": _png(3)}, {"__key__": "bad", "jpg": b"not a jpeg"}])
    out = root / "tok"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        status = cli.main(["encode", str(root / "in" / "shard-{00000..00003}.tar"), str(out),
                           "--model", str(tiny_model_dir), "--quiet"])
    return status, json.loads(capture.getvalue()), out


def test_encode_exits_non_zero_when_shards_fail_and_counts_them(shard_run, capsys):
    status, summary, out = shard_run
    assert status == cli.EXIT_INCOMPLETE == 3
    assert summary["complete"] is False
    assert summary["shards"] == 2 and summary["shards_written"] == 2
    assert summary["shards_failed"] == 2
    assert summary["samples_in"] == summary["encoded"] == 3
    assert summary["skipped"] == summary["failed"] == 0
    assert summary["members_skipped"] == {"no extension": 1}
    failed = {Path(s["url"]).name: s["error"] for s in summary["failed_shards"]}
    assert set(failed) == {"shard-00002.tar", "shard-00003.tar"}
    assert "bad" in failed["shard-00003.tar"]
    assert summary["manifest"] == str(out / "manifest.json")
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]


def test_rerun_of_a_complete_output_exits_zero(shard_run, tiny_model_dir, tmp_path, capsys):
    _, _, out = shard_run
    good = out.parent / "in" / "shard-{00000..00001}.tar"
    assert cli.main(["encode", str(good), str(out), "--model", str(tiny_model_dir),
                     "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] is True and summary["shards_failed"] == 0
    assert summary["shards"] == summary["shards_finished_before"] == 2
    assert summary["samples_in"] == 3


def test_decode_token_shards_finds_the_model_in_their_records(shard_run, tmp_path, capsys):
    _, _, out = shard_run
    # A folder of token shards, and a brace pattern, both without --model.
    assert cli.main(["decode", str(out), str(tmp_path / "a"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s0.png", "s1.png", "s2.png"]
    pattern = str(out / "shard-{00000..00001}.tar")
    assert cli.main(["decode", pattern, str(tmp_path / "b"), "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    # Only the manifest left: still found.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("shard-00000.tar", "manifest.json"):
        (bare / name).write_bytes((out / name).read_bytes())
    assert cli.main(["decode", str(bare / "shard-00000.tar"), str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    # No record at all: the message says to pass --model.
    (bare / "manifest.json").unlink()
    assert cli.main(["decode", str(bare), str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "manifest.json" in err  # where it looked


def test_decode_refuses_a_model_other_than_the_recorded_one(shard_run, tmp_path, tiny_config,
                                                           capsys):
    from vqgan_datasets.models.modeling import VQModel

    _, _, out = shard_run
    other = tmp_path / "other"
    VQModel(tiny_config, seed=1).save_pretrained(other)
    assert cli.main(["decode", str(out), str(tmp_path / "x"), "--model", str(other)]) == 1
    assert "weights differ" in capsys.readouterr().err


# ------------------------------------------------------------------------------ options anywhere


def test_global_options_before_or_after_the_command(tmp_path):
    parse = cli._parser().parse_args
    for argv in (["--quiet", "encode", "in", "out"], ["encode", "in", "out", "--quiet"],
                 ["encode", "--quiet", "in", "out", "--model", "M"]):
        args = parse(argv)
        assert args.quiet and not args.debug, argv
    assert parse(["decode", "t", "d", "--debug"]).debug
    assert parse(["--debug", "info"]).debug and not parse(["info"]).debug
    with pytest.raises(FileNotFoundError):  # --debug after the command: the traceback
        cli.main(["encode", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--debug"])


def test_encode_defaults_match_python_and_new_options_parse():
    args = cli._parser().parse_args(["encode", "in", "out"])
    assert args.on_error == "raise" and args.preprocess == "exact" and args.workers is None
    args = cli._parser().parse_args(["encode", "in", "out", "--preprocess", "fast",
                                     "--workers", "0", "--on-error", "null"])
    options = cli._encode_options(args)
    assert (options.preprocess, options.workers, options.on_error) == ("fast", 0, "null")


def test_help_documents_the_exit_status(capsys):
    for argv in (["--help"], ["encode", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "exit status" in out.lower() and "3" in out, argv


def test_encode_a_dataset_with_bad_images(tmp_path, tiny_model_dir, capsys):
    """Per-sample failures under skip/null are the user's choice: exit 0, counted; under the
    default "raise" the command fails with exit 1 naming the file."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(_png(5))
    (images / "broken.png").write_bytes(b"not a png")
    args = [str(images), str(tmp_path / "t"), "--model", str(tiny_model_dir), "--quiet"]
    assert cli.main(["encode", *args, "--on-error", "null"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] is True
    assert (summary["rows_in"], summary["encoded"], summary["nulls"]) == (2, 1, 1)
    assert cli.main(["encode", *args[:1], str(tmp_path / "t2"), *args[2:]]) == 1
    assert "broken.png" in capsys.readouterr().err


def test_the_raise_message_gives_cli_advice(tmp_path, tiny_model_dir, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(_png(5))
    (images / "broken.png").write_bytes(b"not a png")
    assert cli.main(["encode", str(images), str(tmp_path / "t"), "--model", str(tiny_model_dir),
                     "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "--on-error skip" in err and "--on-error null" in err
    assert "with_indices" not in err and "map(" not in err


# ------------------------------------------------------------------------------ outputs vs inputs


def test_an_output_that_is_an_input_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    """Exit 2 naming both paths, however spelled, for every job; nothing read or written (the
    model is not even looked up), the input left as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ip").mkdir()
    _tar(tmp_path / "ip" / "00000.tar", [{"__key__": "s0", "png": _png(0)}])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(_png(1))
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    model = ["--model", str(tmp_path / "no-such-model")]
    cases = [
        ["encode", "ip/00000.tar", "ip"],
        ["encode", str(tmp_path / "ip" / "00000.tar"), "./ip/../ip"],
        ["encode", f"file://{tmp_path}/ip/00000.tar", "ip/"],
        ["encode", "photos", "photos"],
        ["encode", "photos", "link"],
        ["decode", "ip", "ip"],
        ["decode", "ip/00000.tar", str(tmp_path)],
        ["preview", "photos", "link/a.png"],
        ["report", "photos", "."],
    ]
    for argv in cases:
        assert cli.main([*argv, *model, "--quiet"]) == cli.EXIT_USAGE == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "input" in err, (argv, err)
        assert argv[1].rstrip("/").split("/")[-1] in err, (argv, err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_values_out_of_range_are_usage_errors_and_version(capsys):
    for argv in (["decode", "t", "d", "--limit", "-1"], ["preview", "i", "o.png", "-n", "0"],
                 ["preview", "i", "o.png", "-n", "-3"], ["encode", "i", "o", "--batch-size", "-1"],
                 ["encode", "i", "o", "--workers", "-2"], ["report", "i", "o", "--max-samples",
                                                            "0"],
                 ["encode", "i", "o", "--gpus-per-actor", "-1"], ["decode", "t", "d", "--limit",
                                                                  "x"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
        assert "expected a" in capsys.readouterr().err
    # Checked after parsing, before any work: still a usage error.
    assert cli.main(["encode", "i", "o", "--image-column", ""]) == 2
    assert "image_field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    from vqgan_datasets import __version__

    assert capsys.readouterr().out.strip() == f"vqgan-datasets {__version__}"


# ------------------------------------------------------------------------------ verify, overwrite


def test_verify_names_each_bad_shard_and_a_rerun_redoes_them(shard_run, tiny_model_dir, tmp_path,
                                                             capsys):
    import shutil

    _, _, out = shard_run
    copy = tmp_path / "tok"
    shutil.copytree(out, copy)
    good = out.parent / "in" / "shard-{00000..00001}.tar"
    assert cli.main(["encode", str(good), str(copy), "--model", str(tiny_model_dir),
                     "--quiet"]) == 0  # the failed shards are no longer asked for
    capsys.readouterr()
    assert cli.main(["verify", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out)["shards_ok"] == 2
    first = copy / "shard-00000.tar"
    data = first.read_bytes()
    first.write_bytes(data[:-1024])  # truncated
    second = copy / "shard-00001.tar"
    damaged = bytearray(second.read_bytes())
    damaged[600] ^= 1
    second.write_bytes(bytes(damaged))
    assert cli.main(["verify", str(copy)]) == cli.EXIT_INCOMPLETE
    summary = json.loads(capsys.readouterr().out)
    bad = {Path(s["output"]).name: s["error"] for s in summary["bad_shards"]}
    assert set(bad) == {"shard-00000.tar", "shard-00001.tar"}
    assert "truncated" in bad["shard-00000.tar"] and "sha256" in bad["shard-00001.tar"]
    # The rerun converts them again, and settings that differ name --overwrite.
    assert cli.main(["encode", str(good), str(copy), "--model", str(tiny_model_dir),
                     "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_written"] == 2
    assert first.read_bytes() == data
    assert cli.main(["verify", str(copy)]) == 0
    capsys.readouterr()
    assert cli.main(["encode", str(good), str(copy), "--model", str(tiny_model_dir),
                     "--keep-image", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["encode", str(good), str(copy), "--model", str(tiny_model_dir),
                     "--keep-image", "--overwrite", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_written"] == 2


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_stops_like_ctrl_c_with_summary_manifest_and_exit_143(tmp_path, tiny_model_dir):
    """What docker stop, Kubernetes, SLURM and `timeout` send: the run stops, the shard in
    progress leaves no temporary file or claim, the manifest and the summary say what was
    done, the exit status is 143, and the worker processes end too."""
    import os
    import signal
    import time

    from conftest import alive

    (tmp_path / "in").mkdir()
    for i in range(6):
        _tar(tmp_path / "in" / f"{i}.tar",
             [{"__key__": f"k{i}-{j}", "png": _png(10 * i + j)} for j in range(12)])
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "vqgan_datasets.cli", "encode", str(tmp_path / "in" / "{0..5}.tar"),
         str(out), "--model", str(tiny_model_dir), "--workers", "1", "--batch-size", "2",
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "0.stats.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    children = [int(c) for t in os.listdir(f"/proc/{process.pid}/task")
                for c in Path(f"/proc/{process.pid}/task/{t}/children").read_text().split()]
    assert children, "the encode runs its image workers as processes"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_TERMINATED == 143, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["complete"] is False
    assert 1 <= summary["shards"] < 6 and summary["manifest"] == str(out / "manifest.json")
    assert "terminated" in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards_written"] == summary["shards_written"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # temp files, claims
    time.sleep(1)
    assert not [pid for pid in children if alive(pid)]
