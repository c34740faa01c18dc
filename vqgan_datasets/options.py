"""How samples are encoded, and what happens to the ones that fail: shared by every adapter.

- `EncodeOptions`: one frozen, validated record of the encode settings (image size, batch size
  per device, on_error, preprocessing, host workers, kept images, field names, token dtype).
  The tokenizers, the webdataset stages, `tokenize_shards`, Ray and the CLI all take
  `options=EncodeOptions(...)`; their keyword arguments are shortcuts that `encode_options`
  turns into one.
- One naming scheme: `image_field`, `output_field`, `error_field`. The adapters' older names
  are aliases: `image_column`/`output_column`/`error_column` (datasets, Ray) and
  `image_key`/`output_key`/`error_key` (webdataset). A field left None gets the adapter's
  default name ("image"/"vqgan_tokens" for datasets, "jpg;png;..."/"vqgan.npy" for tar samples).
- Failures: `SampleError` names the sample (key or row, shard) and why; `ErrorPolicy` applies
  `on_error` (or a webdataset `handler=`) and counts into `StageStats`. One default
  everywhere: "raise". In shard conversion "raise" fails the shard (its report names the
  sample's key) while the other shards go on.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from .pipeline.images import PREPROCESS_MODES, ImageDecodeError

__all__ = [
    "ON_ERROR",
    "PREPROCESS_MODES",
    "EncodeOptions",
    "ErrorPolicy",
    "SampleError",
    "StageStats",
    "encode_options",
]

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip", "null"]
Preprocess = str  # one of PREPROCESS_MODES
ON_ERROR: tuple[str, ...] = ("raise", "skip", "null")
MAX_REPORTED_ERRORS = 100  # per shard / per stage; the counts stay exact beyond it

# Older names of the three fields, per adapter: alias -> field.
ALIASES: Mapping[str, str] = {
    "image_column": "image_field", "image_key": "image_field",
    "output_column": "output_field", "output_key": "output_field",
    "error_column": "error_field", "error_key": "error_field",
}


# ------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    """The encode settings, validated once. Frozen: share it between adapters and processes.

    `image_size`: square side (None: the model's resolution). `batch_size`: images per device
    per step (None: the engine's default for the backend). `on_error`: "raise" | "skip" |
    "null". `preprocess`: "exact" (the model family's own preprocessing, the same pixels for
    every input form), "fast" (DCT-scaled JPEG decode, a cheaper resize), or a family's
    preprocessing by name ("lanczos_center_crop", "adm_center_crop",
    "opencv_linear_center_crop"). `workers`: preprocessing processes (None: from
    the cores; 0: threads in this process). `keep_image`: keep the image field next to the
    tokens. `token_dtype`: None for the model's (uint16 up to 65,536 codes, int32 above).
    The aliases above and `draft` (deprecated, ignored) are accepted as keywords.
    """

    image_size: int | None = None
    batch_size: int | None = None
    on_error: OnError = "raise"
    preprocess: Preprocess = "exact"
    workers: int | None = None
    keep_image: bool = False
    image_field: str | tuple[str, ...] | None = None
    output_field: str | None = None
    error_field: str | None = None
    token_dtype: str | None = None
    image_column: dataclasses.InitVar[str | None] = None
    image_key: dataclasses.InitVar[str | Sequence[str] | None] = None
    output_column: dataclasses.InitVar[str | None] = None
    output_key: dataclasses.InitVar[str | None] = None
    error_column: dataclasses.InitVar[str | None] = None
    error_key: dataclasses.InitVar[str | None] = None
    draft: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, image_column, image_key, output_column, output_key, error_column,
                      error_key, draft) -> None:
        given = {"image_column": image_column, "image_key": image_key,
                 "output_column": output_column, "output_key": output_key,
                 "error_column": error_column, "error_key": error_key}
        for alias, value in given.items():
            if value is None:
                continue
            field = ALIASES[alias]
            current = getattr(self, field)
            if current is not None and current != value:
                raise ValueError(f"{field}={current!r} and {alias}={value!r} name the same "
                                 "field; pass one of them")
            object.__setattr__(self, field, value)
        if draft is not None:
            warn_draft()
        set_ = object.__setattr__
        set_(self, "image_size", _optional_positive("image_size", self.image_size))
        set_(self, "batch_size", _optional_positive("batch_size", self.batch_size))
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}"
            )
        if self.workers is not None:
            if isinstance(self.workers, bool) or not isinstance(self.workers, (int, np.integer)):
                raise TypeError(f"workers must be an int or None, got {self.workers!r}")
            if self.workers < 0:
                raise ValueError(f"workers must be >= 0, got {self.workers}")
            set_(self, "workers", int(self.workers))
        if not isinstance(self.keep_image, (bool, np.bool_)):  # "false" would read as True
            raise TypeError(f"keep_image must be True or False, got {self.keep_image!r}")
        set_(self, "keep_image", bool(self.keep_image))
        if self.image_field is not None:
            name = next((a for a in ("image_key", "image_column") if given[a] is not None),
                        "image_field")
            set_(self, "image_field", _image_fields(self.image_field, name))
        for field in ("output_field", "error_field"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{field} must be a non-empty string, got {value!r}")
        if self.output_field is not None and self.output_field in self.image_fields(()):
            raise ValueError("output_field must differ from image_field")
        if self.error_field is not None and self.error_field in (
                self.output_field, *self.image_fields(())):  # one field would overwrite the other
            raise ValueError(f"error_field {self.error_field!r} must differ from output_field "
                             "and image_field")
        if self.token_dtype is not None:
            try:
                dtype = np.dtype(self.token_dtype)
            except TypeError as e:
                raise ValueError(f"token_dtype {self.token_dtype!r} is not a dtype") from e
            if not np.issubdtype(dtype, np.integer):
                raise ValueError(f"token_dtype must be an integer dtype, got {dtype}")
            set_(self, "token_dtype", dtype.name)

    def image_fields(self, default: Sequence[str]) -> tuple[str, ...]:
        """The image field names to look for, in order (a ";"-joined string splits)."""
        if self.image_field is None:
            return tuple(default)
        return _parse_fields(self.image_field, "image_field")

    def replace(self, **changes: Any) -> EncodeOptions:
        """A copy with `changes` applied (aliases accepted)."""
        return _build(self.fields(), changes, type(self))

    def fields(self) -> dict[str, Any]:
        """Every field by name (no aliases)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def engine_kwargs(self) -> dict[str, Any]:
        """The Engine arguments these options set (left out when None: the engine decides)."""
        return {k: v for k, v in (("batch_size", self.batch_size), ("workers", self.workers))
                if v is not None}

    def settings(self) -> dict[str, Any]:
        """JSON-ready fields, for reports and records."""
        out = self.fields()
        if isinstance(out["image_field"], tuple):
            out["image_field"] = ";".join(out["image_field"])
        return out


def canonical(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with aliases renamed to their field; two names for one field raise."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        field = ALIASES.get(name, name)
        if field in out and out[field] != value:
            raise ValueError(f"{name}={value!r} and {field}={out[field]!r} name the same field; "
                             "pass one of them")
        out[field] = value
    return out


def encode_options(options: EncodeOptions | None = None, *,
                   defaults: Mapping[str, Any] | None = None, **shortcuts: Any) -> EncodeOptions:
    """The options an adapter runs with: `options` (or `EncodeOptions(**defaults)`, the
    adapter's own defaults) with every keyword shortcut that is not None applied on top.

    Aliases (`image_key`, `error_column`...) are accepted; `draft` warns and is ignored.
    """
    if options is not None and not isinstance(options, EncodeOptions):
        raise TypeError(f"options must be an EncodeOptions, got {type(options).__name__}")
    if shortcuts.pop("draft", None) is not None:
        warn_draft()
    given = {k: v for k, v in shortcuts.items() if v is not None}
    if options is None:
        return _build(canonical(dict(defaults or {})), given, EncodeOptions)
    return _build(options.fields(), given, type(options)) if given else options


def _build(base: Mapping[str, Any], given: Mapping[str, Any], cls: type) -> EncodeOptions:
    """`cls` (EncodeOptions or a subclass) from canonical `base` values overridden by `given`
    (aliases kept, so that a validation error names the keyword the caller used)."""
    names = {f.name for f in dataclasses.fields(cls)}
    overridden = canonical(given)
    unknown = sorted(set(overridden) - names)
    if unknown:
        raise TypeError(f"unknown encode options {unknown}; expected some of {sorted(names)}")
    kept = {k: v for k, v in base.items() if k not in overridden}
    return cls(**kept, **given)


_DRAFT_WARNED = False


def warn_draft() -> None:
    """`draft=` is deprecated: warn once per process."""
    global _DRAFT_WARNED
    if not _DRAFT_WARNED:
        _DRAFT_WARNED = True
        warnings.warn(
            "draft= is deprecated and ignored: JPEG drafting moved to preprocess='fast' "
            "(the default, preprocess='exact', gives the same pixels for every input form)",
            DeprecationWarning, stacklevel=3,
        )


def _optional_positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _image_fields(value: Any, name: str) -> str | tuple[str, ...]:
    parsed = _parse_fields(value, name)
    return value if isinstance(value, str) else parsed


def _parse_fields(value: str | Sequence[str], name: str) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a field name, a ';'-joined string or a sequence of "
                        f"names, got {value!r}")
    parts = value.split(";") if isinstance(value, str) else list(value)
    parts = tuple(p.strip().lstrip(".") for p in parts if p and p.strip())
    if not parts:
        raise ValueError(f"{name} names no field, got {value!r}")
    return parts


# ------------------------------------------------------------------------------ failures


class SampleError(ImageDecodeError):
    """One sample could not be encoded or decoded: `.key` (or row), `.url` (shard), `.reason`."""

    def __init__(self, reason: str, key: object = None, url: str | None = None):
        self.reason = reason
        self.key = key
        self.url = url
        where = f"sample {key!r}" if key is not None else "sample"
        if url:
            where += f" of shard {url}"
        ValueError.__init__(self, f"{where}: {reason}")

    def __reduce__(self):
        return type(self), (self.reason, self.key, self.url)


@dataclasses.dataclass
class StageStats:
    """What a stream did with its samples; `errors` keeps the first MAX_REPORTED_ERRORS failures."""

    samples_in: int = 0
    encoded: int = 0
    decoded: int = 0
    skipped: int = 0  # dropped: on_error="skip", or a handler that returned True
    failed: int = 0  # kept as nulls (on_error="null"), raised, or stopped the stream
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors_not_listed: int = 0

    def record(self, error: SampleError) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"key": jsonable_key(error.key), "reason": error.reason})
        else:
            self.errors_not_listed += 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def log_summary(self, what: str) -> None:
        """One warning when samples were skipped or failed (nothing is dropped silently)."""
        if self.skipped or self.failed:
            first = self.errors[0]["reason"] if self.errors else "?"
            logger.warning(
                "%s: %d of %d samples skipped, %d failed (first: %s); StageStats.errors lists "
                "them", what, self.skipped, self.samples_in, self.failed, first,
            )


