"""The IBQ family (TencentARC/SEED-Voken, `src/IBQ/`): index backpropagation quantization.

Its network is taming's own Encoder/Decoder (SEED-Voken's `diffusionmodules/model.py` is
taming's file), with taming's tensor names, `quant_conv` and `post_quant_conv`. What differs is
the quantizer: at inference the index is the argmax over the codebook of softmax(z·e), that is
of z·e, with neither side normalised ("dot" in `quantizers`), and the decoder reads the code
row. Published files are Lightning `.ckpt`s whose `state_dict` holds, for models trained with
`use_ema`, a LitEma copy of every parameter under `model_ema.<name without dots>`; SEED-Voken's
evaluation and reconstruction scripts swap those in (`ema_scope`), and so does `select_weights`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import taming
from .config import VQGANConfig
from .sourcefiles import config_from_seed_voken_yaml, lit_ema_weights

logger = logging.getLogger(__name__)

FAMILY = "ibq"
_EMA_PREFIX = "model_ema."
# LitEma's own buffers beside the parameter copies.
_EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
# The generator's parameters: what the EMA copies replace at inference.
_MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# TencentARC/IBQ-Tokenizer-<codes>[-Pretrain]; the pretrained files are IBQ_pretrain_<codes>.ckpt.
_HUB_REPO = re.compile(r"^tencentarc/ibq-tokenizer-", re.IGNORECASE)
_FILENAME = re.compile(r"^ibq_pretrain_\d+\.ckpt$", re.IGNORECASE)
_HYPER_SIGNS = ("IBQ", "IndexPropagation")
# IBQ's own constructor arguments (taming's VQModel has none of them).
_HYPER_KEYS = ("use_entropy_loss", "entropy_temperature", "sample_minimization_weight",
               "batch_maximization_weight")


def evidence(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any]) -> list[str]:
    """Signs of an IBQ file: LitEma copies of a taming-layout model, IBQ's hyper-parameters, a
    TencentARC IBQ Hub repo. (Its tensor names alone are taming's.)"""
    signs = []
    if f"{_EMA_PREFIX}quantizeembeddingweight" in names_to_shapes:
        signs.append("EMA copies model_ema.* of the codebook and network (SEED-Voken's LitEma; "
                     "taming's VQModel keeps none)")
    hyper = extras.get("hyper_parameters")
    if hyper:
        text = repr(hyper)
        named = [s for s in _HYPER_SIGNS if s in text]
        keys = [k for k in _HYPER_KEYS if k in text]
        if named:
            signs.append(f"hyper-parameters naming {', '.join(named)}")
        elif keys:
            signs.append(f"IBQ's hyper-parameters {', '.join(keys)}")
    source = extras.get("source") or {}
    repo = str(source.get("repo_id") or "")
    if _HUB_REPO.match(repo):
        signs.append(f"published in the Hub repo {repo}")
    filename = os.path.basename(str(source.get("filename") or ""))
    if _FILENAME.match(filename):
        signs.append(f"file name {filename} (SEED-Voken's pretrained IBQ tokenizers)")
    return signs


def select_weights(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
    """The weights SEED-Voken's inference runs: each generator parameter's EMA copy when the file
    has them ("ema"), else the live weights (None). Training-only tensors stay for `to_flax`
    to skip; the EMA copies themselves are dropped."""
    return lit_ema_weights(state, _MODEL_PREFIXES, "IBQ")


def infer_config(names_to_shapes: Mapping[str, tuple[int, ...]],
                 yaml_path: str | os.PathLike | None = None) -> VQGANConfig:
    """The architecture off the tensor shapes (taming's names), or from a SEED-Voken yaml
    (`model.init_args.ddconfig`, `n_embed`, `embed_dim`: configs/IBQ/gpu/*.yaml)."""
    if yaml_path is not None:
        return _from_yaml(yaml_path)
    shapes = {k: v for k, v in names_to_shapes.items() if not k.startswith(_EMA_PREFIX)}
    return taming.infer_taming_config(shapes).replace(family=FAMILY)


def _from_yaml(path: str | os.PathLike) -> VQGANConfig:
    return config_from_seed_voken_yaml(path, "IBQ yaml, configs/IBQ/gpu/*.yaml", family=FAMILY)


def to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Taming's renaming (IBQ keeps taming's names); LitEma's counters are skipped, and an EMA
    copy still in `state` (not passed through `select_weights`) is an error naming it."""
    return taming.to_flax({k: v for k, v in state.items() if k not in _EMA_BUFFERS}, config)
