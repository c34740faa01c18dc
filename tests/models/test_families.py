"""Which family a published file belongs to: signs of a non-taming family are never taken for
taming silently, a bare taming-named state dict stays taming (and the log says how to choose
IBQ), and a file of no known family gets an error naming what it holds."""

from __future__ import annotations

import logging

import pytest
from conftest import TINY
from test_llamagen import llamagen_shapes

from vqgan_datasets.models import checkpoints, families
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.config import FAMILIES, VQGANConfig
from vqgan_datasets.models.modeling import param_shapes

LLAMAGEN = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,),
                       z_channels=32, embed_dim=8, n_embed=64, family="llamagen")


def taming_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Our tree's shapes under taming's tensor names (conv weights OIHW)."""
    out = {}
    for key, leaf in checkpoints.flatten(param_shapes(config)).items():
        *path, kind = key
        name = ".".join(path)
        for prefix in ("down", "up", "block", "attn"):
            name = name.replace(f"{prefix}_", f"{prefix}.")
        shape = tuple(leaf.shape)
        if kind == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[f"{name}.{'bias' if kind == 'bias' else 'weight'}"] = shape
    return out


def test_every_family_has_a_module():
    for name in FAMILIES:
        module = families.family_module(name)
        assert name == module.FAMILY
        assert all(callable(getattr(module, f)) for f in ("evidence", "infer_config", "to_flax"))
    with pytest.raises(ValueError, match="unknown tokenizer family 'vqvae'; known families: "):
        families.family_module("vqvae")


def test_a_bare_taming_state_dict_stays_taming_and_says_how_to_choose(caplog):
    shapes = taming_shapes(TINY)
    with caplog.at_level(logging.INFO, logger="vqgan_datasets.models.families"):
        family, signs = families.detect(shapes, {"top_level_keys": ["state_dict"]}, "last.ckpt")
    assert family == "taming" and signs
    assert "family='ibq'" in caplog.text and "--family ibq" in caplog.text


def test_llamagen_files_are_detected():
    shapes = llamagen_shapes(LLAMAGEN)
    family, signs = families.detect(shapes, {"top_level_keys": ["model"], "container": "model"})
    assert family == "llamagen"
    assert any("codebook_used" in sign for sign in signs)


def test_a_sign_of_another_family_is_never_taken_for_taming():
    # Taming's tensor names, published in LlamaGen's repo: not silently taming.
    extras = {"top_level_keys": ["model"],
              "source": {"repo_id": "FoundationVision/LlamaGen", "filename": "vq_ds16_c2i.pt"}}
    family, signs = families.detect(taming_shapes(TINY), extras)
    assert family != "taming"
    assert any("FoundationVision/LlamaGen" in sign for sign in signs)


def test_a_file_of_no_known_family_names_what_it_holds():
    shapes = {"backbone.layer1.weight": (64, 3, 7, 7), "backbone.layer1.bias": (64,),
              "head.fc.weight": (1000, 64)}
    with pytest.raises(CheckpointError) as info:
        families.detect(shapes, {"top_level_keys": ["net", "epoch"]}, "resnet.pt")
    message = str(info.value)
    assert message.startswith("resnet.pt: not a checkpoint of a known tokenizer family")
    assert "['net', 'epoch']" in message and "backbone.layer1.weight (64, 3, 7, 7)" in message
    assert all(name in message for name in FAMILIES) and "--family" in message


def test_the_config_names_the_family_and_what_follows_from_it():
    assert VQGANConfig.from_dict({}).family == "taming"  # a config.json without it: taming
    kinds = {name: VQGANConfig(family=name).quantizer for name in FAMILIES}
    assert kinds == {"taming": "l2", "llamagen": "cosine", "ibq": "dot", "maskgit": "l2",
                     "open_magvit2": "lfq"}
    assert VQGANConfig(family="llamagen").preprocess == "adm_center_crop"
    assert VQGANConfig().preprocess == "lanczos_center_crop"
    assert [VQGANConfig(n_embed=n).token_dtype for n in (64, 65536, 65537, 262144)] == [
        "uint16", "uint16", "int32", "int32"]
    assert VQGANConfig.from_dict(VQGANConfig(family="llamagen", weights="ema").to_dict()) == \
        VQGANConfig(family="llamagen", weights="ema")
    with pytest.raises(ValueError, match=r"family: expected one of \['ibq', 'llamagen', "
                       r"'maskgit', 'open_magvit2', 'taming'\], got 'vqvae' \(str\)"):
        VQGANConfig(family="vqvae")
