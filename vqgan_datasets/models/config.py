"""VQGANConfig: a taming-transformers VQGAN described with taming's (and vqgan-jax's) field names."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

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

# Tokenizer families: name -> (quantizer kind, default exact preprocessing).
FAMILIES: dict[str, tuple[str, str]] = {
    "taming": ("l2", "lanczos_center_crop"),
    "llamagen": ("cosine", "adm_center_crop"),
    "ibq": ("dot", "opencv_linear_center_crop"),
    "maskgit": ("l2", "adm_center_crop"),
    "open_magvit2": ("lfq", "torchvision_bilinear_center_crop"),
}

# The value ranges we know how to name. A checkpoint's range is part of what its tokens mean.
VALUE_RANGES: dict[str, tuple[float, float]] = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The architecture of a taming-transformers VQGAN and the pixel range it expects.

    Field names are taming's (`ddconfig` plus `n_embed`/`embed_dim`), so taming yaml files and
    vqgan-jax `config.json` files load unchanged. `value_range` is ours: the pixel range the
    checkpoint was trained with, applied by the uint8 helpers only (never by `encode`).
    `family` names the tokenizer family (`FAMILIES`): it picks the quantizer kind and the default
    preprocessing; a config without it is taming's. `weights` says which of a source file's
    weight sets these are (e.g. "ema"), None when the file holds one.
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
    family: str = "taming"
    weights: str | None = None

    def __post_init__(self) -> None:
        _check_family(self)
        _validate(self)

    @property
    def quantizer(self) -> str:
        """The quantizer kind of the family: "l2", "cosine", "dot" (see models.quantizers) or "lfq"
        (Open-MAGVIT2's lookup-free signs, in models.magvit2)."""
        return FAMILIES[self.family][0]

    @property
    def preprocess(self) -> str:
        """The exact preprocessing the family's own extraction uses (pipeline.images)."""
        return FAMILIES[self.family][1]

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
        """How tokens are stored: "uint16" up to 65,536 codes, "int32" above."""
        return "uint16" if self.n_embed <= 2**16 else "int32"

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
        """Read a config.json; errors name the file and the field."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return _from_file(path, data)

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
        return _from_file(path, data)

    def replace(self, **changes: Any) -> VQGANConfig:
        return dataclasses.replace(self, **changes)


def _check_family(config: VQGANConfig) -> None:
    if not isinstance(config.family, str) or config.family not in FAMILIES:
        raise ValueError(
            f"{_PREFIX}family: expected one of {sorted(FAMILIES)}, got {_shown(config.family)}"
        )
    if config.weights is not None and not isinstance(config.weights, str):
        raise TypeError(f"{_PREFIX}weights: expected a name or null, got {_shown(config.weights)}")


def _parse_value_range(text: str) -> tuple[float, float]:
    cleaned = text.strip().strip("[]()").replace(" ", "")
    if cleaned in VALUE_RANGES:
        return VALUE_RANGES[cleaned]
    raise ValueError(
        f"{_PREFIX}unknown value_range {text!r}; use one of {sorted(VALUE_RANGES)} or [low, high]"
    )


def _from_file(path: str | os.PathLike, data: Any) -> VQGANConfig:
    """`VQGANConfig.from_dict(data)`, with the file's name in front of any error's message."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{os.fspath(path)}: expected a mapping of config fields, got {type(data).__name__}")
    try:
        return VQGANConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"{os.fspath(path)}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Validation: run once per config (in __post_init__), so that a bad config.json fails here with
# the field's name instead of deep inside the model (ZeroDivisionError, TypeError, XLA errors).

