"""The `vqgan-datasets` command: help everywhere, one-line errors, each command once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqgan_datasets import cli

COMMANDS = ("demo", "encode", "decode", "preview", "report", "convert", "info")
SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


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
    assert json.loads(capsys.readouterr().out)["token_dtype"] == "uint8"


def test_convert_through_the_cli(tmp_path, tiny_model, capsys):
    torch = pytest.importorskip("torch")
    from test_checkpoints import _taming_state

    torch.save({"state_dict": _taming_state(tiny_model)}, tmp_path / "last.ckpt")
    assert cli.main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vqgan_datasets.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "encode" in out.stdout