def jsonable_key(key: object) -> object:
    """A sample key as JSON can hold it (repr for anything but str, numbers and None)."""
    return key if isinstance(key, (str, int, float)) or key is None else repr(key)


KEEP, DROP, STOP = "keep", "drop", "stop"


@dataclasses.dataclass(frozen=True)
class ErrorPolicy:
    """What a failed sample becomes: `apply` counts it and returns KEEP (a null with its
    reason), DROP, or STOP, or raises. A webdataset `handler`, when given, decides instead of
    on_error: True drops the sample and goes on, False stops the stream, an exception
    propagates."""

    on_error: OnError = "raise"
    handler: Callable[[Exception], bool] | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.handler is not None and not callable(self.handler):
            raise TypeError(f"handler must be callable, got {type(self.handler).__name__}")

    def apply(self, error: SampleError, stats: StageStats) -> str:
        stats.record(error)
        if self.handler is not None:
            try:
                go_on = self.handler(error)
            except BaseException:
                stats.failed += 1
                raise
            if go_on:
                stats.skipped += 1
                return DROP
            stats.failed += 1
            return STOP
        if self.on_error == "skip":
            stats.skipped += 1
            logger.debug("skipping %s", error)
            return DROP
        stats.failed += 1
        if self.on_error == "raise":
            raise error
        return KEEP