_PREFIX = "invalid VQGANConfig: "
# Integer fields and their smallest valid value (taming builds a working model with 0 res blocks).
_INT_MINIMUM = {
    "ch": 1, "out_ch": 1, "in_channels": 1, "num_res_blocks": 0, "resolution": 1,
    "z_channels": 1, "embed_dim": 1, "n_embed": 1, "norm_groups": 1,
}
_BOOL_FIELDS = ("double_z", "resamp_with_conv", "give_pre_end")
# Upper bounds: far above every published tokenizer (widths <= 512, 4 res blocks, 5 levels,
# 262,144 codes), low enough that no field can make building or loading the model run for
# minutes or ask for terabytes. n_embed: tokens are stored as int32 at most.
_INT_MAXIMUM = {
    "ch": 16384, "out_ch": 64, "in_channels": 64, "num_res_blocks": 64, "resolution": 65536,
    "z_channels": 16384, "embed_dim": 16384, "n_embed": 2**31 - 1, "norm_groups": 16384,
}
_MAX_LEVELS = 16  # len(ch_mult): a downsample factor up to 2 ** 15
_MAX_WIDTH = 16384  # every channel width ch * ch_mult[i]
_MAX_ATTENTION = 64  # len(attn_resolutions)
# The weights a config describes: at most 2 ** 32 parameters (16 GiB as float32), counted from
# below (the two 3x3 convolutions of each res block, in encoder and decoder, and the codebook).
_MAX_PARAMETERS = 2**32


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate(config: VQGANConfig) -> None:
    """Normalise sequences and numpy scalars to plain tuples and ints; raise TypeError for wrong
    types (all of them, alone), else ValueError for every out-of-range value, each by field name."""
    wrong: list[str] = []
    values: dict[str, Any] = {}
    for name, minimum in _INT_MINIMUM.items():
        value = getattr(config, name)
        if _is_int(value):
            values[name] = int(value)
        else:
            wrong.append(f"{name}: expected an integer >= {minimum}, got {_shown(value)}")
    for name in ("ch_mult", "attn_resolutions"):
        value = getattr(config, name)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            wrong.append(f"{name}: expected a list of integers >= 1, got {_shown(value)}")
            continue
        items = list(value)
        if len(items) > _MAX_LEVELS + _MAX_ATTENTION:  # refused by length, unread
            values[name] = tuple(items)
            continue
        bad = [f"{name}[{i}]: expected an integer >= 1, got {_shown(v)}"
               for i, v in enumerate(items) if not _is_int(v)]
        wrong += bad[:4] + ([f"{name}: {len(bad) - 4} more"] if len(bad) > 4 else [])
        if not bad:
            values[name] = tuple(int(v) for v in items)
    value_range = config.value_range
    if isinstance(value_range, Iterable) and not isinstance(value_range, (str, bytes, Mapping)):
        value_range = tuple(value_range)
        if all(_is_real(v) for v in value_range):
            values["value_range"] = tuple(float(v) for v in value_range)
    if "value_range" not in values:
        wrong.append(f"value_range: expected two numbers [low, high], got {_shown(config.value_range)}")
    if not _is_real(config.dropout):
        wrong.append(f"dropout: expected a number in [0, 1), got {_shown(config.dropout)}")
    wrong += [f"{name}: expected true or false, got {_shown(getattr(config, name))}"
              for name in _BOOL_FIELDS if not isinstance(getattr(config, name), (bool, np.bool_))]
    if wrong:
        raise TypeError(_PREFIX + "; ".join(wrong))
    for name, value in values.items():
        object.__setattr__(config, name, value)
    for name in _BOOL_FIELDS:
        object.__setattr__(config, name, bool(getattr(config, name)))
    problems = _value_problems(config)
    if problems:
        raise ValueError(_PREFIX + "; ".join(problems))


def _value_problems(config: VQGANConfig) -> list[str]:
    problems = [
        f"{name}: expected an integer >= {minimum}, got {getattr(config, name)}"
        for name, minimum in _INT_MINIMUM.items() if getattr(config, name) < minimum
    ]
    problems += [
        f"{name}: expected an integer <= {maximum:,}, got {getattr(config, name):,}"
        for name, maximum in _INT_MAXIMUM.items() if getattr(config, name) > maximum
    ]
    if not config.ch_mult:
        problems.append("ch_mult: expected at least one level, got []")
    for name, most, largest in (("ch_mult", _MAX_LEVELS, _MAX_WIDTH),
                                ("attn_resolutions", _MAX_ATTENTION, _INT_MAXIMUM["resolution"])):
        values = getattr(config, name)
        if len(values) > most:
            problems.append(f"{name}: expected at most {most} entries, got {len(values):,}")
            continue
        problems += [f"{name}[{i}]: expected an integer >= 1, got {v}" if v < 1 else
                     f"{name}[{i}]: expected an integer <= {largest:,}, got {v:,}"
                     for i, v in enumerate(values) if not 1 <= v <= largest][:4]
    if not problems:  # sizes within bounds: what they add up to
        problems += _size_problems(config)
    low, high = config.value_range if len(config.value_range) == 2 else (0.0, 0.0)
    if not all(math.isfinite(v) for v in config.value_range):
        problems.append(f"value_range: expected finite numbers, got {list(config.value_range)}")
    elif not low < high:
        problems.append(
            f"value_range: expected [low, high] with low < high, got {list(config.value_range)}"
        )
    if not 0 <= config.dropout < 1:
        problems.append(f"dropout: expected a number in [0, 1), got {config.dropout}")
    if len(config.ch_mult) > _MAX_LEVELS:
        return problems
    widths = [config.ch * m for m in config.ch_mult] + [config.ch]
    if config.norm_groups >= 1 and any(w % config.norm_groups for w in widths):
        problems.append(
            f"ch, ch_mult: every channel width ch*ch_mult ({sorted(set(widths))}) must be "
            f"divisible by norm_groups={config.norm_groups}"
        )
    if config.ch_mult and config.resolution % config.downsample_factor:
        problems.append(
            f"resolution: {config.resolution} is not divisible by the downsample factor "
            f"{config.downsample_factor} (2 ** (len(ch_mult) - 1))"
        )
    return problems


def _size_problems(config: VQGANConfig) -> list[str]:
    widest = config.ch * max(config.ch_mult)
    if widest > _MAX_WIDTH:
        return [f"ch, ch_mult: the widest level has ch*ch_mult = {widest:,} channels, expected "
                f"at most {_MAX_WIDTH:,}"]
    parameters = _parameters_at_least(config)
    if parameters > _MAX_PARAMETERS:
        return [f"ch, ch_mult, num_res_blocks, n_embed, embed_dim: the model described has at "
                f"least {parameters:,} parameters, expected at most {_MAX_PARAMETERS:,}"]
    return []


def _parameters_at_least(config: VQGANConfig) -> int:
    """A lower bound on the parameter count of every family's architecture for this config."""
    convs = sum(2 * config.num_res_blocks * 9 * (config.ch * m) ** 2 for m in config.ch_mult)
    return convs + config.n_embed * config.embed_dim


def f16_16384() -> VQGANConfig:
    """The architecture of taming's ImageNet f16-16384 and flax-community/vqgan_f16_16384."""
    return VQGANConfig()
