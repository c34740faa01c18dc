"""The LlamaGen VQ family (FoundationVision/LlamaGen, `tokenizer/tokenizer_image/vq_model.py`).

Its network is taming's layout under other names: `conv_blocks.<level>.res.<i>` / `.attn.<i>`,
`mid.0/1/2`, the decoder's levels listed from the lowest resolution up, attention only at the
lowest level (and in the middle), GroupNorm(32, eps 1e-6), the same Down-/Upsample. What differs
is the quantizer: z and the codes are L2-normalised before the nearest-code search, and the
decoder reads the normalised codes ("cosine" in `quantizers`). Published files hold
`{"model": state_dict}` plus a `quantize.codebook_used` buffer (training statistics, ignored).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checkpoints import CheckpointError
from .config import VQGANConfig
from .taming import flax_tree

FAMILY = "llamagen"
# Hub repos that publish LlamaGen tokenizers, and their file names (vq_ds16_c2i.pt, ...).
_REPOS = ("foundationvision/llamagen", "peizesun/llamagen_t2i")
_FILENAME = re.compile(r"vq_ds\d+_(c2i|t2i)\.pt$")
_MID = ("block_1", "attn_1", "block_2")
# LlamaGen's Encoder/Decoder defaults, which its ModelArgs do not expose.
_DEFAULTS = {"ch": 128, "num_res_blocks": 2}


def evidence(names_to_shapes: Mapping[str, tuple[int, ...]], extras: Mapping[str, Any]) -> list[str]:
    """Signs of a LlamaGen VQ file: its module names, its codebook-usage buffer, its Hub repo."""
    signs = []
    for part in ("encoder", "decoder"):
        if any(name.startswith(f"{part}.conv_blocks.") for name in names_to_shapes):
            signs.append(f"tensor names {part}.conv_blocks.<level>.res.<i> (LlamaGen's {part})")
    if "quantize.codebook_used" in names_to_shapes:
        signs.append("a quantize.codebook_used buffer (LlamaGen's VectorQuantizer)")
    source = extras.get("source") or {}
    repo = str(source.get("repo_id") or "").lower()
    filename = os.path.basename(str(source.get("filename") or ""))
    if repo in _REPOS:
        signs.append(f"published in the Hub repo {source.get('repo_id')}")
    if _FILENAME.search(filename):
        signs.append(f"file name {filename} (LlamaGen's published tokenizers)")
    return signs


def infer_config(names_to_shapes: Mapping[str, tuple[int, ...]],
                 yaml_path: str | os.PathLike | None = None) -> VQGANConfig:
    """The architecture off the tensor shapes (levels, channels, codebook size and dimension), or
    from a yaml of LlamaGen's `ModelArgs` fields (codebook_size, codebook_embed_dim,
    encoder_ch_mult, decoder_ch_mult, z_channels)."""
    if yaml_path is not None:
        return _from_yaml(yaml_path)

    def shape(name: str) -> tuple[int, ...]:
        if name not in names_to_shapes:
            raise CheckpointError(f"cannot infer the config: no {name!r} in the checkpoint")
        return tuple(names_to_shapes[name])

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for n in names_to_shapes if (m := re.match(pattern, n))}
        return max(found) + 1 if found else 0

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count(r"encoder\.conv_blocks\.(\d+)\.")
    if levels == 0:
        raise CheckpointError("cannot infer the config: no encoder.conv_blocks.<level> tensors")
    blocks = count(r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    ch_mult = tuple(shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] // ch
                    for i in range(levels))
    decoder_mult = tuple(shape(f"decoder.conv_blocks.{k}.res.0.conv1.weight")[0] // ch
                         for k in reversed(range(count(r"decoder\.conv_blocks\.(\d+)\."))))
    decoder_blocks = count(r"decoder\.conv_blocks\.0\.res\.(\d+)\.")
    if decoder_mult != ch_mult or decoder_blocks != blocks + 1:
        raise CheckpointError(
            f"the encoder (channel multipliers {list(ch_mult)}, {blocks} res blocks per level) and "
            f"the decoder ({list(decoder_mult)}, {decoder_blocks}) differ; only LlamaGen models "
            "whose decoder mirrors the encoder (as VQ-8 and VQ-16) are supported"
        )
    n_embed, embed_dim = shape("quantize.embedding.weight")
    resolution = 256
    return VQGANConfig(
        ch=ch,
        in_channels=in_channels,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=ch_mult,
        num_res_blocks=blocks,
        attn_resolutions=(resolution // 2 ** (levels - 1),),
        resolution=resolution,
        z_channels=shape("encoder.conv_out.weight")[0],
        embed_dim=embed_dim,
        n_embed=n_embed,
        resamp_with_conv=levels == 1 or "encoder.conv_blocks.0.downsample.conv.weight" in names_to_shapes,
        family=FAMILY,
    )


def _from_yaml(path: str | os.PathLike) -> VQGANConfig:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, Mapping):
        raise CheckpointError(f"{os.fspath(path)}: expected a mapping of LlamaGen ModelArgs fields")
    encoder = tuple(doc.get("encoder_ch_mult", (1, 1, 2, 2, 4)))
    decoder = tuple(doc.get("decoder_ch_mult", encoder))
    if encoder != decoder:
        raise CheckpointError(f"{os.fspath(path)}: encoder_ch_mult {list(encoder)} and "
                              f"decoder_ch_mult {list(decoder)} differ; not supported")
    if not doc.get("codebook_l2_norm", True):
        raise CheckpointError(f"{os.fspath(path)}: codebook_l2_norm: false is not supported")
    resolution = int(doc.get("image_size", 256))
    return VQGANConfig(
        ch=int(doc.get("ch", _DEFAULTS["ch"])),
        ch_mult=encoder,
        num_res_blocks=int(doc.get("num_res_blocks", _DEFAULTS["num_res_blocks"])),
        attn_resolutions=(resolution // 2 ** (len(encoder) - 1),),
        resolution=resolution,
        z_channels=int(doc.get("z_channels", 256)),
        embed_dim=int(doc.get("codebook_embed_dim", 8)),
        n_embed=int(doc.get("codebook_size", 16384)),
        family=FAMILY,
    )


def to_flax(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """LlamaGen's names onto our tree; errors name the tensor and both shapes."""
    levels = config.num_resolutions

    def rename(name: str) -> tuple[str, ...] | None:
        if name == "quantize.codebook_used":
            return None
        parts = name.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv") or name == "quantize.embedding.weight":
            return tuple(parts)
        if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
            return ()
        top, rest = parts[0], parts[1:]
        if rest[0] in ("conv_in", "norm_out", "conv_out"):
            return (top, *rest)
        if rest[0] == "mid" and rest[1] in ("0", "1", "2"):
            return (top, "mid", _MID[int(rest[1])], *rest[2:])
        if rest[0] != "conv_blocks" or len(rest) < 4 or not rest[1].isdigit():
            return ()
        position = int(rest[1])
        level = f"down_{position}" if top == "encoder" else f"up_{levels - 1 - position}"
        kind = rest[2]
        if kind in ("res", "attn") and rest[3].isdigit():
            block = f"{'block' if kind == 'res' else 'attn'}_{rest[3]}"
            return (top, level, block, *rest[4:])
        if kind in ("downsample", "upsample"):
            return (top, level, kind, *rest[3:])
        return ()

    return flax_tree(state, config, rename)
