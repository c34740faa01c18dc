"""The model behind every adapter: one handle, one rule, one cache of loaded models.

A `ModelHandle` stands for a model given by Hub id, by local directory, or in memory (a
`VQModel`). The rule, for all three:

- identity: `describe()` gives (config, weights digest, Hub commit) from config.json and the
  weights file's digest, without reading the weights; for an in-memory model, its own config
  and digest. Fingerprints and records use this, never the identity of a Python object and
  never a re-hash of the weights.
- loading: `load()` reads the weights once per process through one cache of loaded models,
  keyed by (reference, commit, compute dtype, value range, digest), and checks the digest: a
  checkpoint that changed since the handle was described raises. The cache holds models weakly:
  a model lives as long as some handle (or caller) uses it.
- pickling (worker processes, DataLoader workers, Ray actors): a model with a checkpoint (a
  name, a path, or a VQModel loaded from one) pickles as its reference (Hub id or absolute
  directory, commit, dtype, value range, and its identity once described) and is loaded again,
  once per process, where it is unpickled. A VQModel with no checkpoint pickles by value (config
  and numpy parameters): fine for local processes, too heavy for a cluster.
- `portable()`: the handle to send to other machines (Ray, multi-host): the reference pinned
  to the resolved Hub commit and digest. An in-memory model with no checkpoint raises there,
  since its weights would have to travel to every worker.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .metadata import TokenizerSpec
from .models import checkpoints
from .models.config import VQGANConfig
from .models.modeling import VQModel, locate_pretrained

__all__ = ["COMPUTE_DTYPES", "ModelHandle", "parse_value_range"]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# The one cache of loaded models: (reference, commit, dtype, value range, digest) -> VQModel.
_CACHE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()

_IN_MEMORY_MESSAGE = (
    "this VQModel has no checkpoint to load it from (its weights exist only in this process); "
    "save it with model.save_pretrained(directory) on storage every worker sees, or push it to "
    "the Hub, and pass that directory or repo id as the model"
)


def dtype_name(dtype: Any) -> str:
    """A compute dtype's name, checked: float32, bfloat16 or float16."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None) or np.dtype(dtype).name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
    return name


