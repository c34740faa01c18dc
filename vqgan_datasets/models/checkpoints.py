"""Model directories: Hub/local resolution, msgpack and safetensors I/O, and the weights digest
used in dataset fingerprints.

On-disk layout (vqgan-jax's, plus safetensors): `config.json`, `flax_model.msgpack` (the bare
parameter tree) and/or `model.safetensors` (the same tree flattened with "." separators).

The file layer below `modeling`: it imports only `config` and `storage`, so the parameter
shapes a file must have are passed in (`modeling.param_shapes(config)`). taming .ckpt
conversion, which needs the model, lives in `taming`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from .config import VQGANConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MSGPACK_NAME = "flax_model.msgpack"
SAFETENSORS_NAME = "model.safetensors"
_WEIGHT_FILES = (SAFETENSORS_NAME, MSGPACK_NAME)  # preference order: safetensors runs no code

# Public checkpoints whose config.json predates our `value_range` key. The evidence for each
# range is cited in model/README.md.
KNOWN_VALUE_RANGES: dict[str, tuple[float, float]] = {
    "flax-community/vqgan_f16_16384": (-1.0, 1.0),
    "dalle-mini/vqgan_imagenet_f16_16384": (-1.0, 1.0),
    "boris/vqgan_f16_16384": (-1.0, 1.0),
}


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Where weights came from: enough to name them in dataset metadata and fingerprints."""

    name: str  # Hub repo id or local path as the user gave it
    revision: str | None  # resolved commit hash for Hub checkpoints
    weights_file: str | None  # absolute path of the file read
    weights_digest: str  # "sha256:<hex>" of the weights file (or of the params, in memory)


