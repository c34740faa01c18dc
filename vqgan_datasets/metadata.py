"""TokenizerSpec: what made a token column (model, weights, preprocessing), as recorded metadata.

One record serves three uses: the fingerprint of a tokenizer (datasets' cache key), the metadata a
token dataset or shard carries, and the check that a decoder matches the tokens it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from . import __version__

# Bump when the meaning of tokens written by this library changes (layout, preprocessing).
FORMAT_VERSION = 1
PREPROCESSING = "rgb(alpha over white, exif) > resize shortest side LANCZOS > center crop"
_RGB = "rgb(alpha over white, exif)"
# The recorded preprocessing, by name (the families' own, and "fast", which decodes JPEGs at a
# reduced DCT scale first). The name leads the record, so the fingerprint carries it.
PREPROCESS_RECORDS = {
    "lanczos_center_crop": f"lanczos_center_crop: {PREPROCESSING}; full JPEG decode",
    "adm_center_crop": f"adm_center_crop: {_RGB} > BOX halving while the shortest side >= 2x "
    "the size > BICUBIC shortest side > center crop at floor offsets; full JPEG decode",
    "opencv_linear_center_crop": f"opencv_linear_center_crop: {_RGB} > OpenCV INTER_LINEAR "
    "shortest side > center crop at floor offsets; full JPEG decode",
    "torchvision_bilinear_center_crop": f"torchvision_bilinear_center_crop: {_RGB} > shortest "
    "side, the other truncated, PIL BILINEAR > center crop; full JPEG decode",
    "fast": f"fast: {PREPROCESSING}; DCT-scaled JPEG decode, antialiased resize",
}
# Records of earlier versions: the exact mode (draft=False) and the fast mode. Records of the
# old drafted default say PREPROCESSING alone, which no mode reproduces.
_EARLIER_RECORDS = {
    f"{PREPROCESSING}; full JPEG decode (no draft)": "lanczos_center_crop",
    f"{PREPROCESSING}; fast: DCT-scaled JPEG decode, antialiased resize": "fast",
}


def preprocessing(preprocess: str = "exact", *, family_default: str = "lanczos_center_crop",
                  draft: bool | None = None) -> str:
    """The recorded preprocessing: "exact" is the family's own (`family_default`, a model
    config's `preprocess`), "fast" or a name is itself. `draft` is deprecated and ignored
    (drafting is preprocess="fast"), also when passed in its old place."""
    if isinstance(preprocess, bool):  # the old positional `draft`
        preprocess = "exact"
    name = family_default if preprocess == "exact" else preprocess
    if name not in PREPROCESS_RECORDS:
        raise ValueError(f"preprocess must be one of {('exact', *PREPROCESS_RECORDS)}, "
                         f"got {preprocess!r}")
    return PREPROCESS_RECORDS[name]


METADATA_KEY = "vqgan_datasets"  # key in Arrow schema metadata / dataset card / shard stats


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """How a token sequence was made; equal specs make equal tokens for equal images."""

    model_name: str | None
    revision: str | None
    weights_digest: str
    config: Mapping[str, Any]
    image_size: int
    grid: tuple[int, int]
    codebook_size: int
    token_dtype: str
    value_range: tuple[float, float]
    compute_dtype: str
    preprocessing: str = PREPROCESSING
    format_version: int = FORMAT_VERSION
    library_version: str = __version__

    @classmethod
    def describe(cls, config: Any, weights_digest: str, *, model_name: str | None = None,
                 revision: str | None = None, image_size: int | None = None,
                 compute_dtype: str = "float32", preprocess: str = "exact",
                 draft: bool | None = None) -> TokenizerSpec:
        """The spec of a model known by its config and weights digest (no weights needed)."""
        size = int(image_size or config.resolution)
        return cls(
            model_name=model_name,
            revision=revision,
            weights_digest=weights_digest,
            config=config.to_dict(),
            image_size=size,
            grid=config.grid_shape(size),
            codebook_size=config.n_embed,
            token_dtype=config.token_dtype,
            value_range=tuple(config.value_range),
            compute_dtype=compute_dtype,
            preprocessing=preprocessing(preprocess, family_default=config.preprocess),
        )

    @classmethod
    def from_model(cls, model: Any, image_size: int | None = None, *,
                   preprocess: str = "exact", draft: bool | None = None) -> TokenizerSpec:
        """The spec of `model` (a VQModel) encoding square images of `image_size`."""
        dtype = str(model.dtype.name if hasattr(model.dtype, "name") else model.dtype)
        return cls.describe(model.config, model.weights_digest, model_name=model.name,
                            revision=model.revision, image_size=image_size,
                            compute_dtype=dtype, preprocess=preprocess)

    @property
    def preprocess(self) -> str | None:
        """The preprocessing by name ("lanczos_center_crop", "adm_center_crop", ..., "fast"),
        the mode to pass to encode the same way again; None for the drafted default of earlier
        versions, whose pixels no mode reproduces."""
        for name, record in PREPROCESS_RECORDS.items():
            if self.preprocessing == record:
                return name
        return _EARLIER_RECORDS.get(self.preprocessing)

    @property
    def family(self) -> str:
        """The tokenizer family of the model that made the tokens (records before families
        existed are taming's)."""
        return str(self.config.get("family", "taming"))

    @property
    def sequence_length(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = dict(self.config)
        out["grid"] = list(self.grid)
        out["value_range"] = list(self.value_range)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["grid"] = tuple(kwargs["grid"])
        kwargs["value_range"] = tuple(float(v) for v in kwargs["value_range"])
        return cls(**kwargs)

    def identity(self) -> dict[str, Any]:
        """What decides the tokens: everything but the library version and the model's name
        (the same weights under another name make the same tokens)."""
        out = self.to_dict()
        for key in ("library_version", "model_name", "revision"):
            out.pop(key)
        return out

    def fingerprint(self) -> str:
        """A short stable hash of `identity()`: equal for equal tokens, across processes."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def mismatch(self, other: TokenizerSpec) -> str | None:
        """Why tokens made with `self` cannot be decoded by a model with spec `other`, or None."""
        reasons = []
        if self.weights_digest != other.weights_digest:
            reasons.append(
                f"weights differ ({self.model_name or '?'} {self.weights_digest[:23]} vs "
                f"{other.model_name or '?'} {other.weights_digest[:23]})"
            )
        if self.family != other.family:
            reasons.append(f"tokenizer family {self.family} vs {other.family}")
        if self.codebook_size != other.codebook_size:
            reasons.append(f"codebook size {self.codebook_size} vs {other.codebook_size}")
        if tuple(self.value_range) != tuple(other.value_range):
            reasons.append(f"value range {self.value_range} vs {other.value_range}")
        return "; ".join(reasons) or None
