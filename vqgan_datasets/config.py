"""VQGANConfig: a taming-transformers VQGAN described with taming's (and vqgan-jax's) field names."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

# Keys that vqgan-jax's config.json carries for `transformers` and that mean nothing to the model.
_IGNORED_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "num_resolutions",
        "temb_ch",
    }
)

# The value ranges we know how to name. A checkpoint's range is part of what its tokens mean.
VALUE_RANGES: dict[str, tuple[float, float]] = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The architecture of a taming-transformers VQGAN and the pixel range it expects.

    Field names are taming's (`ddconfig` plus `n_embed`/`embed_dim`), so taming yaml files and
    vqgan-jax `config.json` files load unchanged. `value_range` is ours: the pixel range the
    checkpoint was trained with, applied by the uint8 helpers only (never by `encode`).
    """

    ch: int = 128
    out_ch: int = 3
    in_channels: int = 3
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 16384
    dropout: float = 0.0
    resamp_with_conv: bool = True
    give_pre_end: bool = False
    value_range: tuple[float, float] = (-1.0, 1.0)
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions", "value_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        problems = []
        widths = [self.ch * m for m in self.ch_mult] + [self.ch]
        if any(w % self.norm_groups for w in widths):
            problems.append(
                f"every ch*ch_mult ({widths}) must be divisible by norm_groups={self.norm_groups}"
            )
        if not self.ch_mult:
            problems.append("ch_mult must name at least one level")
        if self.resolution % self.downsample_factor:
            problems.append(
                f"resolution {self.resolution} is not divisible by the downsample factor "
                f"{self.downsample_factor}"
            )
        low, high = self.value_range if len(self.value_range) == 2 else (0.0, 0.0)
        if not low < high:
            problems.append(f"value_range must be (low, high) with low < high, got {self.value_range}")
        if self.n_embed < 1 or self.embed_dim < 1:
            problems.append("n_embed and embed_dim must be positive")
        if problems:
            raise ValueError("invalid VQGANConfig: " + "; ".join(problems))

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side (16 for f16 models)."""
        return 2 ** (len(self.ch_mult) - 1)

    def grid_shape(self, image_size: int | None = None) -> tuple[int, int]:
        """The token grid (h, w) for square images of `image_size` (default: `resolution`)."""
        size = self.resolution if image_size is None else image_size
        if size % self.downsample_factor:
            raise ValueError(
                f"image_size {size} is not a multiple of the downsample factor "
                f"{self.downsample_factor}"
            )
        side = size // self.downsample_factor
        return side, side

    @property
    def token_dtype(self) -> str:
        """The smallest unsigned integer dtype that holds every code."""
        for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32)):
            if self.n_embed <= 2**bits:
                return name
        return "uint64"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("ch_mult", "attn_resolutions", "value_range"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VQGANConfig:
        """Build from a taming `ddconfig`-style or vqgan-jax `config.json` mapping; unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        unknown = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"unknown VQGAN config keys {sorted(unknown)}; expected taming's names: {sorted(known)}"
            )
        if isinstance(kwargs.get("value_range"), str):
            kwargs["value_range"] = _parse_value_range(kwargs["value_range"])
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> VQGANConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_taming_yaml(cls, path: str | os.PathLike, **overrides: Any) -> VQGANConfig:
        """Read a taming-transformers model yaml (`model.params.ddconfig`, `n_embed`, `embed_dim`)."""
        import yaml

        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        params = doc.get("model", doc).get("params", doc)
        if "ddconfig" not in params:
            raise ValueError(f"{path}: no model.params.ddconfig section (is it a taming VQGAN yaml?)")
        data = dict(params["ddconfig"])
        for key in ("n_embed", "embed_dim"):
            if key in params:
                data[key] = params[key]
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> VQGANConfig:
        return dataclasses.replace(self, **changes)


def _parse_value_range(text: str) -> tuple[float, float]:
    cleaned = text.strip().strip("[]()").replace(" ", "")
    if cleaned in VALUE_RANGES:
        return VALUE_RANGES[cleaned]
    raise ValueError(f"unknown value_range {text!r}; use one of {sorted(VALUE_RANGES)} or [low, high]")


def f16_16384() -> VQGANConfig:
    """The architecture of taming's ImageNet f16-16384 and flax-community/vqgan_f16_16384."""
    return VQGANConfig()