def parse_value_range(value: Any) -> tuple[float, float] | None:
    """(low, high) from a pair or a "low,high" string; None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(v) for v in parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"value_range must be two numbers (low, high), got {value!r}") from e
    if not low < high:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value!r}")
    return low, high


def normalize_ref(name: str | os.PathLike) -> str:
    """An existing local directory as an absolute path (the same in every process); a Hub id
    as given."""
    path = Path(os.fspath(name)).expanduser()
    return str(path.resolve()) if path.is_dir() else os.fspath(name)


def _current(key: tuple, model: VQModel) -> bool:
    """Whether a cached model still has the weights its key names: `model.params = ...` since
    it was cached makes it another model (a checkpoint's loses its source)."""
    digest = key[-1]
    if key[0] is not None:
        return model.source is not None and model.source.weights_digest == digest
    return model.weights_digest == digest


def _cached(key: tuple) -> VQModel | None:
    """The cached model for `key`, unless its weights were replaced since."""
    with _CACHE_LOCK:
        model = _CACHE.get(key)
    return model if model is not None and _current(key, model) else None


def _store(key: tuple, model: VQModel) -> VQModel:
    """Cache `model` under `key` unless a current one is there; returns the one cached."""
    with _CACHE_LOCK:
        held = _CACHE.get(key)
        if held is not None and held is not model and _current(key, held):
            return held
        _CACHE[key] = model
        return model


class ModelHandle:
    """A model by Hub id, local directory or VQModel: described without loading, loaded once
    per process, pickled by the rule in this module's docstring.

    `revision`: a Hub branch, tag or commit. `dtype`: the compute dtype (default float32, or
    the given VQModel's). `value_range`: overrides the checkpoint's pixel range.
    """

    def __init__(self, model: Any, *, revision: str | None = None, dtype: Any = None,
                 value_range: Any = None) -> None:
        self._blank(revision, value_range)
        if isinstance(model, (str, os.PathLike)):
            self._name = model
            self.dtype = dtype_name(dtype or "float32")
        elif isinstance(model, VQModel):
            self._model = self._adapt(model, dtype)
            source = self._model.source
            if source is not None:
                self._name = source.name
                self.revision = source.revision
            self.dtype = dtype_name(self._model.dtype)
            self._seen = self._model.params
            if source is not None:  # its digest is the file's, known without hashing
                self._described = (self._model.config, self._model.weights_digest,
                                   self.revision)
                self._remember(self._model)
        else:
            raise TypeError(
                f"model must be a Hub repo id, a local model directory or a VQModel, got "
                f"{type(model).__name__}"
            )

    def _blank(self, revision: str | None, value_range: Any) -> None:
        self.value_range = parse_value_range(value_range)
        self.revision = revision
        self._model: VQModel | None = None
        self._described: tuple[VQGANConfig, str, str | None] | None = None
        self._lock = threading.RLock()
        self._name: str | os.PathLike | None = None  # normalized on first use, not here
        self._ref: str | None = None
        self._state: dict[str, Any] | None = None  # unpickled in-memory weights, not yet built
        self._seen: Any = None  # the held model's params when it was described (see _follow)

    @classmethod
    def of(cls, model: Any, *, revision: str | None = None, dtype: Any = None,
           value_range: Any = None) -> ModelHandle:
        """`model` itself when it is a handle and nothing is overridden, else a new handle."""
        if isinstance(model, ModelHandle):
            if revision is None and dtype is None and value_range is None:
                return model
            revision = revision or model.revision
            dtype = dtype or model.dtype
            value_range = value_range or model.value_range
            model = model.load() if model.ref is None else model.ref
        return cls(model, revision=revision, dtype=dtype, value_range=value_range)

    # -- identity ------------------------------------------------------------------------------

    @property
    def ref(self) -> str | None:
        """Hub id, or the absolute path of a local directory; None for weights only in memory."""
        self._follow()
        if self._ref is None and self._name is not None:
            self._ref = normalize_ref(self._name)
        return self._ref

    @property
    def loaded(self) -> bool:
        """Whether this handle holds its model (a VQModel given, or load() done)."""
        return self._model is not None

    def describe(self) -> tuple[VQGANConfig, str, str | None]:
        """(config, weights digest, Hub commit), from the files without reading the weights."""
        self._follow()
        if self._described is not None:
            return self._described
        with self._lock:
            if self._described is None and self._model is not None:  # in memory: hash it once
                model = self._model
                self._seen = model.params
                self._described = (model.config, model.weights_digest, self.revision)
            elif self._described is None:
                directory, source = locate_pretrained(self.ref, revision=self.revision)
                config = checkpoints.load_config(directory, name=source.name)
                if self.value_range is not None:
                    config = config.replace(value_range=self.value_range)
                self._described = (config, source.weights_digest, source.revision)
        return self._described

    def _follow(self) -> None:
        """The held model's params were replaced (`model.params = ...`) since it was described:
        describe the new weights, which exist only in memory (a stale identity would give
        them the old weights' fingerprint, cache entries and checkpoint reference)."""
        model = self._model
        if model is None or self._seen is None or model.params is self._seen:
            return
        with self._lock:
            self._seen = model.params
            if model.source is None:
                self._name = self._ref = self.revision = None
            self._described = (model.config, model.weights_digest, self.revision)

    def expect(self, config: VQGANConfig, digest: str, commit: str | None) -> None:
        """Take the identity as recorded (e.g. in a pickle): nothing is read until load()."""
        self._described = (config, digest, commit)

    def spec(self, image_size: int | None = None, *, preprocess: str = "exact") -> TokenizerSpec:
        """The TokenizerSpec of this model encoding `image_size` images; no weights read."""
        config, digest, commit = self.describe()
        return TokenizerSpec.describe(config, digest, model_name=self.ref, revision=commit,
                                      image_size=image_size, compute_dtype=self.dtype,
                                      preprocess=preprocess)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> VQModel:
        """The VQModel, loaded on first use (once per process for equal handles)."""
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                self._model = self._load_state() if self._state is not None else self._load()
                self._seen = self._model.params
        return self._model

    def _load(self) -> VQModel:
        config, digest, commit = self.describe()
        if self.ref is None:
            raise RuntimeError(_IN_MEMORY_MESSAGE)
        key = (self.ref, commit, self.dtype, tuple(config.value_range), digest)
        model = _cached(key)
        if model is not None:
            return model
        model = VQModel.from_pretrained(self.ref, revision=commit or self.revision,
                                        dtype=self.dtype, value_range=tuple(config.value_range))
        if model.weights_digest != digest:
            raise checkpoints.CheckpointError(
                f"the weights of {self.ref} changed since this model was described "
                f"({digest} then, {model.weights_digest} now); create it again"
            )
        return _store(key, model)

    def _load_state(self) -> VQModel:
        """An in-memory model sent by value: rebuilt once per process (cached by digest)."""
        state = self._state
        config = VQGANConfig.from_dict(state["config"])
        key = (None, None, self.dtype, tuple(config.value_range), state["digest"])
        model = _cached(key)
        if model is None:
            model = VQModel(config, state["params"], dtype=self.dtype)
            if model.weights_digest != state["digest"]:
                raise ValueError(
                    f"the pickled parameters do not match their digest ({state['digest']} "
                    f"recorded, {model.weights_digest} computed)"
                )
            model = _store(key, model)
        self._state = None
        return model

    def _remember(self, model: VQModel) -> None:
        """Put a given VQModel in the cache, so that copies unpickled here reuse it."""
        config, digest, commit = self._described
        _store((self.ref, commit, self.dtype, tuple(config.value_range), digest), model)

    def _adapt(self, model: VQModel, dtype: Any) -> VQModel:
        """The given VQModel, or one sharing its weights with another dtype or value range."""
        want = dtype_name(dtype) if dtype is not None else dtype_name(model.dtype)
        config = model.config
        if self.value_range is not None and tuple(config.value_range) != self.value_range:
            config = config.replace(value_range=self.value_range)
        if want == dtype_name(model.dtype) and config is model.config:
            return model
        return VQModel(config, model.params, dtype=want, source=model.source)

    # -- travelling ----------------------------------------------------------------------------

    def portable(self) -> ModelHandle:
        """A handle other machines can load: the reference pinned to the resolved commit and
        digest. Raises for a model whose weights exist only in this process."""
        if self.ref is None:
            raise ValueError(_IN_MEMORY_MESSAGE)
        config, digest, commit = self.describe()
        handle = ModelHandle(self.ref, revision=commit or self.revision, dtype=self.dtype,
                             value_range=config.value_range)
        handle.expect(config, digest, commit)
        return handle

    def reference(self) -> dict[str, Any]:
        """The small pickled form of a handle with a checkpoint (no weights)."""
        if self.ref is None:
            raise ValueError(_IN_MEMORY_MESSAGE)
        out: dict[str, Any] = {"ref": self.ref, "revision": self.revision, "dtype": self.dtype,
                               "value_range": self.value_range}
        if self._described is not None:
            config, digest, commit = self._described
            out.update(config=config.to_dict(), digest=digest, commit=commit)
        return out

    @classmethod
    def from_reference(cls, state: dict[str, Any]) -> ModelHandle:
        """The handle `reference()` describes (nothing read until load())."""
        if "params" in state:
            handle = cls.__new__(cls)
            handle._blank(None, None)
            handle.dtype = dtype_name(state["dtype"])
            handle._state = state
            handle._described = (VQGANConfig.from_dict(state["config"]), state["digest"], None)
            return handle
        handle = cls(state["ref"], revision=state.get("commit") or state.get("revision"),
                     dtype=state.get("dtype"), value_range=state.get("value_range"))
        if state.get("digest") is not None:
            handle.expect(VQGANConfig.from_dict(state["config"]), state["digest"],
                          state.get("commit"))
        return handle

    def __reduce__(self):
        if self.ref is not None:
            return ModelHandle.from_reference, (self.reference(),)
        model = self.load()
        config, digest, _ = self.describe()
        # A copy unpickled in this process finds it here, not rebuilt.
        _store((None, None, self.dtype, tuple(config.value_range), digest), model)
        import jax

        params = jax.tree_util.tree_map(np.asarray, model.params)
        state = {"config": config.to_dict(), "params": params, "dtype": self.dtype,
                 "digest": digest}
        return ModelHandle.from_reference, (state,)

    def __repr__(self) -> str:
        return f"ModelHandle({self.ref or 'in-memory VQModel'!r}, dtype={self.dtype!r})"
