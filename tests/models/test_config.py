"""VQGANConfig validation: every bad field is refused with its name and what was expected."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets.models import checkpoints
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.config import VQGANConfig

# (change to TINY's dict, exception type, text the message must hold)
BAD = [
    ({"norm_groups": 0}, ValueError, "norm_groups: expected an integer >= 1, got 0"),
    ({"ch": "32"}, TypeError, "ch: expected an integer >= 1, got '32' (str)"),
    ({"ch": True}, TypeError, "ch: expected an integer >= 1, got True (bool)"),
    ({"ch": 32.0}, TypeError, "ch: expected an integer >= 1, got 32.0 (float)"),
    ({"ch": -32}, ValueError, "ch: expected an integer >= 1, got -32"),
    ({"resolution": -64}, ValueError, "resolution: expected an integer >= 1, got -64"),
    ({"z_channels": 0}, ValueError, "z_channels: expected an integer >= 1"),
    ({"num_res_blocks": -1}, ValueError, "num_res_blocks: expected an integer >= 0"),
    ({"ch_mult": []}, ValueError, "ch_mult: expected at least one level"),
    ({"ch_mult": 2}, TypeError, "ch_mult: expected a list of integers >= 1, got 2 (int)"),
    ({"ch_mult": "122"}, TypeError, "ch_mult: expected a list of integers >= 1, got '122' (str)"),
    ({"ch_mult": [1, 2.5, 2]}, TypeError, "ch_mult[1]: expected an integer >= 1, got 2.5 (float)"),
    ({"ch_mult": [1, 0, 2]}, ValueError, "ch_mult[1]: expected an integer >= 1, got 0"),
    ({"n_embed": 0}, ValueError, "n_embed: expected an integer >= 1, got 0"),
    ({"embed_dim": 0}, ValueError, "embed_dim: expected an integer >= 1, got 0"),
    ({"resolution": 66}, ValueError, "resolution: 66 is not divisible by the downsample factor 4"),
    ({"attn_resolutions": ["16"]}, TypeError, "attn_resolutions[0]: expected an integer >= 1"),
    ({"attn_resolutions": [0]}, ValueError, "attn_resolutions[0]: expected an integer >= 1, got 0"),
    ({"value_range": [1]}, ValueError, "value_range: expected [low, high] with low < high"),
    ({"value_range": [1, 0]}, ValueError, "value_range: expected [low, high] with low < high"),
    ({"value_range": [[0], 1]}, TypeError, "value_range: expected two numbers"),
    ({"value_range": ["0", 1]}, TypeError, "value_range: expected two numbers"),
    ({"value_range": [float("-inf"), 1]}, ValueError, "value_range: expected finite numbers"),
    ({"value_range": [float("nan"), 1]}, ValueError, "value_range: expected finite numbers"),
    ({"value_range": "abc"}, ValueError, "unknown value_range 'abc'"),
    ({"norm_groups": 7}, ValueError, "divisible by norm_groups=7"),
    ({"dropout": "x"}, TypeError, "dropout: expected a number in [0, 1), got 'x' (str)"),
    ({"dropout": 1.5}, ValueError, "dropout: expected a number in [0, 1), got 1.5"),
    ({"double_z": "no"}, TypeError, "double_z: expected true or false, got 'no' (str)"),
    ({"resamp_with_conv": 1}, TypeError, "resamp_with_conv: expected true or false, got 1 (int)"),
]


@pytest.mark.parametrize("change,kind,text", BAD, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))
                                                       for c, _, _ in BAD])
def test_bad_field_names_itself(change, kind, text):
    with pytest.raises(kind) as info:
        VQGANConfig.from_dict({**TINY.to_dict(), **change})
    assert text in str(info.value)
    assert str(info.value).startswith("invalid VQGANConfig: ")


@pytest.mark.parametrize("change,kind,text", BAD[:4], ids=["norm_groups", "ch-str", "ch-bool", "ch-float"])
def test_config_json_errors_name_the_file_and_field(tmp_path, change, kind, text):
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_dict(), **change}))
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and text in message


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as info:
        VQGANConfig.from_dict({**TINY.to_dict(), "n_embed": 0, "embed_dim": -1, "resolution": 66})
    message = str(info.value)
    assert "n_embed:" in message and "embed_dim:" in message and "resolution: 66" in message


def test_type_problems_come_before_value_problems():
    # A wrong type would make the divisibility checks meaningless (or crash them): report it alone.
    with pytest.raises(TypeError, match="ch_mult\\[0\\]") as info:
        VQGANConfig.from_dict({**TINY.to_dict(), "ch_mult": ["1", 2], "n_embed": 0})
    assert "n_embed" not in str(info.value)


def test_config_json_not_an_object_or_not_text(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
        checkpoints.load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\x80\xff\x00garbage")
    with pytest.raises(CheckpointError, match="config.json: not valid UTF-8 JSON"):
        checkpoints.load_config(tmp_path)


def test_numpy_integers_accepted_and_normalised():
    config = VQGANConfig.from_dict({**TINY.to_dict(), "ch": np.int64(32), "ch_mult": np.array([1, 2, 2])})
    assert config == TINY
    assert type(config.ch) is int and all(type(m) is int for m in config.ch_mult)
    assert json.loads(config.to_json_string())["ch_mult"] == [1, 2, 2]


def test_valid_configs_still_load():
    assert VQGANConfig() == VQGANConfig.from_dict(VQGANConfig().to_dict())
    assert TINY.replace(num_res_blocks=0, attn_resolutions=(), dropout=0.1).num_res_blocks == 0
    assert TINY.replace(value_range=[0, 1]).value_range == (0.0, 1.0)
    assert VQGANConfig.from_dict({**TINY.to_dict(), "value_range": "[0, 1]"}).value_range == (0.0, 1.0)


def test_taming_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "model.yaml").write_text(
        "model:\n  params:\n    n_embed: 0\n    ddconfig:\n      ch: 32\n      ch_mult: [1, 2, 2]\n"
        "      resolution: 64\n      z_channels: 32\n"
    )
    with pytest.raises(ValueError) as info:
        VQGANConfig.from_taming_yaml(tmp_path / "model.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'model.yaml'}: ")
    assert "n_embed: expected an integer >= 1, got 0" in str(info.value)


def test_from_json_file_errors_name_the_file(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({**TINY.to_dict(), "ch": "32"}))
    with pytest.raises(TypeError, match=f"^{file}: invalid VQGANConfig: ch: expected an integer"):
        VQGANConfig.from_json_file(file)
    file.write_text("[]")
    with pytest.raises(ValueError, match="expected a mapping of config fields, got list"):
        VQGANConfig.from_json_file(file)
    file.write_text(TINY.to_json_string())
    assert VQGANConfig.from_json_file(file) == TINY


# Every field bounded: a config.json alone can never make loading run for minutes or ask for
# terabytes (each refused in well under a second, naming the field).
TOO_BIG = [
    ({"num_res_blocks": 1000}, "num_res_blocks: expected an integer <= 64, got 1,000"),
    ({"num_res_blocks": 1_000_000}, "num_res_blocks: expected an integer <= 64"),
    ({"ch": 1_000_000}, "ch: expected an integer <= 16,384"),
    ({"resolution": 2**20}, "resolution: expected an integer <= 65,536"),
    ({"n_embed": 2**31}, "n_embed: expected an integer <= 2,147,483,647, got 2,147,483,648"),
    ({"z_channels": 10**9}, "z_channels: expected an integer <= 16,384"),
    ({"embed_dim": 10**9}, "embed_dim: expected an integer <= 16,384"),
    ({"in_channels": 10**6}, "in_channels: expected an integer <= 64"),
    ({"out_ch": 10**6}, "out_ch: expected an integer <= 64"),
    ({"norm_groups": 10**6}, "norm_groups: expected an integer <= 16,384"),
    ({"ch_mult": [1] * 1_000_000}, "ch_mult: expected at most 16 entries, got 1,000,000"),
    ({"ch_mult": [1, 10**6]}, "ch_mult[1]: expected an integer <= 16,384"),
    ({"attn_resolutions": [16] * 1000}, "attn_resolutions: expected at most 64 entries"),
    ({"attn_resolutions": [2**40]}, "attn_resolutions[0]: expected an integer <= 65,536"),
    ({"ch": 4096, "ch_mult": [1, 8]}, "the widest level has ch*ch_mult = 32,768 channels"),
    ({"ch": 2048, "ch_mult": [1, 2, 4, 8], "num_res_blocks": 64, "norm_groups": 32},
     "has at least 410,706,248,704 parameters, expected at most 4,294,967,296"),
    ({"n_embed": 2**31 - 1, "embed_dim": 256}, "parameters, expected at most 4,294,967,296"),
]


@pytest.mark.parametrize("change,text", TOO_BIG, ids=[
    "-".join(f"{k}={str(v)[:12]}" for k, v in c.items()) for c, _ in TOO_BIG])
def test_every_field_is_bounded_and_refused_at_once(tmp_path, change, text):
    import time

    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_dict(), **change}))
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_config(tmp_path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: invalid VQGANConfig: ")
    assert text in message


def test_published_sizes_are_within_the_bounds():
    # taming f16-16384 (ch 128, 2 res blocks), IBQ's 262,144 codes with 4 res blocks, an f8
    # 512-wide config at 1024 px: all well inside every bound.
    VQGANConfig()
    VQGANConfig(num_res_blocks=4, n_embed=262_144, embed_dim=256)
    VQGANConfig(ch=128, ch_mult=(1, 2, 2, 4), resolution=1024, n_embed=2**18, embed_dim=256)