# ---------------------------------------------------------------------------------------------
# Resolution: Hub id or local directory → a local directory with config.json and weights.


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, str | None]:
    """A local directory holding the checkpoint, and the Hub commit hash when it came from the Hub.

    Local directories win; anything else is a Hub repo id fetched through huggingface_hub, which
    honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path, None
    name = os.fspath(name_or_path)
    if path.suffix in (".ckpt", ".pt", ".pth") or os.sep in name.strip("/").replace("/", "", 1):
        raise CheckpointError(
            f"{name!r} is neither a model directory nor a Hub repo id; for a taming .ckpt file, "
            "run vqgan_datasets.convert_taming_checkpoint(...) (CLI: vqgan-datasets convert) first"
        )
    return _download(name, revision, cache_dir, token, local_files_only)


def _download(repo_id, revision, cache_dir, token, local_files_only) -> tuple[Path, str | None]:
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(filename: str) -> str:
        return huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(local_files_only),
        )

    offline = hub_constants.HF_HUB_OFFLINE or local_files_only
    try:
        config_file = Path(fetch(CONFIG_NAME))
        for weights in _WEIGHT_FILES:
            try:
                fetch(weights)
                break
            except (EntryNotFoundError, LocalEntryNotFoundError):
                continue
        else:
            raise CheckpointError(
                f"Hub repo {repo_id!r} (revision {revision or 'main'}) has {CONFIG_NAME} but neither "
                f"{SAFETENSORS_NAME} nor {MSGPACK_NAME}"
                + (" in the local cache" if offline else "")
            )
    except CheckpointError:
        raise
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"model {repo_id!r} (revision {revision or 'main'}) is not in the local Hugging Face "
            f"cache ({hub_constants.HF_HUB_CACHE}) and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Download it once with network "
            f"access (`hf download {repo_id}`), or pass a local model directory."
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"Hub repo {repo_id!r} or revision {revision or 'main'!r} does not exist or needs a "
            f"token (HF_TOKEN): {err.__class__.__name__}"
        ) from err
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hub ({err.__class__.__name__}: {err}). Set "
            "HF_HUB_OFFLINE=1 to use the local cache, or pass a local model directory."
        ) from err
    snapshot = config_file.parent
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit


# ---------------------------------------------------------------------------------------------
# Reading and writing a model directory.


def load_config(directory: Path, name: str | None = None) -> VQGANConfig:
    """config.json → VQGANConfig; a known public checkpoint without `value_range` gets its own."""
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (expected a model directory)")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    if "value_range" not in data:
        known = KNOWN_VALUE_RANGES.get(str(name)) if name else None
        if known is None:
            logger.warning(
                "%s has no value_range; assuming taming's [-1, 1]. Record it in config.json "
                "(\"value_range\": [0, 1] or [-1, 1]) to silence this.",
                file,
            )
            known = (-1.0, 1.0)
        data["value_range"] = list(known)
    try:
        return VQGANConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from err


def weights_file(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory}: no weights ({SAFETENSORS_NAME} or {MSGPACK_NAME}) next to {CONFIG_NAME}"
    )


def read_params(file: Path, expected_shapes: Mapping) -> dict:
    """Read a weights file into a nested dict of float32 numpy arrays, checked against
    `expected_shapes` (see check_params)."""
    flat = {k: _upgrade_legacy(k, _as_float32(v, file, k)) for k, v in _read_flat(file).items()}
    check_params(flat, expected_shapes, origin=str(file))
    return unflatten(flat)


def _read_flat(file: Path) -> dict[tuple[str, ...], Any]:
    # Any parse failure of a damaged or foreign file becomes one error naming the file and format;
    # OSError (permissions, I/O) passes through as the operating system reported it.
    safetensors = file.name.endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.numpy import load_file

            return {tuple(k.split(".")): v for k, v in load_file(str(file)).items()}
        from flax.serialization import msgpack_restore

        tree = msgpack_restore(file.read_bytes())
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and msgpack raise many kinds
        expected = ("safetensors file (expected a JSON header and float tensors)" if safetensors
                    else "msgpack file (expected flax's serialized parameter tree)")
        raise CheckpointError(
            f"{file}: not a readable {expected}; {err.__class__.__name__}: {err}".rstrip(": ")
        ) from err
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{file}: expected a tree of named arrays, got {type(tree).__name__}")
    return flatten(tree)


def _as_float32(value: Any, file: Path, key: tuple[str, ...]) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{file}: {'/'.join(key)}: expected a float array, got {type(value).__name__}"
        ) from err


def _upgrade_legacy(key: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    # Old vqgan-jax uploads stored GroupNorm scale/bias as (1, 1, 1, C) (vqgan-jax PR #4).
    if key[-1] in ("scale", "bias") and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
        return value.reshape(-1)
    return value


def check_params(flat: Mapping[tuple[str, ...], Any], expected_shapes: Mapping, origin: str, *,
                 unexpected: Iterable[str] = ()) -> None:
    """Raise one readable diff of missing, unexpected and mis-shaped parameter names (plus the
    names in `unexpected` that a converter could not map), then refuse non-finite values.

    `expected_shapes`: a parameter tree whose leaves have a `.shape` (as `modeling.param_shapes`
    returns) or are shape tuples, or the same flattened to tuple keys.
    """
    expected = _shape_table(expected_shapes)
    got = {k: tuple(np.shape(v)) for k, v in flat.items()}
    missing = sorted("/".join(k) for k in expected.keys() - got.keys())
    unexpected = [*unexpected, *sorted("/".join(k) for k in got.keys() - expected.keys())]
    misshaped = sorted(
        f"{'/'.join(k)}: expected {expected[k]}, got {got[k]}"
        for k in expected.keys() & got.keys()
        if expected[k] != got[k]
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(_diff_message(origin, missing, unexpected, misshaped))
    _check_finite(flat, origin)


def _shape_table(shapes: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = shapes if all(isinstance(k, tuple) for k in shapes) else flatten(shapes)
    return {tuple(k): tuple(getattr(v, "shape", v)) for k, v in flat.items()}


def _check_finite(flat: Mapping[tuple[str, ...], Any], origin: str) -> None:
    # NaN/Inf weights load and run, then give the same (garbage) token for every image: refuse
    # them once, here. One np.isfinite pass per tensor (measured cost in the README).
    bad = ["/".join(k) for k, v in sorted(flat.items()) if not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{origin}: non-finite values (NaN or Inf) in {bad[0]}"
            + (f" and {len(bad) - 1} more ({len(bad)} tensors: {', '.join(bad[:12])})" if bad[1:] else "")
            + "; such weights encode every image to the same garbage tokens, so they are refused"
        )


def _diff_message(origin: str, missing, unexpected, misshaped, limit: int = 12) -> str:
    lines = [f"{origin}: parameters do not match the config"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    return "\n".join(lines)


def save(directory: str | os.PathLike, config: VQGANConfig, params: Mapping,
         expected_shapes: Mapping, *, formats: tuple[str, ...] = ("safetensors", "msgpack")) -> Path:
    """Write the weights, then config.json (both weight formats by default: vqgan-jax reads the
    msgpack). `params` must match `expected_shapes` (see check_params); each file is written
    atomically, so a reader never sees a partial one."""
    from flax.serialization import msgpack_serialize

    flat = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten(params).items()}
    check_params(flat, expected_shapes, origin="save_pretrained")
    writers = {
        "safetensors": (SAFETENSORS_NAME, lambda: _safetensors_bytes(flat)),
        "msgpack": (MSGPACK_NAME, lambda: msgpack_serialize(unflatten(flat))),
    }
    unknown = set(formats) - writers.keys()
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {sorted(writers)}, got {formats}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        name, payload = writers[fmt]
        with storage.atomic_write(out / name) as f:
            f.write(payload())
    with storage.atomic_write(out / CONFIG_NAME) as f:
        f.write(config.to_json_string().encode())
    return out


def _safetensors_bytes(flat: Mapping[tuple[str, ...], np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({".".join(k): v for k, v in sorted(flat.items())}, metadata={"format": "flax"})


# ---------------------------------------------------------------------------------------------
# Digests: computed once per file (or taken from the Hub cache's content address).

# A cached digest is reused only for the same file (device, inode) with the same size, mtime
# and ctime. Replacing a file (os.replace, as huggingface_hub, save() and most tools do) gives it
# a new inode; rewriting it in place changes its ctime, which os.utime cannot set back. The
# kernel stamps ctime at its clock tick, so a rewrite within one tick of an earlier write could
# keep it: files changed less than _RACY_MARGIN_NS before hashing began are not cached (git's
# "racy" rule), which also covers coarse or skewed file-system clocks.
_RACY_MARGIN_NS = 2_000_000_000
_DIGEST_CACHE: dict[tuple[int, ...], str] = {}


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_digest(file: Path) -> str:
    """"sha256:<hex>" of a weights file, free for Hub cache files (their blob name is the sha256)."""
    resolved = file.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", resolved.name) and resolved.parent.name == "blobs":
        return f"sha256:{resolved.name}"
    started = time.time_ns()
    cached = _DIGEST_CACHE.get(_identity(resolved.stat()))
    if cached is not None:
        return cached
    sha = hashlib.sha256()
    with open(resolved, "rb") as f:
        before = _identity(os.fstat(f.fileno()))
        for chunk in iter(lambda: f.read(1 << 24), b""):
            sha.update(chunk)
        unchanged = _identity(os.fstat(f.fileno())) == before
    digest = f"sha256:{sha.hexdigest()}"
    if unchanged and before[-1] < started - _RACY_MARGIN_NS:
        _DIGEST_CACHE[before] = digest
    return digest


def params_digest(params: Mapping) -> str:
    """"params-sha256:<hex>" over names, shapes and float32 bytes of an in-memory tree."""
    sha = hashlib.sha256()
    for key, value in sorted(flatten(params).items()):
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        sha.update("/".join(key).encode() + str(array.shape).encode())
        sha.update(array.tobytes())
    return f"params-sha256:{sha.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# Tree helpers.


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested parameter tree as {("encoder", "conv_in", "kernel"): leaf, ...}."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """The inverse of flatten: tuple keys back to nested dicts."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return out
