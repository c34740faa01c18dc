"""convert_checkpoint on each file layout (bare state dict, Lightning .ckpt with
hyper-parameters, LlamaGen's {"model": ...}, safetensors), forced families and what a
converted directory records; the weights-only reader (sourcefiles)."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from conftest import TINY
from test_llamagen import FIXTURES

from vqgan_datasets.models import checkpoints, sourcefiles
from vqgan_datasets.models.checkpoints import CheckpointError
from vqgan_datasets.models.conversion import convert_checkpoint
from vqgan_datasets.models.modeling import VQModel

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llamagen_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llamagen") / "vq_tiny_c2i.pt"
    with gzip.open(FIXTURES / "vq_tiny_c2i.pt.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def _same(a, b) -> bool:
    fa, fb = checkpoints.flatten(a), checkpoints.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_taming_layouts_and_what_the_directory_records(tiny_model, tmp_path):
    from test_taming import taming_state_dict

    state = taming_state_dict(tiny_model)
    torch.save(state, tmp_path / "bare.pt")
    hyper = {"embed_dim": 16, "n_embed": 64, "ddconfig": {"ch": 32}}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "epoch": 3}, tmp_path / "last.ckpt")
    for name in ("bare.pt", "last.ckpt"):
        out = convert_checkpoint(tmp_path / name, tmp_path / name.replace(".", "_"), config=TINY)
        recorded = json.loads((out / "config.json").read_text())
        assert (recorded["family"], recorded["weights"]) == ("taming", None)
        assert _same(VQModel.from_pretrained(str(out)).params, tiny_model.params)
    read = sourcefiles.read_source(tmp_path / "last.ckpt")
    assert read.extras["top_level_keys"] == ["epoch", "hyper_parameters", "state_dict"]
    assert read.extras["container"] == "state_dict" and read.extras["hyper_parameters"] == hyper


def test_llamagen_pt_and_safetensors_convert_alike(llamagen_file, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(llamagen_file, weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "vq.safetensors")
    from_pt = VQModel.from_pretrained(str(convert_checkpoint(llamagen_file, tmp_path / "a")))
    from_st = VQModel.from_pretrained(str(convert_checkpoint(tmp_path / "vq.safetensors",
                                                             tmp_path / "b")))
    assert from_pt.config == from_st.config and from_pt.config.family == "llamagen"
    assert _same(from_pt.params, from_st.params)


def test_a_forced_family_that_does_not_fit_names_the_tensors(llamagen_file, tmp_path):
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(llamagen_file, tmp_path / "m", family="taming")
    message = str(info.value)
    assert message.startswith(str(llamagen_file))
    assert "encoder.down." in message or "encoder.conv_in.weight" in message
    with pytest.raises(ValueError, match="unknown tokenizer family 'vq'"):
        convert_checkpoint(llamagen_file, tmp_path / "m", family="vq")
    assert not (tmp_path / "m").exists()


def test_files_without_weights_of_a_known_family(tmp_path):
    torch.save({"net": {"fc.weight": torch.zeros(4, 3)}, "step": 7}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no weights found: top-level keys .'net', 'step'."):
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "m")
    torch.save({"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}, tmp_path / "fc.pt")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of a known tokenizer family.*"
                       r"fc\.bias \(4,\).*taming"):
        convert_checkpoint(tmp_path / "fc.pt", tmp_path / "m")


def test_public_entry_points(llamagen_file, tmp_path, capsys):
    import vqgan_datasets
    from vqgan_datasets import cli

    assert vqgan_datasets.convert_checkpoint is convert_checkpoint
    assert cli.main(["convert", str(llamagen_file), str(tmp_path / "m"), "--family", "llamagen",
                     "--value-range", "0,1"]) == 0
    recorded = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (recorded["family"], recorded["value_range"]) == ("llamagen", [0.0, 1.0])
