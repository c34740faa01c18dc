"""taming-transformers checkpoints: conversion, the weights-only pickle allow-list, config
inference and taming yaml files (vqgan_datasets.models.taming)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY

from vqgan_datasets.models import checkpoints, taming
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.config import VQGANConfig
from vqgan_datasets.models.modeling import VQModel


def _same_params(a, b) -> bool:
    fa, fb = checkpoints.flatten(a), checkpoints.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_taming_yaml_config(tmp_path):
    (tmp_path / "model.yaml").write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 16\n"
        "    n_embed: 64\n    ddconfig:\n      double_z: false\n      z_channels: 32\n"
        "      resolution: 64\n      in_channels: 3\n      out_ch: 3\n      ch: 32\n"
        "      ch_mult: [1, 2, 2]\n      num_res_blocks: 1\n      attn_resolutions: [16]\n"
        "      dropout: 0.0\n    lossconfig:\n      target: taming.modules.losses.DummyLoss\n"
    )
    assert VQGANConfig.from_taming_yaml(tmp_path / "model.yaml") == TINY


torch = pytest.importorskip("torch")


def taming_state_dict(model: VQModel) -> dict:
    """Our tree back to taming's names and layouts (the inverse of the conversion)."""
    state = {}
    for key, value in checkpoints.flatten(model.params).items():
        *path, leaf = key
        name = ".".join(path)
        for prefix in ("down", "up", "block", "attn"):
            name = name.replace(f"{prefix}_", f"{prefix}.")
        if leaf == "kernel":
            state[name + ".weight"] = torch.from_numpy(np.asarray(value).transpose(3, 2, 0, 1).copy())
        elif leaf in ("scale", "embedding"):
            state[name + ".weight"] = torch.from_numpy(np.asarray(value).copy())
        else:
            state[name + ".bias"] = torch.from_numpy(np.asarray(value).copy())
    return state


def test_convert_plain_state_dict_and_errors(tiny_model, tmp_path):
    state = taming_state_dict(tiny_model)
    torch.save(state, tmp_path / "plain.pt")
    out = taming.convert_taming_checkpoint(tmp_path / "plain.pt", tmp_path / "m", TINY)
    assert _same_params(VQModel.from_pretrained(str(out)).params, tiny_model.params)
    # Architecture read off the weights when no config is given.
    out2 = taming.convert_taming_checkpoint(tmp_path / "plain.pt", tmp_path / "m2")
    assert VQModel.from_pretrained(str(out2)).config == TINY.replace(resolution=256, attn_resolutions=(64,))
    broken = dict(state)
    broken.pop("encoder.conv_in.bias")
    broken["decoder.extra.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError) as info:
        taming.convert_taming_checkpoint(tmp_path / "broken.ckpt", tmp_path / "b", TINY)
    assert "missing (1): encoder/conv_in/bias" in str(info.value)
    assert "decoder/extra/kernel" in str(info.value)


class Payload:
    """Stands for anything a malicious pickle could construct."""

    def __reduce__(self):
        # eval, not print: Ray (imported by earlier tests in this process) replaces
        # builtins.print with its own function, and pickle names whatever object it finds.
        return (eval, ("print('side effect from the checkpoint')",))


def test_pickled_code_is_refused_without_the_flag(tiny_model, tmp_path, capsys):
    import pickle

    torch.save({"state_dict": taming_state_dict(tiny_model), "evil": Payload()}, tmp_path / "x.ckpt",
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="builtins.eval.*unsafe_pickle=True"):
        taming.convert_taming_checkpoint(tmp_path / "x.ckpt", tmp_path / "m", TINY)
    assert "side effect" not in capsys.readouterr().out
    taming.convert_taming_checkpoint(tmp_path / "x.ckpt", tmp_path / "m", TINY,
                                     unsafe_pickle=True)
    assert "side effect" in capsys.readouterr().out


class SetattrPayload:
    """References builtins.setattr, whose name starts with the allowed builtins.set."""

    def __reduce__(self):
        return (setattr, ([], "append", None))


def test_pickle_allow_list_matches_exact_names(tiny_model, tmp_path):
    import pickle

    torch.save({"state_dict": taming_state_dict(tiny_model), "evil": SetattrPayload()},
               tmp_path / "x.ckpt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="builtins.setattr"):
        taming.convert_taming_checkpoint(tmp_path / "x.ckpt", tmp_path / "m", TINY)
    allowed = taming._is_stubbed
    assert allowed("builtins.set") and allowed("builtins.frozenset") and allowed("_codecs.encode")
    assert allowed("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    assert allowed("taming.models.vqgan.VQModel") and allowed("numpy.dtype")
    for name in ("builtins.setattr", "builtins.settrace", "builtins.slice_evil", "tamingx.evil",
                 "numpy_evil.run", "lightningx.Callback", "_codecs.decode_evil", "os.system"):
        assert not allowed(name), name


def test_taming_conversion_refuses_non_finite_weights(tiny_model, tmp_path):
    state = taming_state_dict(tiny_model)
    state["decoder.conv_out.bias"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite values .NaN or Inf. in decoder/conv_out/bias;"):
        taming.convert_taming_checkpoint(tmp_path / "nan.pt", tmp_path / "m", TINY)
    assert not (tmp_path / "m").exists()


def test_inferred_config_errors_name_the_checkpoint(tiny_model, tmp_path):
    state = taming_state_dict(tiny_model)
    state["encoder.down.1.block.0.conv1.weight"] = torch.zeros(16, 32, 3, 3)  # ch_mult[1] = 16 // 32
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as info:
        taming.convert_taming_checkpoint(tmp_path / "odd.pt", tmp_path / "m")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'odd.pt'}: invalid VQGANConfig: ch_mult[1]: expected an integer >= 1, got 0")
    assert message.endswith("pass config= (a taming yaml)")
    del state["encoder.conv_in.weight"]
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="odd.pt: cannot infer the config: no 'encoder.conv_in.weight'"):
        taming.convert_taming_checkpoint(tmp_path / "odd.pt", tmp_path / "m")
